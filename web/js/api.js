// The one module that talks to the server: sign-in state, token refresh, JSON
// calls, uploads with progress, chat streams (WebSocket, SSE when WebSockets are
// blocked) and what each error code means to a person.

const STORE_KEY = 'ragchat.session';
/** Refresh this long before the access token expires. */
const REFRESH_MARGIN_MS = 60_000;

/** An error answer of the API: `{detail, code, type, link}` plus the HTTP status. */
export class ApiError extends Error {
  constructor(status, body, retryAfter) {
    const detail = body && body.detail !== undefined ? body.detail : body;
    super(typeof detail === 'string' ? detail : (detail && detail.error) || `HTTP ${status}`);
    this.status = status;
    this.code = (body && body.code) || (status === 0 ? 'network_error' : `http_${status}`);
    this.detail = detail;
    this.retryAfter = retryAfter;
  }

  /** A quota refusal: `{resource, current_usage, limit, upgrade_to, upgrade_url}`. */
  get quota() {
    return this.code === 'quota_exceeded' || this.code === 'storage_quota_exceeded'
      ? (typeof this.detail === 'object' && this.detail) || {}
      : null;
  }
}

/** What a person should read for an error (the countdown and upgrade path are shown by callers). */
export function describe(err) {
  if (!(err instanceof ApiError)) return String((err && err.message) || err);
  switch (err.code) {
    case 'network_error':
      return 'The server cannot be reached. Check your connection and try again.';
    case 'rate_limited':
      return err.retryAfter ? `Too many requests: try again in ${err.retryAfter} s.` : err.message;
    case 'quota_exceeded':
    case 'storage_quota_exceeded': {
      const q = err.quota;
      const used = q.current_usage !== undefined ? ` (${q.current_usage} of ${q.limit} ${q.resource || ''})` : '';
      return `You have used this month's quota${used}.`;
    }
    case 'account_deactivated':
      return 'This account is deactivated. Contact an administrator.';
    case 'token_expired':
    case 'token_revoked':
    case 'unauthenticated':
      return 'Your session has ended. Please sign in again.';
    case 'model_overloaded':
      return 'The model is busy right now. Try again in a moment.';
    default:
      return err.message;
  }
}

// ---- sign-in state --------------------------------------------------------

let session = load();
let refreshTimer = null;
const listeners = new Set();

function load() {
  try {
    const s = JSON.parse(localStorage.getItem(STORE_KEY) || 'null');
    return s && s.refresh_token ? s : null;
  } catch {
    return null;
  }
}

function save(next) {
  session = next;
  if (next) localStorage.setItem(STORE_KEY, JSON.stringify(next));
  else localStorage.removeItem(STORE_KEY);
  schedule();
}

function fromPair(pair, user) {
  return {
    access_token: pair.access_token,
    refresh_token: pair.refresh_token,
    expires_at: Date.now() + pair.expires_in * 1000,
    user: user || (session && session.user) || null,
  };
}

function notify(reason) {
  for (const fn of listeners) fn(session, reason);
}

