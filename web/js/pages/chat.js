// Chat: conversations on the left, the conversation in the middle, the sources of
// the selected answer on the right. Answers stream over the WebSocket (SSE when
// WebSockets are blocked); Stop cancels; the server keeps what was sent.

import * as api from '../api.js';
import { h, replace, formatDate, perFrame } from '../dom.js';
import { render as markdown } from '../markdown.js';
import { excerptWithQuotes } from '../quotes.js';

const PAGE = 20;

export async function render(main, ctx) {
  const state = {
    sessionId: ctx.args[0] || null,
    before: null,
    streaming: null,
    selected: null,
    countdown: null,
  };

  // ---- layout ----
  const sessionsList = h('ul.sessions', { id: 'sessions', 'aria-label': 'Conversations' });
  const sidebar = h('aside.sidebar', { 'aria-label': 'Conversations' },
    h('button.primary.block', { type: 'button', id: 'new-chat', onclick: () => open(null) }, '+ New chat'),
    h('h2.small', {}, 'Conversations'),
    sessionsList);
  const older = h('button.link.older', { type: 'button', hidden: true, onclick: () => loadOlder() }, 'Load older messages');
  const log = h('div.log', { id: 'messages', role: 'log', 'aria-live': 'polite', 'aria-label': 'Messages', tabindex: '0' });
  const scroller = h('div.scroller', {}, older, log);
  const input = h('textarea', {
    id: 'message', rows: 2, maxlength: 8000, required: true,
    placeholder: 'Ask a question… (Enter to send, Shift+Enter for a new line)',
  });
  const send = h('button.primary', { type: 'submit', id: 'send' }, 'Send');
  const stop = h('button.danger', { type: 'button', id: 'stop', hidden: true, onclick: () => stopAnswer() }, 'Stop');
  const status = h('p.status', { id: 'chat-status', role: 'status', 'aria-live': 'polite' });
  const rag = h('input', { type: 'checkbox', id: 'opt-rag', checked: true });
  const route = h('select', { id: 'opt-route' },
    ['auto', 'hybrid', 'vector', 'text'].map((r) => h('option', { value: r }, r)));
  const topK = h('input', { type: 'number', id: 'opt-topk', min: 1, max: 20, value: 3 });
  const maxTokens = h('input', { type: 'number', id: 'opt-max-tokens', min: 1, max: 2048, placeholder: 'default' });
  const advanced = h('details.advanced', {},
    h('summary', {}, 'Options'),
    h('div.row', {},
      h('label.inline', { for: 'opt-rag' }, rag, ' Use the knowledge base'),
      h('label.inline', { for: 'opt-route' }, 'Search ', route),
      h('label.inline', { for: 'opt-topk' }, 'Sources ', topK),
      h('label.inline', { for: 'opt-max-tokens' }, 'Longest answer (tokens) ', maxTokens)));
  const form = h('form.composer', { 'aria-label': 'Send a message' },
    h('label.visually-hidden', { for: 'message' }, 'Message'),
    input, h('div.actions', {}, send, stop), advanced, status);
  const sourcesList = h('ol.sources', { id: 'sources' });
  const sourcesPanel = h('aside.sources-panel', { 'aria-labelledby': 'sources-title' },
    h('h2#sources-title.small', {}, 'Sources'),
    h('p.muted', { id: 'sources-empty' }, 'Sources of the selected answer appear here.'),
    sourcesList);
  main.append(h('div.chat-layout', {}, sidebar, h('section.conversation', { 'aria-label': 'Conversation' }, scroller, form), sourcesPanel));

  // The view follows the stream until the reader scrolls up.
  let follow = true;
  scroller.addEventListener('scroll', () => {
    follow = scroller.scrollTop + scroller.clientHeight >= scroller.scrollHeight - 40;
  });
  const toBottom = () => {
    if (follow) scroller.scrollTop = scroller.scrollHeight;
  };

  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    ask();
  });

  // ---- conversations ----
  async function loadSessions() {
    let data;
    try {
      data = await api.get('/chat/sessions?limit=50');
    } catch (err) {
      ctx.notify(api.describe(err), 'error');
      return;
    }
    replace(sessionsList, data.sessions.length ? null : h('li.muted', {}, 'No conversations yet.'));
    for (const s of data.sessions) {
      const current = s.session_id === state.sessionId;
      sessionsList.append(h('li', { class: current ? 'current' : '' },
        h('a', { href: `#/chat/${s.session_id}`, 'aria-current': current ? 'page' : false, title: s.title || 'Untitled' },
          h('span.title', {}, s.title || 'Untitled'),
          h('small.muted', {}, `${formatDate(s.updated_at)} · ${s.message_count} messages`)),
        h('button.icon', {
          type: 'button', 'aria-label': `Delete conversation ${s.title || ''}`.trim(), title: 'Delete',
          onclick: () => remove(s),
        }, '×')));
    }
  }

  async function remove(s) {
    if (!window.confirm(`Delete the conversation “${s.title || 'Untitled'}”?`)) return;
    try {
      await api.del(`/chat/sessions/${s.session_id}`);
    } catch (err) {
      ctx.notify(api.describe(err), 'error');
      return;
    }
    if (s.session_id === state.sessionId) open(null);
    else loadSessions();
  }

  function open(id) {
    stopAnswer();
    ctx.navigate(id ? `#/chat/${id}` : '#/chat/');
  }

  async function loadHistory() {
    if (!state.sessionId) {
      replace(log, h('div.empty', {}, h('h1', {}, 'What would you like to know?'),
        h('p.muted', {}, 'Answers come from your knowledge base, with numbered sources.')));
      return;
    }
    await loadOlder(true);
  }

  async function loadOlder(first = false) {
    const q = new URLSearchParams({ limit: String(PAGE) });
    if (state.before) q.set('before', state.before);
    let data;
    try {
      data = await api.get(`/chat/sessions/${state.sessionId}/messages?${q}`);
    } catch (err) {
      if (err.status === 404) {
        replace(log, h('p.muted', {}, 'This conversation does not exist (any more).'));
        return;
      }
      ctx.notify(api.describe(err), 'error');
      return;
    }
    state.before = data.next_before || null;
    older.hidden = !state.before;
    const height = scroller.scrollHeight;
    const nodes = data.messages.map((m) => (m.role === 'user' ? userBubble(m.content) : answerBubble(m.content, m.metadata || {}).el));
    if (first) replace(log, nodes);
    else log.prepend(...nodes);
    if (first) scroller.scrollTop = scroller.scrollHeight;
    else scroller.scrollTop = scroller.scrollHeight - height;
  }

  // ---- messages ----
  function userBubble(text) {
    return h('article.msg.user', { 'aria-label': 'You' }, h('div.body', {}, text));
  }

  /** An answer bubble; `meta` carries its sources and how it ended. */
  function answerBubble(text, meta) {
    const body = h('div.body.md');
    const note = h('p.note.muted');
    const copy = h('button.link.small', { type: 'button', title: 'Copy the answer', 'aria-label': 'Copy the answer' }, 'Copy');
    const sourcesButton = h('button.link.small', { type: 'button', hidden: true }, 'Sources');
    const el = h('article.msg.assistant', { 'aria-label': 'Answer' }, body, h('div.meta', {}, sourcesButton, copy), note);
    const answer = { el, text: text || '', sources: meta.sources || [], body, note };
    const draw = () => {
      replace(body);
      body.append(markdown(answer.text, {
        sources: answer.sources.length,
        citation: (n) => h('button.cite', {
          type: 'button', 'aria-label': `Source ${n}`, title: answer.sources[n - 1]?.title || `Source ${n}`,
          onclick: () => select(answer, n),
        }, `[${n}]`),
      }));
      sourcesButton.hidden = !answer.sources.length;
      sourcesButton.textContent = `${answer.sources.length} source${answer.sources.length === 1 ? '' : 's'}`;
    };
    answer.draw = draw;
    answer.redraw = perFrame(() => {
      draw();
      toBottom();
    });
    sourcesButton.addEventListener('click', () => select(answer));
    copy.addEventListener('click', async () => {
      try {
        await navigator.clipboard.writeText(answer.text);
        copy.textContent = 'Copied';
        setTimeout(() => { copy.textContent = 'Copy'; }, 1500);
      } catch {
        ctx.notify('Copying needs a secure (https) page; select the text instead.', 'error');
      }
    });
    if (meta.cancelled) note.textContent = 'Stopped: the answer was cut short.';
    else if (meta.failed) note.textContent = 'The model failed before finishing this answer.';
    draw();
    return answer;
  }

  function select(answer, n) {
    state.selected = answer;
    for (const el of log.querySelectorAll('.msg.selected')) el.classList.remove('selected');
    answer.el.classList.add('selected');
    document.getElementById('sources-empty').hidden = answer.sources.length > 0;
    replace(sourcesList, answer.sources.map((s, i) => h('li', { id: `source-${i + 1}`, tabindex: '-1' },
      h('p.source-title', {}, s.title || 'Untitled'),
      excerptWithQuotes(s),
      h('p.muted.small', {},
        `Relevance ${(s.relevance_score || 0).toFixed(2)}`,
        s.source_type ? ` · ${s.source_type}` : '',
        s.source ? ` · ${s.source}` : ''))));
    if (n) {
      const item = document.getElementById(`source-${n}`);
      if (item) {
        item.classList.add('flash');
        item.scrollIntoView({ block: 'nearest' });
        item.focus();
        setTimeout(() => item.classList.remove('flash'), 1200);
      }
    }
  }

  function busy(on) {
    send.hidden = on;
    stop.hidden = !on;
    input.disabled = false;
    if (!on) input.focus();
  }

  function stopAnswer() {
    if (state.streaming) state.streaming.cancel();
  }

  function ask() {
    const text = input.value.trim();
    if (!text || state.streaming || state.countdown) return;
    status.textContent = '';
    const body = { message: text, enable_rag: rag.checked, route: route.value, top_k: Number(topK.value) || 3 };
    if (Number(maxTokens.value) > 0) body.max_tokens = Number(maxTokens.value);
    if (state.sessionId) body.session_id = state.sessionId;
    if (!state.sessionId) replace(log);
    log.append(userBubble(text));
    const answer = answerBubble('', {});
    answer.el.classList.add('streaming');
    answer.el.setAttribute('aria-busy', 'true');
    log.append(answer.el);
    follow = true;
    toBottom();
    input.value = '';
    busy(true);
    const finish = () => {
      state.streaming = null;
      answer.el.classList.remove('streaming');
      answer.el.removeAttribute('aria-busy');
      answer.draw();
      busy(false);
    };
    state.streaming = api.chat(body, {
      onSources(head) {
        log.dataset.transport = api.transport();
        answer.sources = head.sources || [];
        if (head.session_id && head.session_id !== state.sessionId) {
          state.sessionId = head.session_id;
          history.replaceState(null, '', `#/chat/${head.session_id}`);
        }
        warn(head.warnings, body.enable_rag && !head.context_used);
        if (answer.sources.length) select(answer);
        answer.redraw();
      },
      onToken(t) {
        answer.text += t;
        answer.redraw();
      },
      onDone(resp) {
        answer.text = resp.answer ?? answer.text;
        answer.sources = resp.sources || answer.sources;
        finish();
        if (answer.sources.length) select(answer);
        warn(resp.warnings, false);
        loadSessions();
      },
      onCancelled() {
        answer.note.textContent = answer.text ? 'Stopped: the answer was cut short.' : 'Stopped before the answer began.';
        if (!answer.text) answer.el.remove();
        finish();
        loadSessions();
      },
      onError(err) {
        finish();
        if (!answer.text) answer.el.remove();
        else answer.note.textContent = 'The answer stopped early.';
        refused(err, text);
      },
    });
  }

  function warn(warnings, noSources) {
    const lines = [...(warnings || [])];
    if (noSources) lines.push('No sources were found for this question: the answer comes from the model alone.');
    if (lines.length) status.textContent = lines.join(' ');
  }

  /** A refused message: the quota's upgrade path, a countdown, or the error. */
  function refused(err, text) {
    if (!input.value) input.value = text;
    if (err.quota) {
      const q = err.quota;
      replace(status, h('span.quota', { id: 'quota-notice' },
        api.describe(err), ' ',
        q.upgrade_to ? h('a', { href: '#/account' }, `Upgrade to ${q.upgrade_to}`) : h('a', { href: '#/account' }, 'See your plan'),
        ' for more.'));
      return;
    }
    if (err.code === 'rate_limited') {
      countdown(err.retryAfter || 1);
      return;
    }
    status.textContent = api.describe(err);
  }

  function countdown(seconds) {
    clearInterval(state.countdown);
    let left = seconds;
    send.disabled = true;
    const tick = () => {
      if (left <= 0) {
        clearInterval(state.countdown);
        state.countdown = null;
        send.disabled = false;
        status.textContent = 'You can send again.';
        return;
      }
      replace(status, h('span', { id: 'rate-countdown' }, `Too many messages: try again in ${left} s.`));
      left -= 1;
    };
    state.countdown = setInterval(tick, 1000);
    tick();
  }

  await Promise.all([loadSessions(), loadHistory()]);
  input.focus();
  return () => {
    clearInterval(state.countdown);
    stopAnswer();
  };
}
