// Account: plan and usage meters, plans and upgrades, API keys.

import * as api from '../api.js';
import { h, replace, field, formatDate } from '../dom.js';

const SCOPES = ['chat', 'search', 'ingest', 'admin'];

function money(cents, currency) {
  return new Intl.NumberFormat(undefined, { style: 'currency', currency: (currency || 'usd').toUpperCase() }).format(cents / 100);
}

export async function render(main, ctx) {
  const usageBox = h('div.meters', { id: 'usage' });
  const subscriptionBox = h('div', { id: 'subscription' });
  const plansBox = h('div.plans', { id: 'plans' });
  const keysList = h('ul.keys', { id: 'api-keys' });
  const newKeyBox = h('div', { id: 'new-key', 'aria-live': 'polite' });
  const keyName = h('input', { type: 'text', id: 'key-name', required: true, maxlength: 100, placeholder: 'e.g. laptop script' });
  const scopeBoxes = SCOPES
    .filter((s) => s !== 'admin' || ctx.user.is_superuser)
    .map((s) => h('label.inline', {}, h('input', { type: 'checkbox', name: 'scope', value: s, checked: s === 'chat' || s === 'search' }), ` ${s}`));
  const keyForm = h('form.row', {},
    field('Name', keyName),
    h('fieldset.scopes', {}, h('legend', {}, 'Scopes'), scopeBoxes),
    h('button.primary', { type: 'submit' }, 'Create key'));

  main.append(h('section.page', { 'aria-labelledby': 'account-title' },
    h('h1#account-title', {}, 'Account'),
    h('section.card', { 'aria-labelledby': 'usage-title' }, h('h2#usage-title', {}, 'This month'), usageBox),
    h('section.card', { 'aria-labelledby': 'plan-title' }, h('h2#plan-title', {}, 'Plan'), subscriptionBox, plansBox),
    h('section.card', { 'aria-labelledby': 'keys-title' },
      h('h2#keys-title', {}, 'API keys'),
      h('p.muted', {}, 'Keys let scripts call the API as you. A key is shown once, when it is made.'),
      keyForm, newKeyBox, keysList)));

  async function loadUsage() {
    const u = await api.get('/billing/usage');
    const meter = (label, used, limit, unit = '') => {
      const pct = limit ? Math.min(100, Math.round((used / limit) * 100)) : 0;
      return h('div.meter', { class: pct >= 90 ? 'high' : '' },
        h('div.meter-label', {}, h('span', {}, label), h('span', {}, `${used}${unit} of ${limit}${unit}`)),
        h('meter', { min: 0, max: limit || 1, value: used, low: (limit || 1) * 0.7, high: (limit || 1) * 0.9, optimum: 0, 'aria-label': `${label}: ${used} of ${limit}` }));
    };
    replace(usageBox,
      meter('Messages', u.messages_this_month, u.limits.messages),
      meter('API calls', u.api_calls_this_month, u.limits.api_calls),
      meter('Background tasks', u.background_tasks_this_month, u.limits.background_tasks),
      meter('Storage', u.storage_mb_used, u.limits.storage_mb, ' MB'),
      h('p.muted.small', {}, `Plan ${u.plan_type}; the month runs ${formatDate(u.period_start)} – ${formatDate(u.period_end)}.`));
  }

  async function loadPlans() {
    const [sub, plans] = await Promise.all([api.get('/billing/subscription'), api.get('/billing/plans')]);
    const pending = sub.upgrade_request;
    replace(subscriptionBox,
      h('p', {}, 'You are on the ', h('strong', { id: 'current-plan' }, sub.plan_type), ` plan (${sub.billing_cycle}, ${sub.status}).`,
        sub.pending_plan ? ` It changes to ${sub.pending_plan} at the end of the period.` : ''),
      pending ? h('p.notice-inline', { id: 'upgrade-pending' },
        `Your request to move to ${pending.plan_type} is waiting for an administrator's approval. `,
        h('button.link', { type: 'button', onclick: withdraw }, 'Withdraw it')) : null,
      sub.upgrade_path === 'approval' && !pending
        ? h('p.muted.small', {}, 'Upgrades are approved by an administrator; you are charged for the rest of the period once approved.')
        : null);
    const order = ['free', 'pro', 'enterprise'];
    replace(plansBox, plans.map((p) => {
      const current = p.plan_type === sub.plan_type;
      const higher = order.indexOf(p.plan_type) > order.indexOf(sub.plan_type);
      return h('article.plan', { class: current ? 'current' : '', 'aria-label': `${p.plan_type} plan` },
        h('h3', {}, p.plan_type),
        h('p.price', {}, p.price_monthly_cents ? `${money(p.price_monthly_cents, p.currency)} / month` : 'Free'),
        h('ul', {},
          h('li', {}, `${p.limits.messages} messages`),
          h('li', {}, `${p.limits.api_calls} API calls`),
          h('li', {}, `${p.limits.background_tasks} background tasks`),
          h('li', {}, `${p.limits.storage_mb} MB storage`),
          p.features.map((f) => h('li', {}, f))),
        current ? h('p.muted', {}, 'Your plan')
          : h('button', {
            type: 'button', class: higher ? 'primary' : '', disabled: !!pending,
            onclick: () => choose(p.plan_type, higher),
          }, higher ? `Upgrade to ${p.plan_type}` : `Move to ${p.plan_type}`));
    }));
  }

  async function choose(plan, higher) {
    if (!higher && !window.confirm(`Move to the ${plan} plan at the end of this period?`)) return;
    try {
      const r = await api.post('/billing/subscription', { plan });
      ctx.notify(r && r.status === 'pending'
        ? `Upgrade to ${plan} requested: an administrator will approve it.`
        : `Plan changed: ${plan}.`);
      await Promise.all([loadPlans(), loadUsage(), api.reloadUser()]);
    } catch (err) {
      ctx.notify(api.describe(err), 'error');
    }
  }

  async function withdraw() {
    try {
      await api.del('/billing/upgrade-request');
      await loadPlans();
    } catch (err) {
      ctx.notify(api.describe(err), 'error');
    }
  }

  async function loadKeys() {
    const keys = await api.get('/auth/api-keys');
    const items = Array.isArray(keys) ? keys : keys.items || [];
    replace(keysList, items.length ? null : h('li.muted', {}, 'No keys.'));
    for (const k of items) {
      keysList.append(h('li', {},
        h('div', {}, h('strong', {}, k.name), ' ', h('code', {}, `${k.prefix}…`),
          h('small.muted', {}, ` ${k.scopes.join(', ')} · made ${formatDate(k.created_at)}`
            + (k.last_used_at ? ` · used ${formatDate(k.last_used_at)}` : ''))),
        h('button.danger.small', {
          type: 'button', 'aria-label': `Revoke key ${k.name}`,
          onclick: async () => {
            if (!window.confirm(`Revoke the key “${k.name}”? Scripts using it stop working.`)) return;
            try {
              await api.del(`/auth/api-keys/${k.id}`);
              loadKeys();
            } catch (err) {
              ctx.notify(api.describe(err), 'error');
            }
          },
        }, 'Revoke')));
    }
  }

  keyForm.addEventListener('submit', async (e) => {
    e.preventDefault();
    const scopes = [...keyForm.querySelectorAll('input[name=scope]:checked')].map((i) => i.value);
    try {
      const k = await api.post('/auth/api-keys', { name: keyName.value.trim(), scopes });
      const value = h('input', { type: 'text', readonly: true, value: k.key, id: 'new-key-value', 'aria-label': 'The new key' });
      replace(newKeyBox, h('div.notice-inline', {},
        h('p', {}, h('strong', {}, 'Copy this key now: '), 'it will not be shown again.'),
        value));
      value.select();
      keyName.value = '';
      loadKeys();
    } catch (err) {
      replace(newKeyBox, h('p.error', { role: 'alert' }, api.describe(err)));
    }
  });

  await Promise.all([loadUsage(), loadPlans(), loadKeys()]);
}
