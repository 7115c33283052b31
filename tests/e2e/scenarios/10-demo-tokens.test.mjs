// Scenario 10: the demo page in token mode, in Chromium. replisync verifies tokens
// (REPLISYNC_JWT_SECRET); the demo server, started with the same secret, hands out dev tokens
// at /dev-token. Two users (two browser contexts) on one space see each other's clicks live
// (SSE with ?auth=); every push and pull carries `Authorization: Bearer ...`; when a page's
// token has expired, Replicache's getAuth fetches a new one and the clicks still land once.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { E2E, JWT_SECRET, bearer, ensureArtifactsDir, realFetch, signToken, uniqueId } from '../harness.mjs';

function claimsOf(token) {
  return JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString());
}

test('10. the demo in token mode: two users, live clicks, token renewal', { timeout: 180_000 }, async (t) => {
  const env = new E2E();
  t.after(() => env.cleanup());

  const server = await env.startReplisync({ jwtSecret: JWT_SECRET });
  const demo = await env.startDemo(server, { env: { REPLISYNC_JWT_SECRET: JWT_SECRET } });
  await demo.proc.waitForLine(/token mode/, { timeout: 5_000, message: 'the demo server to say it is in token mode' });
  const space = uniqueId('demo-');

  // Without a token replisync refuses the space.
  assert.equal((await server.pullRaw(space)).status, 401);

  // The dev token endpoint: a short-lived token for that user and space, which replisync
  // accepts for that space only.
  const res = await realFetch(`${demo.url}dev-token?user=carol&space=${space}`);
  assert.equal(res.status, 200);
  const issued = await res.json();
  const claims = claimsOf(issued.token);
  assert.equal(claims.sub, 'carol');
  assert.deepEqual(claims.spaces, [space]);
  const ttl = claims.exp - Math.floor(Date.now() / 1000);
  assert.ok(ttl > 0 && ttl <= 300, `token lifetime ${ttl} s`);
  assert.equal((await server.pullRaw(space, { auth: bearer(issued.token) })).status, 200);
  assert.equal((await server.pullRaw(`${space}-x`, { auth: bearer(issued.token) })).status, 403);
  assert.equal((await realFetch(`${demo.url}dev-token?user=&space=${space}`)).status, 400);

  const browser = await env.browser();
  const users = ['alice', 'bob'];
  const problems = [];
  const pages = [];
  const seen = [[], []]; // replisync requests of each page: {kind, status, authorization}
  for (let i = 0; i < 2; i++) {
    const context = await browser.newContext({ viewport: { width: 640, height: 480 } });
    const page = await context.newPage();
    page.setDefaultTimeout(15_000);
    page.on('pageerror', (e) => problems.push(`page ${i + 1}: ${e.message}`));
    page.on('console', (m) => {
      // The expected 401 of the renewal step shows up as a failed resource load.
      if (m.type() === 'error' && !/401|Unauthorized/.test(m.text())) {
        problems.push(`page ${i + 1} console: ${m.text()}`);
      }
    });
    page.on('response', async (r) => {
      const m = /\/spaces\/[^/]+\/(push|pull|poke)/.exec(r.url());
      if (!m || r.request().method() === 'OPTIONS') return;
      seen[i].push({
        kind: m[1],
        url: r.url(),
        status: r.status(),
        authorization: await r.request().headerValue('authorization'),
      });
    });
    await page.goto(`${demo.url}counter.html?space=${space}&user=${users[i]}`);
    pages.push(page);
  }
  const [p1, p2] = pages;
  try {
    await clickAndWatch();
  } catch (e) {
    e.message +=
      `\npage problems: ${JSON.stringify(problems)}\nrequests: ${JSON.stringify(seen.map((s) => s.map((r) => `${r.kind} ${r.status}`)))}` +
      `\nreplisync log tail:\n${server.lines.slice(-15).join('\n')}`;
    throw e;
  }
  assert.deepEqual(problems, [], 'no page errors');

  async function clickAndWatch() {
    for (let i = 0; i < 2; i++) {
      const page = pages[i];
      await page.locator('#status[data-sse="open"]').waitFor();
      await page.locator('#count', { hasText: /^0$/ }).waitFor();
      await page.locator('#user', { hasText: users[i] }).waitFor();
      assert.equal(await page.evaluate(() => window.rep.name), `counter/${users[i]}/${space}`);
      await page.evaluate(() => {
        window.__e2eNoReload = true;
      });
    }

    // A click in Alice's page appears in Bob's.
    await p1.click('#increment');
    await p1.locator('#count', { hasText: /^1$/ }).waitFor({ timeout: 5_000 });
    await p2.locator('#count', { hasText: /^1$/ }).waitFor({ timeout: 10_000 });

    // Bob's token expires: his next push is answered 401, getAuth fetches a new token from
    // /dev-token, and the push is retried.
    const fetchesBefore = await p2.evaluate(() => window.demoTokenFetches);
    const expired = bearer(signToken({ sub: 'bob', spaces: [space] }, { ttl: -60 }));
    await p2.evaluate((auth) => {
      window.rep.auth = auth;
    }, expired);
    const mark = seen[1].length;
    await p2.click('#increment');
    await p2.click('#increment');
    await p1.locator('#count', { hasText: /^3$/ }).waitFor({ timeout: 10_000 });
    await p2.locator('#count', { hasText: /^3$/ }).waitFor({ timeout: 10_000 });
    assert.ok(
      (await p2.evaluate(() => window.demoTokenFetches)) > fetchesBefore,
      "Bob's page fetched no new token",
    );
    // (The 401 usually answers the push; a pull that overtakes it may take it instead.)
    const afterExpiry = seen[1].slice(mark).filter((r) => r.kind !== 'poke');
    assert.ok(
      afterExpiry.some((r) => r.status === 401 && r.authorization === expired),
      `no request with the expired token was answered 401: ${JSON.stringify(afterExpiry)}`,
    );
    assert.ok(
      afterExpiry.some((r) => r.kind === 'push' && r.status === 200 && r.authorization !== expired),
      'no push succeeded with a renewed token',
    );
    assert.notEqual(await p2.evaluate(() => window.rep.auth), expired);

    // Every push and pull carried a bearer token; the SSE streams carried theirs in the URL.
    for (let i = 0; i < 2; i++) {
      const sync = seen[i].filter((r) => r.kind !== 'poke');
      assert.ok(sync.length >= 2, `page ${i + 1} made ${sync.length} pushes and pulls`);
      for (const r of sync) assert.match(r.authorization ?? '', /^Bearer \S+\.\S+\.\S+$/);
      const pokes = seen[i].filter((r) => r.kind === 'poke');
      assert.ok(pokes.length >= 1 && pokes.every((r) => /\?auth=[^&]+/.test(r.url)), 'SSE without ?auth=');
    }
    for (const page of pages) {
      assert.equal(await page.evaluate(() => window.__e2eNoReload), true, 'the page was not reloaded');
    }
    assert.deepEqual((await server.snapshot(space, { auth: bearer(issued.token) })).data, { count: 3 });

    const dir = ensureArtifactsDir();
    for (let i = 0; i < 2; i++) {
      const file = path.join(dir, `demo-tokens-page-${i + 1}.png`);
      await pages[i].screenshot({ path: file });
      t.diagnostic(`screenshot: ${path.relative(process.cwd(), file)}`);
    }
  }

  // Without a secret the demo serves no tokens (anonymous mode, as in scenario 8).
  const anonymous = await env.startDemo(server);
  assert.equal((await realFetch(`${anonymous.url}dev-token?user=alice&space=${space}`)).status, 404);
});
