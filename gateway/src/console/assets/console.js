// The web console's page script: plain JavaScript, no build step, nothing from elsewhere.
// It calls the service API through the console's /api/ (the session cookie says who is
// logged in) and reads /stats for the live charts.
'use strict';

const $ = (id) => document.getElementById(id);
const main = () => $('main');

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) e.append(c instanceof Node ? c : document.createTextNode(String(c ?? '')));
  return e;
}

function status(text, isError) {
  const s = $('status');
  s.textContent = text || '';
  s.className = isError ? 'error' : '';
}

async function call(method, path, body, headers) {
  const h = { 'x-dps-console': '1', ...(headers || {}) };
  if (body !== undefined) h['content-type'] = 'application/json';
  const r = await fetch(path, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body), credentials: 'same-origin' });
  const text = await r.text();
  let value = null;
  try { value = text ? JSON.parse(text) : null; } catch (_) { value = text; }
  if (r.status === 401 && !path.startsWith('/api/')) { showLogin(); throw new Error('log in first'); }
  if (!r.ok) {
    const code = value && value.errorCode ? ` ${value.errorCode}` : '';
    throw new Error(`${r.status}${code}: ${(value && value.message) || text}`);
  }
  return { value, headers: r.headers };
}

const api = (method, path, body, headers) => call(method, '/api' + path, body, headers);

// Every item of a paged query, up to `limit`.
async function queryAll(path, limit) {
  const items = [];
  let next = null;
  do {
    const headers = { 'x-ms-max-item-count': '1000' };
    if (next) headers['x-ms-continuation'] = next;
    const r = await api('POST', path, { query: '*' }, headers);
    items.push(...(r.value || []));
    next = r.headers.get('x-ms-continuation');
  } while (next && items.length < limit);
  return items;
}

const seg = encodeURIComponent;

// ---- login ----

function showLogin() {
  $('login').hidden = false;
  $('nav').hidden = true;
  $('logout').hidden = true;
  $('who').textContent = '';
  main().replaceChildren();
}

async function start() {
  $('login-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    $('login-error').textContent = '';
    const r = await fetch('/login', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ policy: $('policy').value, key: $('key').value }), credentials: 'same-origin' });
    if (!r.ok) { $('login-error').textContent = 'Unknown policy or wrong key.'; return; }
    $('key').value = '';
    await loggedIn();
  });
  $('logout').addEventListener('click', async () => { await call('POST', '/logout').catch(() => {}); showLogin(); });
  window.addEventListener('hashchange', route);
  try { await loggedIn(); } catch (_) { showLogin(); }
}

async function loggedIn() {
  const s = await call('GET', '/session');
  $('login').hidden = true;
  $('nav').hidden = false;
  $('logout').hidden = false;
  $('who').textContent = `${s.value.policy} · ID scope ${s.value.idScope}`;
  await route();
}

// ---- pages ----

let stopLive = null;

async function route() {
  if (stopLive) { stopLive(); stopLive = null; }
  const page = (location.hash || '#enrollments').slice(1);
  for (const a of document.querySelectorAll('nav a')) a.classList.toggle('current', a.getAttribute('href') === '#' + page);
  status('');
  const pages = { enrollments: enrollmentsPage, groups: groupsPage, registrations: registrationsPage, hubs: hubsPage, live: livePage };
  try { await (pages[page] || enrollmentsPage)(); } catch (e) { status(e.message, true); }
}

// Enrollments and groups share one page shape: create, search, and per row
// enable/disable, show keys, delete.
function enrollmentKind(kind) {
  return kind === 'groups'
    ? { title: 'Enrollment groups', collection: '/enrollmentGroups', idField: 'enrollmentGroupId', idLabel: 'Group ID', prefix: 'group' }
    : { title: 'Individual enrollments', collection: '/enrollments', idField: 'registrationId', idLabel: 'Registration ID', prefix: 'enrollment' };
}

async function listPage(kind) {
  const k = enrollmentKind(kind);
  const items = await queryAll(k.collection + '/query', 5000);
  const newId = el('input', { id: `new-${k.prefix}-id`, required: true });
  const newStatus = el('select', { id: `new-${k.prefix}-status` }, el('option', { value: 'enabled' }, 'enabled'), el('option', { value: 'disabled' }, 'disabled'));
  const create = el('form', { class: 'inline', id: `create-${k.prefix}`, onsubmit: async (ev) => {
    ev.preventDefault();
    const id = newId.value.trim();
    const body = { [k.idField]: id, attestation: { type: 'symmetricKey' }, provisioningStatus: newStatus.value };
    try { await api('PUT', `${k.collection}/${seg(id)}`, body); status(`Created ${id}.`); await listPage(kind); } catch (e) { status(e.message, true); }
  } }, el('label', {}, k.idLabel, newId), el('label', {}, 'Status', newStatus), el('button', { type: 'submit' }, 'Create (symmetric key)'));
  const search = el('input', { id: `search-${k.prefix}`, type: 'search', placeholder: `Search by ${k.idLabel.toLowerCase()}` });
  const body = el('tbody');
  const rows = items.map((item) => enrollmentRow(kind, k, item));
  const filter = () => {
    const q = search.value.trim().toLowerCase();
    body.replaceChildren(...rows.filter((r) => r.dataset.id.toLowerCase().includes(q)));
  };
  search.addEventListener('input', filter);
  filter();
  main().replaceChildren(el('h2', {}, k.title), create, el('p', {}, search, ` ${items.length} in all`),
    el('table', { id: `${k.prefix}-table` }, el('thead', {}, el('tr', {}, el('th', {}, k.idLabel), el('th', {}, 'Attestation'), el('th', {}, 'Status'), el('th', {}, 'Hubs'), el('th', {}, 'Actions'), el('th', {}, 'Keys'))), body));
}