/** Calls `fn(session, reason)` whenever the user signs in or out. */
export function onAuthChange(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

export function currentUser() {
  return session && session.user;
}

export function accessToken() {
  return session && session.access_token;
}

function schedule() {
  clearTimeout(refreshTimer);
  if (!session) return;
  const wait = Math.max(1000, session.expires_at - Date.now() - REFRESH_MARGIN_MS);
  refreshTimer = setTimeout(() => refresh().catch(() => {}), wait);
}

// Another tab signed in, refreshed or signed out: follow it.
window.addEventListener('storage', (e) => {
  if (e.key !== STORE_KEY) return;
  const before = session;
  session = load();
  schedule();
  if (!!before !== !!session || (before && session && before.user?.id !== session.user?.id)) {
    notify(session ? 'signed-in' : 'signed-out');
  } else if (session) {
    tokenListeners.forEach((fn) => fn(session.access_token));
  }
});

const tokenListeners = new Set();
/** Calls `fn(accessToken)` after every refresh (the chat socket sends it on). */
export function onTokenRefresh(fn) {
  tokenListeners.add(fn);
  return () => tokenListeners.delete(fn);
}

let refreshing = null;

/**
 * Trades the refresh token for a new pair. A refresh token works once: tabs take
 * turns (Web Locks), and a tab that finds a newer pair stored by another uses it.
 */
export function refresh() {
  if (refreshing) return refreshing;
  const run = async () => {
    const stored = load();
    if (stored && session && stored.refresh_token !== session.refresh_token) {
      session = stored;
      schedule();
      if (session.expires_at - Date.now() > REFRESH_MARGIN_MS) return session;
    }
    if (!session) throw new ApiError(401, { detail: 'Not signed in', code: 'unauthenticated' });
    let pair;
    try {
      pair = await call('POST', '/auth/refresh', { json: { refresh_token: session.refresh_token }, anonymous: true });
    } catch (err) {
      if (err.status === 401 || err.status === 403) signedOut(err);
      throw err;
    }
    save(fromPair(pair));
    tokenListeners.forEach((fn) => fn(session.access_token));
    return session;
  };
  const locked = navigator.locks ? navigator.locks.request('ragchat-refresh', run) : run();
  refreshing = locked.finally(() => {
    refreshing = null;
  });
  return refreshing;
}

let lastSignOutReason = null;
/** Why the last sign-out happened (an ApiError), once. */
export function takeSignOutReason() {
  const r = lastSignOutReason;
  lastSignOutReason = null;
  return r;
}

function signedOut(reason) {
  lastSignOutReason = reason || null;
  save(null);
  notify('signed-out');
}

export async function login(email, password) {
  const pair = await call('POST', '/auth/login', { json: { email, password }, anonymous: true });
  session = fromPair(pair, null);
  const user = await call('GET', '/auth/me');
  save({ ...session, user });
  notify('signed-in');
  return user;
}

export async function register(email, password, fullName) {
  const body = { email, password };
  if (fullName) body.full_name = fullName;
  await call('POST', '/auth/register', { json: body, anonymous: true });
  return login(email, password);
}

export async function logout() {
  const s = session;
  closeSocket();
  if (s) {
    try {
      await call('POST', '/auth/logout', { json: { refresh_token: s.refresh_token }, anonymous: true });
    } catch {
      // Signed out here either way; the server's tokens expire on their own.
    }
  }
  signedOut(null);
}

/** Re-reads the current user (plan, admin) into the session. */
export async function reloadUser() {
  const user = await call('GET', '/auth/me');
  if (session) save({ ...session, user });
  return user;
}

// ---- calls ------------------------------------------------------------------

async function bearer() {
  if (!session) return null;
  if (session.expires_at - Date.now() < REFRESH_MARGIN_MS / 2) await refresh();
  return session && session.access_token;
}

async function errorOf(resp) {
  let body = null;
  try {
    body = await resp.json();
  } catch {
    body = { detail: resp.statusText || `HTTP ${resp.status}` };
  }
  const retry = parseInt(resp.headers.get('Retry-After') || '', 10);
  return new ApiError(resp.status, body, Number.isFinite(retry) ? retry : undefined);
}

/**
 * One API call. `json` (a body) or `form` (FormData); `anonymous` sends no token;
 * `stream` returns the Response itself, `text` its body as text. Errors throw ApiError; an expired token is
 * refreshed and the call tried once more.
 */
export async function call(method, path, { json, form, anonymous, signal, stream, text } = {}, retried = false) {
  const headers = { Accept: stream ? 'text/event-stream' : text ? 'text/plain' : 'application/json' };
  if (!anonymous) {
    const token = await bearer();
    if (token) headers.Authorization = `Bearer ${token}`;
  }
  let body;
  if (json !== undefined) {
    headers['Content-Type'] = 'application/json';
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  let resp;
  try {
    resp = await fetch(path, { method, headers, body, signal, credentials: 'omit' });
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new ApiError(0, { detail: 'network error' });
  }
  if (resp.ok) {
    if (stream) return resp;
    if (text) return resp.text();
    if (resp.status === 204) return null;
    const body = await resp.text();
    return body ? JSON.parse(body) : null;
  }
  const err = await errorOf(resp);
  if (!anonymous && resp.status === 401 && !retried && session) {
    if (err.code === 'token_expired') {
      await refresh();
      return call(method, path, { json, form, anonymous, signal, stream, text }, true);
    }
    signedOut(err);
  } else if (!anonymous && err.code === 'account_deactivated') {
    signedOut(err);
  }
  throw err;
}

export const get = (path, opts) => call('GET', path, opts);
export const post = (path, json, opts) => call('POST', path, { ...opts, json });
export const patch = (path, json, opts) => call('PATCH', path, { ...opts, json });
export const put = (path, json, opts) => call('PUT', path, { ...opts, json });
export const del = (path, opts) => call('DELETE', path, opts);

/**
 * Uploads one file as multipart form data with progress (fetch cannot report it).
 * Resolves with `{status, body}` (201/200 stored, 202 a background job).
 */
export async function upload(file, fields, onProgress) {
  const token = await bearer();
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', '/knowledge/documents');
    if (token) xhr.setRequestHeader('Authorization', `Bearer ${token}`);
    xhr.setRequestHeader('Accept', 'application/json');
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress && onProgress(e.loaded / e.total);
    xhr.onerror = () => reject(new ApiError(0, { detail: 'network error' }));
    xhr.onload = () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText || 'null');
      } catch {
        body = { detail: xhr.statusText };
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve({ status: xhr.status, body });
      else {
        const retry = parseInt(xhr.getResponseHeader('Retry-After') || '', 10);
        reject(new ApiError(xhr.status, body, Number.isFinite(retry) ? retry : undefined));
      }
    };
    const form = new FormData();
    form.append('file', file, file.name);
    for (const [k, v] of Object.entries(fields || {})) if (v !== undefined && v !== '') form.append(k, v);
    xhr.send(form);
  });
}

