// Sign in and register.

import * as api from '../api.js';
import { h, field, replace } from '../dom.js';

export function render(main) {
  let mode = 'signin';
  const section = h('section.page.narrow', { 'aria-labelledby': 'login-title' });
  main.append(section);

  const draw = () => {
    const registering = mode === 'register';
    const email = h('input', { type: 'email', name: 'email', autocomplete: 'username', required: true, maxlength: 254 });
    const password = h('input', {
      type: 'password', name: 'password', required: true, minlength: registering ? 8 : false, maxlength: 128,
      autocomplete: registering ? 'new-password' : 'current-password',
    });
    const fullName = h('input', { type: 'text', name: 'full_name', autocomplete: 'name', maxlength: 200 });
    const error = h('p.error', { id: 'login-error', role: 'alert' });
    const submit = h('button.primary', { type: 'submit' }, registering ? 'Create account' : 'Sign in');
    const form = h('form', { novalidate: false },
      field('E-mail', email),
      registering ? field('Name (optional)', fullName) : null,
      field('Password', password, registering ? 'At least 8 characters.' : null),
      error,
      submit);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      error.textContent = '';
      submit.disabled = true;
      try {
        if (registering) await api.register(email.value.trim(), password.value, fullName.value.trim());
        else await api.login(email.value.trim(), password.value);
      } catch (err) {
        error.textContent = messageOf(err);
        submit.disabled = false;
        password.focus();
      }
    });
    replace(section,
      h('h1#login-title', {}, registering ? 'Create an account' : 'Sign in to ragchat'),
      form,
      h('p.switch', {}, registering ? 'Already have an account? ' : 'New here? ',
        h('button.link', { type: 'button', onclick: () => { mode = registering ? 'signin' : 'register'; draw(); } },
          registering ? 'Sign in' : 'Create an account')));
    email.focus();
  };
  draw();
}

function messageOf(err) {
  if (err instanceof api.ApiError) {
    if (err.code === 'rate_limited' || err.status === 429) {
      return `Too many attempts. Try again in ${err.retryAfter || 'a few'} seconds.`;
    }
    if (err.status === 422 && Array.isArray(err.detail)) {
      return err.detail.map((d) => d.msg || JSON.stringify(d)).join(' ');
    }
  }
  return api.describe(err);
}
