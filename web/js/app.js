// The shell: which page shows (from the URL's #fragment), the top bar, notices.
// Each page module exports `render(main, ctx)` and may return a cleanup function.

import * as api from './api.js';
import { h, replace } from './dom.js';

const pages = {
  login: () => import('./pages/login.js'),
  chat: () => import('./pages/chat.js'),
  knowledge: () => import('./pages/knowledge.js'),
  account: () => import('./pages/account.js'),
  admin: () => import('./pages/admin.js'),
};

const main = document.getElementById('main');
let cleanup = null;
let renderCount = 0;
/** A notice to show once the next page is up: [text, kind]. */
let pendingNotice = null;

function routeOf() {
  const path = location.hash.replace(/^#\/?/, '');
  const [name, ...rest] = path.split('/');
  return { name: name || 'chat', args: rest.map(decodeURIComponent) };
}

/** Shows a short message under the top bar (`kind`: info, error). */
export function notify(text, kind = 'info') {
  const box = document.getElementById('notice');
  replace(box, h('span', {}, text), h('button.link', { type: 'button', 'aria-label': 'Dismiss', onclick: () => { box.hidden = true; } }, '×'));
  box.className = `notice ${kind}`;
  box.hidden = false;
}

export function clearNotice() {
  document.getElementById('notice').hidden = true;
}

async function show() {
  const ticket = ++renderCount;
  const user = api.currentUser();
  let { name, args } = routeOf();
  if (!user && name !== 'login') {
    location.replace('#/login');
    return;
  }
  if (user && name === 'login') {
    location.replace('#/chat');
    return;
  }
  if (!pages[name]) name = 'notfound';
  topbar(user, name);
  if (typeof cleanup === 'function') cleanup();
  cleanup = null;
  if (name === 'notfound') {
    replace(main, h('section.page', {}, h('h1', {}, 'Page not found'), h('p', {}, h('a', { href: '#/chat' }, 'Back to chat'))));
    return;
  }
  if (name === 'admin' && !user.is_superuser) {
    replace(main, h('section.page', {}, h('h1', {}, 'Not allowed'),
      h('p', { id: 'forbidden' }, 'The admin pages are for administrators only.')));
    return;
  }
  const mod = await pages[name]();
  if (ticket !== renderCount) return;
  replace(main);
  const ctx = { args, user, notify, clearNotice, navigate: (hash) => { location.hash = hash; } };
  try {
    cleanup = await mod.render(main, ctx);
  } catch (err) {
    notify(api.describe(err), 'error');
  }
  document.title = `${name[0].toUpperCase()}${name.slice(1)} · ragchat`;
  if (pendingNotice) {
    notify(...pendingNotice);
    pendingNotice = null;
  }
}

function topbar(user, name) {
  const bar = document.getElementById('topbar');
  bar.hidden = !user;
  if (!user) return;
  document.getElementById('who-email').textContent = user.email;
  document.getElementById('nav-admin').hidden = !user.is_superuser;
  for (const a of document.querySelectorAll('#nav a')) {
    if (a.dataset.page === name) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

document.getElementById('sign-out').addEventListener('click', async () => {
  await api.logout();
});

api.onAuthChange((session, reason) => {
  if (reason === 'signed-out') {
    const why = api.takeSignOutReason();
    if (why) pendingNotice = [api.describe(why), 'error'];
    if (location.hash !== '#/login') {
      location.hash = '#/login';
      return;
    }
  }
  show();
});

window.addEventListener('hashchange', () => {
  clearNotice();
  show();
});

// A stored session may have ended while the page was closed: check it once.
(async () => {
  if (api.currentUser()) {
    try {
      await api.reloadUser();
    } catch (err) {
      if (err instanceof api.ApiError && err.status === 0) notify(api.describe(err), 'error');
    }
  }
  show();
})();