// ---- chat streams ------------------------------------------------------------

let socket = null;
let socketReady = null;
let socketBroken = false;
let nextId = 1;
const inflight = new Map();

function closeSocket() {
  if (socket) socket.close(1000);
  socket = null;
  socketReady = null;
}

/** Which transport answers arrive over: 'websocket', or 'sse' once WebSockets failed. */
export function transport() {
  return socketBroken ? 'sse' : 'websocket';
}

async function openSocket() {
  if (socket && socket.readyState === WebSocket.OPEN) return socket;
  if (socketReady) return socketReady;
  const token = await bearer();
  const url = new URL('/ws/chat', location.href);
  url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
  // The token goes in the first frame, not the URL (which proxies may log).
  socketReady = new Promise((resolve, reject) => {
    let authenticated = false;
    const ws = new WebSocket(url);
    ws.onopen = () => ws.send(JSON.stringify({ type: 'auth', id: 'auth', token: token || '' }));
    ws.onmessage = (e) => {
      let frame;
      try {
        frame = JSON.parse(e.data);
      } catch {
        return;
      }
      if (!authenticated) {
        if (frame.type === 'authenticated') {
          authenticated = true;
          socket = ws;
          resolve(ws);
        } else if (frame.type === 'error') {
          reject(new ApiError(frame.status || 401, frame, frame.retry_after));
        }
        return;
      }
      if (frame.type === 'pong' || frame.type === 'authenticated') return;
      const handlers = inflight.get(frame.id);
      if (!handlers) return;
      dispatch(handlers, frame.type, frame, () => inflight.delete(frame.id));
    };
    ws.onclose = (e) => {
      if (socket === ws) socket = null;
      socketReady = null;
      if (!authenticated) {
        reject(new Error('websocket refused'));
        return;
      }
      // Whatever was streaming ends here: the server kept what it had sent.
      const err = e.code === 4403
        ? new ApiError(403, { detail: 'User account is deactivated', code: 'account_deactivated' })
        : new ApiError(0, { detail: 'The connection was closed' });
      for (const [id, handlers] of inflight) {
        inflight.delete(id);
        handlers.onError && handlers.onError(err);
      }
      if (e.code === 4403) signedOut(err);
    };
  });
  socketReady.catch(() => {
    socketReady = null;
  });
  return socketReady;
}

