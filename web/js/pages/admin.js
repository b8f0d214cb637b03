// Admin (superusers): users, upgrade requests, seeding with live progress, the
// actor supervision tree and charts from /metrics, refreshed while the page is open.

import * as api from '../api.js';
import { h, replace, field, formatDate } from '../dom.js';
import { parse, rates, chart } from '../metrics.js';

const REFRESH_MS = 2000;
const HISTORY = 60;

export async function render(main, ctx) {
  const timers = [];
  const every = (ms, fn) => {
    fn();
    timers.push(setInterval(fn, ms));
  };

  // ---- users ----
  const email = h('input', { type: 'search', id: 'user-search', maxlength: 254, placeholder: 'part of an e-mail' });
  const usersForm = h('form.row', { role: 'search' }, field('Find users', email), h('button', { type: 'submit' }, 'Search'));
  const users = h('table.users', { id: 'users' });
  const requests = h('ul', { id: 'upgrade-requests' });

  // ---- seeding ----
  const seedPath = h('input', { type: 'text', id: 'seed-path', maxlength: 500, placeholder: '(the configured seed folder)' });
  const seedClear = h('input', { type: 'checkbox', id: 'seed-clear' });
  const seedDry = h('input', { type: 'checkbox', id: 'seed-dry' });
  const seedForm = h('form', {},
    field('Path under the seed root', seedPath),
    h('div.row', {},
      h('label.inline', { for: 'seed-clear' }, seedClear, ' Remove documents no longer in the folder'),
      h('label.inline', { for: 'seed-dry' }, seedDry, ' Dry run')),
    h('button.primary', { type: 'submit' }, 'Seed'));
  const seedStatus = h('div', { id: 'seed-status', 'aria-live': 'polite' });

  // ---- operations ----
  const actors = h('table.actors', { id: 'actors' });
  const charts = h('div.charts', { id: 'charts' });

  main.append(h('section.page.wide', { 'aria-labelledby': 'admin-title' },
    h('h1#admin-title', {}, 'Admin'),
    h('section.card', { 'aria-labelledby': 'ops-title' },
      h('h2#ops-title', {}, 'Server'), charts,
      h('h3', {}, 'Supervision tree'), h('div.table-wrap', {}, actors)),
    h('section.card', { 'aria-labelledby': 'users-title' },
      h('h2#users-title', {}, 'Users'), usersForm, h('div.table-wrap', {}, users),
      h('h3', {}, 'Upgrade requests'), requests),
    h('section.card', { 'aria-labelledby': 'seed-title' },
      h('h2#seed-title', {}, 'Seed the knowledge base'), seedForm, seedStatus)));

  async function loadUsers() {
    const q = new URLSearchParams({ page: '1', page_size: '50' });
    if (email.value.trim()) q.set('email', email.value.trim());
    let data;
    try {
      data = await api.get(`/admin/users?${q}`);
    } catch (err) {
      ctx.notify(api.describe(err), 'error');
      return;
    }
    replace(users,
      h('caption.visually-hidden', {}, 'Users'),
      h('thead', {}, h('tr', {}, ['E-mail', 'Plan', 'Active', 'Admin', 'Joined'].map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', {}, data.items.map((u) => {
        const plan = h('select', { 'aria-label': `Plan of ${u.email}` },
          ['free', 'pro', 'enterprise'].map((p) => h('option', { value: p, selected: p === u.subscription_plan }, p)));
        plan.addEventListener('change', () => change(u, { subscription_plan: plan.value }));
        const active = h('button.small', {
          type: 'button', class: u.is_active ? 'danger' : '',
          'aria-label': `${u.is_active ? 'Deactivate' : 'Activate'} ${u.email}`,
          onclick: () => change(u, { is_active: !u.is_active }),
        }, u.is_active ? 'Deactivate' : 'Activate');
        return h('tr', {}, h('td', {}, u.email), h('td', {}, plan), h('td', {}, u.is_active ? 'yes ' : 'no ', active),
          h('td', {}, u.is_superuser ? 'yes' : 'no'), h('td', {}, formatDate(u.created_at)));
      })));
  }

  async function change(user, patch) {
    if (patch.is_active === false && !window.confirm(`Deactivate ${user.email}? They are signed out everywhere.`)) {
      loadUsers();
      return;
    }
    try {
      await api.patch(`/admin/users/${user.id}`, patch);
      ctx.notify(`${user.email} updated.`);
    } catch (err) {
      ctx.notify(api.describe(err), 'error');
    }
    loadUsers();
  }

  async function loadRequests() {
    let data;
    try {
      data = await api.get('/admin/upgrade-requests?status=pending');
    } catch (err) {
      ctx.notify(api.describe(err), 'error');
      return;
    }
    replace(requests, data.items.length ? null : h('li.muted', {}, 'No pending requests.'));
    for (const r of data.items) {
      const decide = async (what) => {
        try {
          await api.post(`/admin/upgrade-requests/${r.id}/${what}`, what === 'reject' ? {} : undefined);
        } catch (err) {
          ctx.notify(api.describe(err), 'error');
        }
        loadRequests();
        loadUsers();
      };
      requests.append(h('li', {},
        `${r.email}: ${r.from_plan} → ${r.plan_type} (${r.billing_cycle}) `,
        h('button.small.primary', { type: 'button', onclick: () => decide('approve') }, 'Approve'), ' ',
        h('button.small', { type: 'button', onclick: () => decide('reject') }, 'Reject')));
    }
  }

  usersForm.addEventListener('submit', (e) => {
    e.preventDefault();
    loadUsers();
  });

  seedForm.addEventListener('submit', async (e) => {
    e.preventDefault();
    const body = { clear_existing: seedClear.checked, dry_run: seedDry.checked, background: true };
    if (seedPath.value.trim()) body.path = seedPath.value.trim();
    try {
      await api.post('/admin/seed-enhanced', body);
      loadSeed();
    } catch (err) {
      replace(seedStatus, h('p.error', { role: 'alert' }, api.describe(err)));
    }
  });

  async function loadSeed() {
    let s;
    try {
      s = await api.get('/admin/seed-status');
    } catch {
      return;
    }
    const total = s.documents_total || 0;
    const done = s.documents_processed || 0;
    replace(seedStatus,
      h('p', {}, h('strong', {}, s.state),
        total ? ` — ${done} of ${total} documents (${s.documents_created} new, ${s.documents_duplicate} unchanged, ${s.documents_failed} failed)` : '',
        s.elapsed_s ? `, ${Number(s.elapsed_s).toFixed(1)} s` : ''),
      s.state === 'running' ? h('progress', { max: total || 1, value: done, 'aria-label': 'Seeding progress' }) : null,
      (s.errors || []).length ? h('ul.errors', {}, s.errors.slice(0, 10).map((e) => h('li.error', {}, typeof e === 'string' ? e : JSON.stringify(e)))) : null);
  }

  async function loadActors() {
    let data;
    try {
      data = await api.get('/admin/actors');
    } catch {
      return;
    }
    replace(actors,
      h('caption.visually-hidden', {}, 'Supervised actors'),
      h('thead', {}, h('tr', {}, ['Actor', 'Supervises', 'State', 'Restarts', 'Mailbox', 'Handled', 'Last error']
        .map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', {}, data.supervisors.map((a) => h('tr', { dataset: { actor: a.name } },
        h('th', { scope: 'row' }, a.name),
        h('td', {}, a.supervises ?? ''),
        h('td', {}, h('span.badge', { class: a.state === 'running' ? 'ok' : 'warn' }, String(a.state))),
        h('td', {}, String(a.restarts ?? 0)),
        h('td', {}, String(a.mailbox ?? '')),
        h('td', {}, String(a.handled ?? '')),
        h('td.wrap', {}, a.last_error || '—')))));
  }

  let previous = null;
  const series = { req: [], p99: [], tok: [] };
  async function loadMetrics() {
    let samples;
    try {
      samples = parse(await api.get('/metrics', { text: true }));
    } catch {
      return;
    }
    const now = performance.now();
    if (previous) {
      const r = rates(previous.samples, samples, (now - previous.at) / 1000);
      const push = (arr, v) => {
        arr.push(v);
        if (arr.length > HISTORY) arr.shift();
      };
      push(series.req, r.requestsPerSec);
      push(series.p99, r.p99Ms);
      push(series.tok, r.tokensPerSec);
    }
    previous = { samples, at: now };
    replace(charts,
      chart('Requests/s', series.req, 'req/s'),
      chart('p99 latency', series.p99, 'ms'),
      chart('Tokens/s', series.tok, 'tok/s'));
  }

  await Promise.all([loadUsers(), loadRequests(), loadSeed()]);
  every(REFRESH_MS, loadActors);
  every(REFRESH_MS, loadMetrics);
  every(REFRESH_MS, loadSeed);
  return () => timers.forEach(clearInterval);
}
