// The web console in headless Chromium (Debian's /usr/bin/chromium) driven by Playwright:
// log in, use every page, take a screenshot of each. Prints `ok STEP` per step that passed;
// gateway/tests/console.rs starts the service, runs this, and checks the outcome through the
// service API. Env: CONSOLE_URL, CONSOLE_POLICY, CONSOLE_KEY, SHOTS (a directory).
'use strict';
const { chromium } = require('playwright-core');
const path = require('path');

const url = process.env.CONSOLE_URL;
const shots = process.env.SHOTS;
const ok = (step) => console.log(`ok ${step}`);

// One device registration over HTTPS signed with a key no enrollment has (answered 401).
function wrongKeyRegistration(id) {
  const https = require('https');
  const crypto = require('crypto');
  const scope = process.env.ID_SCOPE;
  const sr = encodeURIComponent(`${scope}/registrations/${id}`);
  const se = Math.floor(Date.now() / 1000) + 600;
  const sig = crypto.createHmac('sha256', Buffer.from('d3Jvbmcta2V5LXdyb25nLWtleQ==', 'base64')).update(`${sr}\n${se}`).digest('base64');
  const token = `SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(sig)}&se=${se}&skn=registration`;
  const body = JSON.stringify({ registrationId: id });
  return new Promise((resolve, reject) => {
    const req = https.request({ host: '127.0.0.1', servername: 'localhost', port: Number(process.env.DEVICE_PORT), method: 'PUT',
      path: `/${scope}/registrations/${id}/register?api-version=2019-03-31`, ca: require('fs').readFileSync(process.env.CA_CERT),
      headers: { authorization: token, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } }, (res) => {
      res.resume();
      res.on('end', () => (res.statusCode === 401 ? resolve() : reject(new Error(`register answered ${res.statusCode}`))));
    });
    req.on('error', reject);
    req.end(body);
  });
}

let failureContext = async () => '';

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    // This machine has no network beyond loopback: no background fetches (they would be
    // refused), no sandbox (tests run as root).
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  try {
    // The console's certificate is from the service's development CA; this browser profile
    // does not hold it, so certificate errors are ignored here (the Rust side checks TLS).
    const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 800 } });
    const page = await context.newPage();
    page.setDefaultTimeout(15000);
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
    failureContext = async () => `${await shot('failure').then(() => 'failure.png taken', () => 'no screenshot')}; page status: ${await page.textContent('#status').catch(() => '?')}; errors: ${errors.join('; ')}`;
    const shot = (name) => page.screenshot({ path: path.join(shots, `${name}.png`) });

    await page.goto(url);
    await page.waitForSelector('#login:not([hidden])');
    await shot('login');

    await page.fill('#policy', process.env.CONSOLE_POLICY);
    await page.fill('#key', 'd3Jvbmcta2V5LXdyb25nLWtleQ==');
    await page.click('#login-button');
    await page.waitForFunction(() => document.getElementById('login-error').textContent.includes('wrong key'));
    ok('login-refused-with-wrong-key');

    await page.fill('#key', process.env.CONSOLE_KEY);
    await page.click('#login-button');
    await page.waitForSelector('#nav:not([hidden])');
    await page.waitForFunction((p) => document.getElementById('who').textContent.includes(p), process.env.CONSOLE_POLICY);
    ok('logged-in');

    const row = (table, id) => `#${table} tr[data-id="${id}"]`;
    await page.waitForSelector(row('enrollment-table', 'sensor-1'));
    ok('enrollments-listed');

    await page.fill('#new-enrollment-id', 'console-made-1');
    await page.click('#create-enrollment button[type=submit]');
    await page.waitForSelector(row('enrollment-table', 'console-made-1'));
    ok('enrollment-created');

    await page.click(`${row('enrollment-table', 'sensor-1')} button.toggle`);
    await page.waitForFunction(() => document.querySelector('#enrollment-table tr[data-id="sensor-1"] td.status')?.textContent === 'disabled');
    ok('enrollment-disabled');

    await page.click(`${row('enrollment-table', 'console-made-1')} button.show-keys`);
    await page.waitForFunction(() => /primary: [A-Za-z0-9+/=]{20,}/.test(document.querySelector('#enrollment-table tr[data-id="console-made-1"] td.keys')?.textContent || ''));
    ok('keys-shown');
    await shot('enrollments');

    await page.fill('#search-enrollment', 'console-');
    await page.waitForFunction(() => {
      const ids = [...document.querySelectorAll('#enrollment-table tbody tr')].map((r) => r.dataset.id);
      return ids.length === 1 && ids[0] === 'console-made-1';
    });
    ok('search-filters');

    await page.click('#nav-groups');
    await page.waitForSelector(row('group-table', 'line-7'));
    ok('groups-listed');
    await shot('groups');

    await page.click('#nav-registrations');
    await page.waitForSelector('#registrations-group option[value="line-7"]', { state: 'attached' });
    await page.selectOption('#registrations-group', 'line-7');
    await page.waitForFunction(() => {
      const rows = [...document.querySelectorAll('#registrations-table tbody tr')];
      return rows.length === 2 && rows.every((r) => r.children[1].textContent === 'assigned' && r.children[2].textContent === 'hub-a.example');
    });
    ok('registrations-listed');
    await shot('registrations');

    await page.click('#nav-hubs');
    await page.waitForFunction(() => {
      const r = document.querySelector('#hubs-table tr[data-id="hub-a.example"]');
      return r && r.querySelector('td.share').textContent === '100.0 %' && r.children[4].textContent === '2';
    });
    ok('hubs-listed');
    await shot('hubs');

    await page.click('#nav-live');
    await page.waitForFunction(() => {
      const t = document.getElementById('live-totals')?.textContent || '';
      return t.includes('Registrations: 3') && t.includes('Attestation failures: 1');
    });
    // Devices knocking with a wrong key while the page watches: the failure chart rises.
    for (let i = 0; i < 5; i++) await wrongKeyRegistration(`intruder-live-${i}`);
    await page.waitForFunction(() => Number(document.getElementById('chart-attestation-failures').dataset.peak) > 0
      && Number(document.getElementById('chart-registrations').dataset.peak) > 0
      && (document.getElementById('live-totals')?.textContent || '').includes('Attestation failures: 6'));
    const drawn = await page.evaluate(() => ['chart-registrations', 'chart-attestation-failures'].map((id) => {
      const c = document.getElementById(id);
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let coloured = 0;
      for (let i = 0; i < d.length; i += 4) if (Math.abs(d[i] - d[i + 2]) > 60) coloured++;
      return coloured;
    }));
    if (!drawn.every((n) => n > 0)) throw new Error(`charts not drawn: ${drawn}`);
    ok('live-charts');
    await shot('live');

    await page.click('#logout');
    await page.waitForSelector('#login:not([hidden])');
    const after = await page.evaluate(async () => (await fetch('/stats', { headers: { 'x-dps-console': '1' } })).status);
    if (after !== 401) throw new Error(`after logout /stats answered ${after}`);
    ok('logged-out');
    // The wrong-key login logs a 401 resource error in the browser; nothing else may fail.
    const unexpected = errors.filter((e) => !e.includes('401'));
    if (unexpected.length) throw new Error(`errors on the page: ${unexpected.join('; ')}`);
  } catch (e) {
    throw new Error(`${e.message}\n${await failureContext()}`);
  } finally {
    await browser.close();
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