onTokenRefresh((token) => {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: 'auth', token }));
});
onAuthChange((s) => {
  if (!s) closeSocket();
});

function dispatch(handlers, type, frame, finish) {
  switch (type) {
    case 'sources':
      handlers.onSources && handlers.onSources(frame);
      break;
    case 'token':
      handlers.onToken && handlers.onToken(frame.text || '');
      break;
    case 'done':
      finish();
      handlers.onDone && handlers.onDone(frame.response || frame);
      break;
    case 'cancelled':
      finish();
      handlers.onCancelled && handlers.onCancelled();
      break;
    case 'error': {
      finish();
      const err = new ApiError(frame.status || 500, frame, frame.retry_after);
      if (err.code === 'account_deactivated' || err.status === 401) signedOut(err);
      handlers.onError && handlers.onError(err);
      break;
    }
    default:
      break;
  }
}

/**
 * Sends one chat message and streams the answer: `handlers` get onSources(head),
 * onToken(text), onDone(response), onCancelled(), onError(ApiError). Returns
 * `{cancel}`. Over the WebSocket when it opens, else over SSE (POST /chat/stream).
 */
export function chat(body, handlers) {
  let cancelled = false;
  let cancel = () => {
    cancelled = true;
  };
  const run = async () => {
    if (!socketBroken) {
      let ws = null;
      try {
        ws = await openSocket();
      } catch (err) {
        // Refused by the server (429 too many sockets, 403): say so. Anything
        // else means WebSockets do not get through: use SSE from now on.
        if (err instanceof ApiError) throw err;
        socketBroken = true;
      }
      if (ws) {
        const id = `m${nextId++}`;
        inflight.set(id, handlers);
        cancel = () => {
          if (inflight.has(id) && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: 'cancel' }));
        };
        if (cancelled) {
          inflight.delete(id);
          handlers.onCancelled && handlers.onCancelled();
          return;
        }
        ws.send(JSON.stringify({ type: 'message', id, ...body }));
        return;
      }
    }
    await chatOverSse(body, handlers, (fn) => {
      cancel = fn;
      if (cancelled) fn();
    });
  };
  run().catch((err) => handlers.onError && handlers.onError(err));
  return { cancel: () => cancel() };
}

async function chatOverSse(body, handlers, setCancel) {
  const abort = new AbortController();
  let stopped = false;
  setCancel(() => {
    stopped = true;
    abort.abort();
  });
  let resp;
  try {
    resp = await call('POST', '/chat/stream', { json: body, signal: abort.signal, stream: true });
  } catch (err) {
    if (err.name === 'AbortError') return handlers.onCancelled && handlers.onCancelled();
    throw err;
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  let ended = false;
  const finish = () => {
    ended = true;
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = 'message';
        const data = [];
        for (const line of block.split('\n')) {
          if (line.startsWith('event:')) event = line.slice(6).trim();
          else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
        }
        if (!data.length) continue;
        let payload;
        try {
          payload = JSON.parse(data.join('\n'));
        } catch {
          continue;
        }
        dispatch(handlers, event, event === 'done' ? { response: payload } : payload, finish);
      }
    }
  } catch (err) {
    if (!stopped) throw err;
  }
  if (!ended) {
    if (stopped) handlers.onCancelled && handlers.onCancelled();
    else handlers.onError && handlers.onError(new ApiError(0, { detail: 'The answer stopped early' }));
  }
}
