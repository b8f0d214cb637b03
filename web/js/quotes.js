// The excerpt of a source with the sentences that support the answer marked
// (`sources[].quotes`: exact substrings of the passage at character offsets,
// the excerpt being the passage's start). Text stays text: nodes, never HTML.

import { h } from './dom.js';

/**
 * The excerpt with its quotes marked; quotes that start past the excerpt, or
 * that do not match it where they say, follow it on their own. Offsets count
 * characters (code points), as the server gives them.
 */
export function excerptWithQuotes(source) {
  const chars = Array.from(source.excerpt || '');
  const quotes = (source.quotes || [])
    .filter((q) => typeof q.text === 'string' && q.end > q.start)
    .sort((a, b) => a.start - b.start);
  const parts = [];
  const apart = [];
  let at = 0;
  for (const q of quotes) {
    if (q.start >= at && q.end <= chars.length && chars.slice(q.start, q.end).join('') === q.text) {
      parts.push(chars.slice(at, q.start).join(''), h('mark.quote', { title: 'Supports the answer' }, q.text));
      at = q.end;
    } else {
      apart.push(h('p.quote.small', {}, h('mark.quote', { title: 'Supports the answer' }, q.text)));
    }
  }
  parts.push(chars.slice(at).join(''));
  return [h('p.excerpt', {}, ...parts), ...apart];
}
