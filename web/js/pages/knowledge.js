// Knowledge: upload files (drag and drop, progress per file, the server's error
// beside the file), list, search and delete documents.

import * as api from '../api.js';
import { h, replace, field, formatDate, formatBytes } from '../dom.js';

const ACCEPT = '.txt,.md,.markdown,.html,.htm,.pdf,.jsonl';
const PAGE = 20;

export async function render(main, ctx) {
  const timers = new Set();
  let offset = 0;

  const visibility = h('select', { id: 'visibility' },
    h('option', { value: 'private' }, 'Private (only me)'),
    h('option', { value: 'organization' }, 'My organization'),
    ctx.user.is_superuser ? h('option', { value: 'global' }, 'Everyone (global)') : null);
  const fileInput = h('input', { type: 'file', id: 'file-input', multiple: true, accept: ACCEPT, class: 'visually-hidden' });
  const drop = h('div.dropzone', { id: 'dropzone' },
    h('p', {}, 'Drop files here or ', h('label.button', { for: 'file-input' }, 'choose files')),
    h('p.muted.small', {}, 'Text, Markdown, HTML, PDF, or JSONL (one document per line).'),
    fileInput);
  const uploads = h('ul.uploads', { id: 'uploads', 'aria-label': 'Uploads', 'aria-live': 'polite' });

  const query = h('input', { type: 'search', id: 'doc-search', maxlength: 1000, placeholder: 'Search your knowledge base' });
  const searchForm = h('form.row', { role: 'search' }, field('Search', query), h('button', { type: 'submit' }, 'Search'));
  const results = h('ol.results', { id: 'search-results' });
  const list = h('ul.documents', { id: 'documents' });
  const reindexState = h('span.state', { id: 'reindex-state', 'aria-live': 'polite' });
  const reindex = h('button', { type: 'button', id: 'reindex', onclick: () => startReindex() }, 'Re-index my documents');
  const pager = h('div.pager');

  main.append(h('section.page', { 'aria-labelledby': 'kb-title' },
    h('h1#kb-title', {}, 'Knowledge'),
    h('section.card', { 'aria-labelledby': 'upload-title' },
      h('h2#upload-title', {}, 'Add documents'),
      field('Who can read them', visibility),
      drop, uploads),
    h('section.card', { 'aria-labelledby': 'search-title' },
      h('h2#search-title', {}, 'Search'), searchForm, results),
    h('section.card', { 'aria-labelledby': 'docs-title' },
      h('h2#docs-title', {}, 'Documents'), list, pager,
      h('p.row', {}, reindex, reindexState),
      h('p.muted.small', {}, 'Re-indexing cuts and embeds your private documents again with the server\'s current settings, '
        + 'in the background (one background task of your plan); search keeps working meanwhile.'))));

  // ---- uploads ----
  for (const ev of ['dragenter', 'dragover']) {
    drop.addEventListener(ev, (e) => {
      e.preventDefault();
      drop.classList.add('over');
    });
  }
  for (const ev of ['dragleave', 'drop']) drop.addEventListener(ev, () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    uploadAll([...e.dataTransfer.files]);
  });
  fileInput.addEventListener('change', () => {
    uploadAll([...fileInput.files]);
    fileInput.value = '';
  });

  async function uploadAll(files) {
    // One at a time: the server embeds them one after another anyway.
    for (const file of files) await uploadOne(file);
    loadDocuments();
  }

  async function uploadOne(file) {
    const bar = h('progress', { max: 100, value: 0, 'aria-label': `Upload of ${file.name}` });
    const state = h('span.state', {}, 'uploading…');
    const row = h('li.upload', { dataset: { file: file.name } },
      h('span.name', {}, file.name), h('small.muted', {}, formatBytes(file.size)), bar, state);
    uploads.prepend(row);
    try {
      const { status, body } = await api.upload(file, { visibility: visibility.value }, (f) => {
        bar.value = Math.round(f * 100);
        if (f >= 1) state.textContent = 'indexing…';
      });
      bar.value = 100;
      if (status === 202) {
        state.textContent = 'queued as a background job…';
        await followJob(body, state);
      } else {
        const created = body.created ?? 1;
        const dups = body.duplicates ?? (body.duplicate ? 1 : 0);
        state.textContent = created ? `stored (${created} document${created === 1 ? '' : 's'})` : 'already stored';
        if (dups && created) state.textContent += `, ${dups} already stored`;
        row.classList.add('ok');
      }
    } catch (err) {
      bar.remove();
      row.classList.add('failed');
      replace(state, h('span.error', { role: 'alert' }, api.describe(err)));
    }
  }

  function followJob(job, state, field = 'documents_created', verb = 'stored') {
    return new Promise((resolve) => {
      const show = (j) => {
        state.textContent = `${j.state}: ${j[field] ?? 0} of ${j.documents_total} ${verb}`
          + (j.documents_failed ? `, ${j.documents_failed} failed` : '');
      };
      show(job);
      const timer = setInterval(async () => {
        try {
          const j = await api.get(`/knowledge/jobs/${job.id}`);
          show(j);
          if (!['queued', 'running'].includes(j.state)) {
            clearInterval(timer);
            timers.delete(timer);
            loadDocuments();
            resolve();
          }
        } catch (err) {
          clearInterval(timer);
          timers.delete(timer);
          state.textContent = api.describe(err);
          resolve();
        }
      }, 1000);
      timers.add(timer);
    });
  }

  async function startReindex() {
    reindex.disabled = true;
    try {
      const job = await api.post('/knowledge/reindex', {});
      await followJob(job, reindexState, 'documents_done', 're-indexed');
    } catch (err) {
      replace(reindexState, h('span.error', { role: 'alert' }, api.describe(err)));
    }
    reindex.disabled = false;
  }

  // ---- search ----
  searchForm.addEventListener('submit', async (e) => {
    e.preventDefault();
    const q = query.value.trim();
    if (!q) {
      replace(results);
      return;
    }
    try {
      const data = await api.post('/knowledge/search', { query: q, top_k: 5 });
      replace(results, data.results.length
        ? data.results.map((r) => h('li', {},
          h('p.source-title', {}, r.title || 'Untitled'),
          h('p.excerpt', {}, r.content.length > 400 ? `${r.content.slice(0, 400)}…` : r.content),
          h('p.muted.small', {}, `relevance ${(r.relevance ?? 0).toFixed(2)}`,
            r.source_type ? ` · ${r.source_type}` : '',
            r.source ? ` · ${r.source}` : '')))
        : h('li.muted', {}, 'Nothing found.'));
    } catch (err) {
      replace(results, h('li.error', { role: 'alert' }, api.describe(err)));
    }
  });

  // ---- documents ----
  async function loadDocuments() {
    let data;
    try {
      data = await api.get(`/knowledge/documents?offset=${offset}&limit=${PAGE}`);
    } catch (err) {
      replace(list, h('li.error', {}, api.describe(err)));
      return;
    }
    replace(list, data.items.length ? null : h('li.muted', {}, 'No documents yet.'));
    for (const d of data.items) {
      // The server decides (another member's organization document answers 403); global ones are admins'.
      const canDelete = d.visibility !== 'global' || ctx.user.is_superuser;
      list.append(h('li.document', {},
        h('div', {},
          h('p.source-title', {}, d.title || 'Untitled'),
          h('small.muted', {}, [d.visibility, d.source, formatBytes(d.size_bytes || 0), `${d.chunk_count} chunks`, formatDate(d.created_at)].filter(Boolean).join(' · '))),
        canDelete ? h('button.danger.small', {
          type: 'button', 'aria-label': `Delete ${d.title || 'document'}`,
          onclick: async () => {
            if (!window.confirm(`Delete “${d.title || 'this document'}” and its chunks?`)) return;
            try {
              await api.del(`/knowledge/documents/${d.id}`);
              loadDocuments();
            } catch (err) {
              ctx.notify(api.describe(err), 'error');
            }
          },
        }, 'Delete') : null));
    }
    replace(pager,
      h('button', { type: 'button', disabled: offset === 0, onclick: () => { offset = Math.max(0, offset - PAGE); loadDocuments(); } }, 'Newer'),
      h('span.muted', {}, data.total ? `${offset + 1}–${Math.min(offset + PAGE, data.total)} of ${data.total}` : ''),
      h('button', { type: 'button', disabled: offset + PAGE >= data.total, onclick: () => { offset += PAGE; loadDocuments(); } }, 'Older'));
  }

  await loadDocuments();
  return () => timers.forEach(clearInterval);
}
