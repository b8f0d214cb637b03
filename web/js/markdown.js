// A small Markdown renderer that builds DOM nodes, never HTML strings: whatever the
// model or a document wrote is text, so it cannot inject markup or script. Covers
// what answers use: paragraphs, headings, lists, quotes, code (fenced and inline),
// bold, italic, links (http, https and mailto only) and citations [n].

import { h } from './dom.js';

const INLINE = new RegExp(
  [
    '(`+)([\\s\\S]*?[^`])\\1(?!`)', // 1,2 inline code
    '\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*', // 3 bold
    '__(?=\\S)([\\s\\S]*?\\S)__', // 4 bold
    '\\*(?=[^\\s*])([^*]*?[^\\s*])\\*', // 5 italic
    '\\b_(?=[^\\s_])([^_]*?[^\\s_])_\\b', // 6 italic
    '\\[([^\\]\\n]{1,500})\\]\\(([^)\\s]{1,2000})\\)', // 7,8 link
    '\\[(\\d{1,3}(?:\\s*,\\s*\\d{1,3})*)\\]', // 9 citations
  ].join('|'),
  'g',
);

function safeUrl(url) {
  try {
    const u = new URL(url, location.href);
    return ['http:', 'https:', 'mailto:'].includes(u.protocol) ? u.href : null;
  } catch {
    return null;
  }
}

/** Inline Markdown of one block's text → nodes. */
export function inline(text, opts = {}) {
  const out = [];
  let last = 0;
  // A scanner of its own: the calls for bold and italic text recurse.
  const scan = new RegExp(INLINE.source, 'g');
  for (let m; (m = scan.exec(text));) {
    if (m.index > last) out.push(text.slice(last, m.index));
    last = scan.lastIndex;
    if (m[2] !== undefined) out.push(h('code', {}, m[2]));
    else if (m[3] !== undefined || m[4] !== undefined) out.push(h('strong', {}, inline(m[3] ?? m[4], opts)));
    else if (m[5] !== undefined || m[6] !== undefined) out.push(h('em', {}, inline(m[5] ?? m[6], opts)));
    else if (m[7] !== undefined) {
      const href = safeUrl(m[8]);
      out.push(href
        ? h('a', { href, target: '_blank', rel: 'noopener noreferrer nofollow' }, inline(m[7], opts))
        : m[0]);
    } else if (m[9] !== undefined) {
      const numbers = m[9].split(',').map((n) => parseInt(n.trim(), 10));
      const known = numbers.filter((n) => opts.citation && opts.sources && n >= 1 && n <= opts.sources);
      if (!known.length) out.push(m[0]);
      else for (const n of numbers) {
        out.push(known.includes(n) ? opts.citation(n) : `[${n}]`);
      }
    }
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

/**
 * Markdown → a DocumentFragment. `opts.citation(n)` makes the node of citation n
 * (when 1 ≤ n ≤ `opts.sources`); other bracketed numbers stay text.
 */
export function render(markdown, opts = {}) {
  const frag = document.createDocumentFragment();
  const lines = String(markdown).replace(/\r\n?/g, '\n').split('\n');
  let i = 0;
  const para = [];
  const flush = () => {
    if (para.length) frag.append(h('p', {}, inline(para.join('\n'), opts)));
    para.length = 0;
  };
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*(```|~~~)\s*([\w+-]*)/);
    if (fence) {
      flush();
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i += 1; // the closing fence (or the end while it streams)
      const code = h('code', {}, body.join('\n'));
      if (fence[2]) code.dataset.lang = fence[2];
      frag.append(h('pre', {}, code));
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      flush();
      // Inside an answer, headings start at h3 so they never compete with the page's.
      const level = Math.min(6, heading[1].length + 2);
      frag.append(h(`h${level}`, {}, inline(heading[2].replace(/\s#+\s*$/, ''), opts)));
      i += 1;
      continue;
    }
    if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      flush();
      frag.append(h('hr'));
      i += 1;
      continue;
    }
    if (/^\s*>/.test(line)) {
      flush();
      const body = [];
      while (i < lines.length && /^\s*>/.test(lines[i])) body.push(lines[i++].replace(/^\s*>\s?/, ''));
      const quote = h('blockquote');
      quote.append(render(body.join('\n'), opts));
      frag.append(quote);
      continue;
    }
    const item = line.match(/^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/);
    if (item) {
      flush();
      const ordered = /\d/.test(item[1]);
      const list = h(ordered ? 'ol' : 'ul');
      if (ordered) {
        const start = parseInt(item[1], 10);
        if (start !== 1) list.setAttribute('start', String(start));
      }
      while (i < lines.length) {
        const m = lines[i].match(/^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/);
        if (!m || /\d/.test(m[1]) !== ordered) break;
        const text = [m[2]];
        i += 1;
        // Continuation lines (indented, not a new item) belong to the item.
        while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !/^\s*([-*+]|\d{1,9}[.)])\s+/.test(lines[i])) {
          text.push(lines[i++].trim());
        }
        list.append(h('li', {}, inline(text.join('\n'), opts)));
      }
      frag.append(list);
      continue;
    }
    if (!line.trim()) {
      flush();
      i += 1;
      continue;
    }
    para.push(line);
    i += 1;
  }
  flush();
  return frag;
}