function enrollmentRow(kind, k, item) {
  const id = item[k.idField];
  const path = `${k.collection}/${seg(id)}`;
  const keys = el('td', { class: 'keys' });
  const toggle = item.provisioningStatus === 'disabled' ? 'Enable' : 'Disable';
  const tr = el('tr', { 'data-id': id },
    el('td', {}, id),
    el('td', {}, (item.attestation && item.attestation.type) || ''),
    el('td', { class: 'status' }, item.provisioningStatus || 'enabled'),
    el('td', {}, (item.iotHubs || []).join(', ') || (item.iotHubHostName || '')),
    el('td', {},
      el('button', { type: 'button', class: 'toggle', onclick: async () => {
        try {
          const cur = (await api('GET', path)).value;
          cur.provisioningStatus = cur.provisioningStatus === 'disabled' ? 'enabled' : 'disabled';
          await api('PUT', path, cur, { 'if-match': cur.etag });
          status(`${id} is now ${cur.provisioningStatus}.`);
          await listPage(kind);
        } catch (e) { status(e.message, true); }
      } }, toggle),
      el('button', { type: 'button', class: 'show-keys', onclick: async () => {
        try {
          const m = (await api('POST', `${path}/attestationmechanism`)).value;
          const sk = m.symmetricKey;
          const shown = sk ? [el('code', { class: 'key' }, `primary: ${sk.primaryKey}`), el('code', { class: 'key' }, `secondary: ${sk.secondaryKey}`)] : [el('code', { class: 'key' }, JSON.stringify(m))];
          keys.replaceChildren(...shown);
        } catch (e) { status(e.message, true); }
      } }, 'Show keys'),
      el('button', { type: 'button', class: 'delete', onclick: async () => {
        if (!confirm(`Delete ${id}?`)) return;
        try { await api('DELETE', path); status(`Deleted ${id}.`); await listPage(kind); } catch (e) { status(e.message, true); }
      } }, 'Delete')),
    keys);
  return tr;
}

const enrollmentsPage = () => listPage('enrollments');
const groupsPage = () => listPage('groups');

async function registrationsPage() {
  const groups = await queryAll('/enrollmentGroups/query', 5000);
  const pick = el('select', { id: 'registrations-group' }, el('option', { value: '' }, '(choose a group)'), groups.map((g) => el('option', { value: g.enrollmentGroupId }, g.enrollmentGroupId)));
  const lookup = el('input', { id: 'registration-lookup', placeholder: 'registration id' });
  const body = el('tbody');
  const show = (states) => body.replaceChildren(...states.map((r) => el('tr', { 'data-id': r.registrationId },
    el('td', {}, r.registrationId), el('td', {}, r.status), el('td', {}, r.assignedHub || ''), el('td', {}, r.deviceId || ''),
    el('td', {}, r.lastUpdatedDateTimeUtc || ''), el('td', {}, r.errorMessage || ''),
    el('td', {}, el('button', { type: 'button', class: 'delete', onclick: async () => {
      if (!confirm(`Delete the registration of ${r.registrationId}?`)) return;
      try { await api('DELETE', `/registrations/${seg(r.registrationId)}`); status(`Deleted the registration of ${r.registrationId}.`); body.querySelector(`tr[data-id="${CSS.escape(r.registrationId)}"]`)?.remove(); } catch (e) { status(e.message, true); }
    } }, 'Delete')))));
  pick.addEventListener('change', async () => {
    if (!pick.value) return show([]);
    try { const states = await queryAll(`/registrations/${seg(pick.value)}/query`, 5000); show(states); status(`${states.length} registrations in ${pick.value}.`); } catch (e) { status(e.message, true); }
  });
  const find = el('form', { class: 'inline', id: 'registration-find', onsubmit: async (ev) => {
    ev.preventDefault();
    try { show([(await api('GET', `/registrations/${seg(lookup.value.trim())}`)).value]); status(''); } catch (e) { show([]); status(e.message, true); }
  } }, el('label', {}, 'Group', pick), el('label', {}, 'Or one device', lookup), el('button', { type: 'submit' }, 'Find'));
  main().replaceChildren(el('h2', {}, 'Registration states'), find,
    el('table', { id: 'registrations-table' }, el('thead', {}, el('tr', {}, ['Registration ID', 'Status', 'Hub', 'Device ID', 'Last updated', 'Error', ''].map((h) => el('th', {}, h)))), body));
}

async function hubsPage() {
  const [hubs, stats] = await Promise.all([api('GET', '/linkedHubs').then((r) => r.value || []), call('GET', '/stats').then((r) => r.value)]);
  const weight = (h) => (h.applyAllocationPolicy === false ? 0 : (h.allocationWeight ?? 1));
  const total = hubs.reduce((s, h) => s + weight(h), 0);
  const rows = hubs.map((h) => el('tr', { 'data-id': h.name },
    el('td', {}, h.name), el('td', {}, h.kind || 'registry-only'), el('td', {}, weight(h)),
    el('td', { class: 'share' }, total > 0 ? `${(100 * weight(h) / total).toFixed(1)} %` : '–'),
    el('td', {}, (stats.assignmentsByHub || {})[h.name] || 0)));
  main().replaceChildren(el('h2', {}, 'Linked hubs'),
    el('p', {}, 'Share: the part of new devices the evenly weighted distribution sends to each hub (its allocation weight over the sum). Assigned: devices assigned since this service started.'),
    el('table', { id: 'hubs-table' }, el('thead', {}, el('tr', {}, ['Hub', 'Kind', 'Allocation weight', 'Share', 'Assigned'].map((h) => el('th', {}, h)))), el('tbody', {}, rows)));
}

// ---- live charts ----

function drawChart(canvas, points, color, label) {
  const g = canvas.getContext('2d');
  const w = canvas.width, h = canvas.height, pad = 30;
  g.clearRect(0, 0, w, h);
  g.fillStyle = '#fff'; g.fillRect(0, 0, w, h);
  const max = Math.max(1, ...points);
  // The highest rate shown, for whoever reads the page (and its end-to-end test).
  canvas.dataset.peak = String(Math.max(0, ...points));
  g.strokeStyle = '#d8dde3'; g.fillStyle = '#555'; g.font = '11px sans-serif';
  for (let i = 0; i <= 4; i++) {
    const y = h - pad - (i / 4) * (h - 2 * pad);
    g.beginPath(); g.moveTo(pad, y); g.lineTo(w - 5, y); g.stroke();
    g.fillText((max * i / 4).toFixed(max < 10 ? 1 : 0), 2, y + 4);
  }
  g.fillText(label, pad, 14);
  g.strokeStyle = color; g.lineWidth = 2; g.beginPath();
  points.forEach((p, i) => {
    const x = pad + (i / Math.max(1, LIVE_POINTS - 1)) * (w - pad - 5);
    const y = h - pad - (p / max) * (h - 2 * pad);
    if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
  });
  // One sample is a point: a short tick, so a first rate is visible too.
  if (points.length === 1) g.lineTo(pad + 8, h - pad - (points[0] / max) * (h - 2 * pad));
  g.stroke();
}

const LIVE_POINTS = 60;

async function livePage() {
  const regs = el('canvas', { id: 'chart-registrations', width: 560, height: 220 });
  const fails = el('canvas', { id: 'chart-attestation-failures', width: 560, height: 220 });
  const totals = el('p', { class: 'totals', id: 'live-totals' });
  main().replaceChildren(el('h2', {}, 'Live'), totals,
    el('div', { class: 'charts' }, el('figure', {}, regs), el('figure', {}, fails)));
  const rate = [], failRate = [];
  let last = null, alive = true;
  stopLive = () => { alive = false; };
  while (alive) {
    try {
      const s = (await call('GET', '/stats')).value;
      if (last) {
        const dt = Math.max(1e-3, (performance.now() - last.at) / 1000);
        rate.push(Math.max(0, (s.registrations - last.s.registrations) / dt));
        failRate.push(Math.max(0, (s.attestationFailures - last.s.attestationFailures) / dt));
        if (rate.length > LIVE_POINTS) { rate.shift(); failRate.shift(); }
      }
      last = { s, at: performance.now() };
      totals.replaceChildren(
        el('span', {}, `Registrations: ${s.registrations}`), el('span', {}, `failed: ${s.registrationFailures}`),
        el('span', {}, `Attestation failures: ${s.attestationFailures}`), el('span', {}, `Connections open: ${s.connectionsOpen}`));
      drawChart(regs, rate, '#0b6bcb', 'Registrations per second');
      drawChart(fails, failRate, '#c0392b', 'Attestation failures per second');
    } catch (e) { status(e.message, true); }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

start();
