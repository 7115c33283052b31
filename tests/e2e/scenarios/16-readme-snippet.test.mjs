// Scenario 16: the README's client code ("## Connect a Replicache app") works as written. Its js
// blocks are read from README.md at test time and run verbatim in two Chromium pages.
//
// The pages get only what the README says the app provides: `userID`, `fetchToken()` (tokens
// signed like the app's backend would, counted per user) and the `replicache` package (an import
// map onto tests/e2e/node_modules, after `process.env.NODE_ENV`, as the README asks of a page
// without a bundler). The snippet's `server` (http://127.0.0.1:8080) is mapped by Chromium
// (--host-rules) onto this test's replisync, so no port has to be free. One line is appended to
// the module, `window.rep = rep;` (and `window.pusher = pusher;` in 16b), for the test to use.
// Every request and SSE message of a page is traced through the DevTools protocol (one ordered
// stream per page), which shows that a page pulls because a poke came, and which token went where.
// The Pusher block runs too (test 16b), as far as it can without a Pusher-compatible server:
// pusher-js gets its private channel signed by replisync with the current token; pokes through
// Pusher need sockudo (scenarios 06 and 09).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { readFile, stat } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { createHmac, randomUUID } from 'node:crypto';
import path from 'node:path';
import {
  E2E, E2E_DIR, JWT_SECRET, PUSHER_APP, REPO_DIR, bearer, freePort, signToken, waitFor,
} from '../harness.mjs';

const SECTION = '## Connect a Replicache app';
const SECTION_END = '### Spaces';
/** Lifetime of Bob's tokens: short, so that his SSE stream ends and is reopened during the test. */
const BOB_TOKEN_TTL_SECS = 6;

/** The js code blocks of the README's section, split into the app's code and the Pusher block. */
function readmeSnippet() {
  const readme = readFileSync(path.join(REPO_DIR, 'README.md'), 'utf8');
  const start = readme.indexOf(`\n${SECTION}\n`);
  const end = readme.indexOf(`\n${SECTION_END}\n`, start);
  assert.ok(start >= 0 && end > start, `README.md has no section "${SECTION}" followed by "${SECTION_END}"`);
  const blocks = [...readme.slice(start, end).matchAll(/^```js\n([\s\S]*?)^```$/gm)].map((m) => m[1]);
  const pusher = blocks.filter((b) => b.includes('new Pusher('));
  const app = blocks.filter((b) => !b.includes('new Pusher('));
  assert.ok(app.length >= 1, `no js block without Pusher in the README's "${SECTION}"`);
  assert.equal(pusher.length, 1, `expected one Pusher block in the README's "${SECTION}"`);
  return { app: app.join('\n'), pusher: pusher[0] };
}

/** What the snippet says about where replisync is and which space it uses. */
function snippetTargets(code) {
  const server = /const server = "http:\/\/127\.0\.0\.1:(\d+)"/.exec(code);
  const space = /const space = "([A-Za-z0-9_-]{1,100})"/.exec(code);
  assert.ok(server, 'the snippet no longer says `const server = "http://127.0.0.1:PORT"`: adapt this test');
  assert.ok(space, 'the snippet no longer says `const space = "NAME"`: adapt this test');
  return { port: Number(server[1]), space: space[1] };
}

/** The browser-side packages: replicache and what its ES module build imports. */
const PACKAGES = ['replicache', '@rocicorp/logger', '@rocicorp/lock', '@rocicorp/resolver', '@badrap/valita'];

function importMap() {
  const imports = {};
  for (const name of PACKAGES) {
    const pkg = JSON.parse(readFileSync(path.join(E2E_DIR, 'node_modules', name, 'package.json'), 'utf8'));
    imports[name] = `/vendor/${name}/${(pkg.module ?? pkg.main).replace(/^\.\//, '')}`;
  }
  return { imports };
}

/**
 * The page: what the README says a page without a bundler sets up, what the app provides
 * (userID, fetchToken) as globals, then the snippet as a module.
 */
function pageHtml(user, extraHead) {
  return `<!doctype html>
<meta charset="utf-8">
<title>README snippet</title>
<script>
  // What the README asks of a page without a bundler: process.env.NODE_ENV, then an import map.
  window.process ??= { env: { NODE_ENV: 'production' } };
</script>
<script type="importmap">${JSON.stringify(importMap())}</script>
<script>
  const userID = ${JSON.stringify(user)};
  async function fetchToken() {
    const res = await fetch('/token?user=' + encodeURIComponent(userID), { cache: 'no-store' });
    if (!res.ok) throw new Error('/token answered ' + res.status);
    return (await res.json()).token;
  }
</script>
${extraHead}
<script type="module" src="/app.js"></script>
`;
}

/** Packages the pages may load from tests/e2e/node_modules: those of the import map, pusher-js. */
const VENDORED = [...PACKAGES, 'pusher-js'];

/**
 * Serves the pages (`extraHead` goes into each), the snippet module `appCode`, the vendored
 * packages and the app's tokens for `space` (Bob's short-lived). `issued[user]` lists the
 * tokens handed out, oldest first.
 */
async function startAppServer(env, { appCode, space, extraHead = '' }) {
  const issued = { alice: [], bob: [] };
  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, 'http://localhost');
    const send = (status, type, body) => {
      res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
      res.end(body);
    };
    if (url.pathname === '/') {
      return send(200, 'text/html; charset=utf-8', pageHtml(url.searchParams.get('user'), extraHead));
    }
    if (url.pathname === '/app.js') return send(200, 'text/javascript; charset=utf-8', appCode);
    if (url.pathname === '/token') {
      const user = url.searchParams.get('user');
      if (!issued[user]) return send(403, 'text/plain', 'unknown user\n');
      const ttl = user === 'bob' ? BOB_TOKEN_TTL_SECS : 300;
      // A `jti` makes every token distinct, even two signed within the same second.
      const token = signToken({ sub: user, spaces: [space], jti: randomUUID() }, { ttl });
      issued[user].push(token);
      return send(200, 'application/json', JSON.stringify({ token }));
    }
    const m = /^\/vendor\/((?:@[^/]+\/)?[^/]+)\/(.+)$/.exec(url.pathname);
    if (m && VENDORED.includes(m[1])) {
      const root = path.join(E2E_DIR, 'node_modules', m[1]);
      const file = path.resolve(root, path.posix.normalize(m[2]));
      if (file.startsWith(root + path.sep) && (await stat(file).catch(() => null))?.isFile()) {
        return send(200, 'text/javascript; charset=utf-8', await readFile(file));
      }
    }
    return send(404, 'text/plain', 'not found\n');
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  env.defer(() => {
    server.closeAllConnections();
    return new Promise((resolve) => server.close(resolve));
  });
  return { url: `http://127.0.0.1:${server.address().port}`, issued };
}

/** Chromium with the snippet's `server` mapped onto the real replisync. */
async function launchChromium(env, snippetPort, realPort) {
  const deadPort = await freePort();
  const { chromium } = await import('playwright-core');
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM_PATH ?? '/usr/bin/chromium',
    headless: true,
    timeout: 60_000,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      // pusher-js (test 16b) connects to its cluster's hosts: they go to a loopback port where
      // nothing listens, so the page never reaches beyond this machine.
      `--host-rules=MAP 127.0.0.1:${snippetPort} 127.0.0.1:${realPort}, MAP *.pusher.com 127.0.0.1:${deadPort}`,
    ],
  });
  env.defer(() => browser.close());
  return browser;
}

/**
 * Opens the page of `user` in its own context and traces it: `trace` receives, in the order the
 * browser saw them, {type: 'request', kind: push|pull|poke|pusher-auth, id, auth} (auth: the header, or the
 * `?auth=` of a poke stream), {type: 'response', id, kind, status} and {type: 'sse', id, event}.
 */
async function openPage(browser, appUrl, user, problems) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  page.on('pageerror', (e) => problems.push(`${user}: ${e.message}`));
  const trace = [];
  const kinds = new Map();
  const cdp = await context.newCDPSession(page);
  cdp.on('Network.requestWillBeSent', ({ requestId, request }) => {
    const m = /\/(?:spaces\/[^/]+\/(push|pull|poke)|pusher\/(auth))(\?.*)?$/.exec(request.url);
    if (!m || request.method === 'OPTIONS') return;
    const kind = m[1] ?? 'pusher-auth';
    kinds.set(requestId, kind);
    const headers = request.headers;
    const auth =
      kind === 'poke' ? new URLSearchParams(m[3] ?? '').get('auth') : (headers.Authorization ?? headers.authorization);
    trace.push({ type: 'request', kind, id: requestId, auth });
  });
  cdp.on('Network.responseReceived', ({ requestId, response }) => {
    if (!kinds.has(requestId)) return;
    trace.push({ type: 'response', id: requestId, kind: kinds.get(requestId), status: response.status });
  });
  cdp.on('Network.eventSourceMessageReceived', ({ requestId, eventName }) => {
    trace.push({ type: 'sse', id: requestId, event: eventName });
  });
  await cdp.send('Network.enable');
  await page.goto(`${appUrl}/?user=${user}`);
  return { user, page, trace };
}

const statusOf = (trace, id) => trace.find((e) => e.type === 'response' && e.id === id)?.status;

/** A poke stream was opened (200), a pull was made after that, and every pull was answered. */
function settled(trace) {
  const open = trace.findIndex((e) => e.type === 'response' && e.kind === 'poke' && e.status === 200);
  const pulls = trace.filter((e) => e.type === 'request' && e.kind === 'pull');
  return (
    open >= 0 &&
    trace.slice(open).some((e) => e.type === 'request' && e.kind === 'pull') &&
    pulls.every((e) => statusOf(trace, e.id) !== undefined)
  );
}

/** Reads `key` in the page's Replicache. */
const read = (p, key) => p.page.evaluate((k) => window.rep.query((tx) => tx.get(k)), key);

test('16. the README client snippet runs verbatim: sync, pokes, token renewal', { timeout: 180_000 }, async (t) => {
  const env = new E2E();
  t.after(() => env.cleanup());

  const snippet = readmeSnippet();
  const { port: snippetPort, space } = snippetTargets(snippet.app);

  const server = await env.startReplisync({ jwtSecret: JWT_SECRET });
  const app = await startAppServer(env, { appCode: `${snippet.app}\nwindow.rep = rep;\n`, space });
  const browser = await launchChromium(env, snippetPort, server.port);
  const problems = [];
  const alice = await openPage(browser, app.url, 'alice', problems);
  const bob = await openPage(browser, app.url, 'bob', problems);

  const noProblems = () => {
    if (problems.length) throw Object.assign(new Error(`page errors: ${problems.join('; ')}`), { fatal: true });
  };
  const explain = (e) => {
    e.message +=
      `\npage errors: ${JSON.stringify(problems)}` +
      `\nalice: ${summary(alice.trace)}\nbob: ${summary(bob.trace)}` +
      `\nreplisync log tail:\n${server.lines.slice(-15).join('\n')}`;
    throw e;
  };
  try {
    // Both pages start: the snippet opened its poke stream, pulled on its open event, and no
    // pull is still running (so that the next pulls are the pokes' doing).
    for (const p of [alice, bob]) {
      await waitFor(
        async () => {
          noProblems();
          return (await p.page.evaluate(() => Boolean(window.rep))) && settled(p.trace);
        },
        { timeout: 20_000, message: `${p.user}'s page to pull and open its poke stream` },
      );
      assert.equal(await p.page.evaluate(() => window.rep.name), `${p.user}/${space}`);
      // Replicache's default: a timer pull only every 60 s, so quicker pulls come from pokes.
      assert.equal(await p.page.evaluate(() => window.rep.pullInterval), 60_000);
    }
    assert.equal(app.issued.alice.length, 1, 'alice fetched one token at start-up');

    // Bob's increment reaches Alice: a poke arrives on her stream and only then does she pull.
    const mark = alice.trace.length;
    await bob.page.evaluate(() => window.rep.mutate.increment({ key: 'count', delta: 2 }));
    await waitFor(async () => (noProblems(), (await read(alice, 'count')) === 2), {
      message: "Bob's increment in Alice's page",
    });
    const after = alice.trace.slice(mark);
    const firstPoke = after.findIndex((e) => e.type === 'sse' && e.event === 'poke');
    const firstPull = after.findIndex((e) => e.type === 'request' && e.kind === 'pull');
    assert.ok(firstPoke >= 0 && firstPull > firstPoke, `Alice pulled without a poke first: ${summary(after)}`);
    assert.ok(
      !after.slice(0, firstPull).some((e) => e.type === 'request' && e.kind === 'poke'),
      'Alice reopened her stream (whose open event pulls) before that pull',
    );

    // Alice's set and Bob's delete go the other way.
    await alice.page.evaluate(() => window.rep.mutate.set({ key: 'greeting', value: 'hello' }));
    await waitFor(async () => (noProblems(), (await read(bob, 'greeting')) === 'hello'), {
      message: "Alice's set in Bob's page",
    });
    await bob.page.evaluate(() => window.rep.mutate.delete({ key: 'greeting' }));
    await waitFor(async () => (noProblems(), (await read(alice, 'greeting')) === undefined), {
      message: "Bob's delete in Alice's page",
    });

    // Alice's token has expired: her push is answered 401, the snippet's getAuth fetches a new
    // token, and the push is retried with it.
    const expired = bearer(signToken({ sub: 'alice', spaces: [space] }, { ttl: -60 }));
    await alice.page.evaluate((auth) => {
      window.rep.auth = auth;
    }, expired);
    const aliceMark = alice.trace.length;
    await alice.page.evaluate(() => window.rep.mutate.increment({ key: 'count', delta: 3 }));
    await waitFor(async () => (noProblems(), (await read(bob, 'count')) === 5), {
      message: "Alice's increment, after her token was renewed, in Bob's page",
    });
    assert.ok(app.issued.alice.length >= 2, "the snippet's getAuth did not fetch a new token");
    const renewed = app.issued.alice.slice(1).map(bearer);
    const aliceAfter = alice.trace.slice(aliceMark).filter((e) => e.type === 'request' && e.kind !== 'poke');
    assert.ok(
      aliceAfter.some((e) => e.auth === expired && statusOf(alice.trace, e.id) === 401),
      `no request with the expired token was answered 401: ${summary(alice.trace.slice(aliceMark))}`,
    );
    assert.ok(
      aliceAfter.some((e) => e.kind === 'push' && renewed.includes(e.auth) && statusOf(alice.trace, e.id) === 200),
      'no push succeeded with the renewed token',
    );

    // Bob's tokens live a few seconds. When the one in his stream's URL expires, replisync ends
    // the stream, EventSource's own reconnection is answered 401, and the snippet opens a new
    // stream with a fresh token from fetchToken.
    const reopened = await waitFor(
      () => {
        noProblems();
        const streams = bob.trace.filter((e) => e.type === 'request' && e.kind === 'poke');
        const refused = streams.findIndex((e) => statusOf(bob.trace, e.id) === 401);
        if (refused < 0) return null;
        return streams
          .slice(refused + 1)
          .find((e) => e.auth !== streams[refused].auth && statusOf(bob.trace, e.id) === 200);
      },
      { timeout: 60_000, interval: 100, message: "Bob's stream to be refused with an expired token and reopened" },
    );
    assert.ok(app.issued.bob.includes(reopened.auth), 'the reopened stream does not use a token from fetchToken');

    // The reopened stream pokes Bob.
    const bobMark = bob.trace.length;
    await alice.page.evaluate(() => window.rep.mutate.increment({ key: 'count', delta: 10 }));
    await waitFor(async () => (noProblems(), (await read(bob, 'count')) === 15), {
      message: "Alice's last increment in Bob's page",
    });
    const streamAuth = (id) => bob.trace.find((e) => e.type === 'request' && e.id === id)?.auth;
    assert.ok(
      bob.trace
        .slice(bobMark)
        .some((e) => e.type === 'sse' && e.event === 'poke' && app.issued.bob.slice(1).includes(streamAuth(e.id))),
      `no poke reached Bob through a stream the snippet reopened: ${summary(bob.trace.slice(bobMark))}`,
    );
    assert.deepEqual(problems, [], 'no page errors');
    const reader = bearer(signToken({ sub: 'carol', spaces: [space] }));
    assert.deepEqual((await server.snapshot(space, { auth: reader })).data, { count: 15 });
  } catch (e) {
    explain(e);
  }
});

/** A short account of a trace, for failure messages. */
function summary(trace) {
  return trace
    .slice(-40)
    .map((e) =>
      e.type === 'request' ? `${e.kind}>` : e.type === 'response' ? `${e.kind}<${e.status}` : `sse:${e.event}`,
    )
    .join(' ');
}

test('16b. the README Pusher block: replisync signs the private channel, with the current token', { timeout: 120_000 }, async (t) => {
  const env = new E2E();
  t.after(() => env.cleanup());
  const snippet = readmeSnippet();
  const { port: snippetPort, space } = snippetTargets(snippet.app);
  const channel = `private-space-${space}`;

  // Pusher is configured, so the SSE stream is off; nothing listens at the Pusher port (pokes
  // fail and are retried in the background, which pushes do not wait for).
  const server = await env.startReplisync({ jwtSecret: JWT_SECRET, pusher: { port: await freePort() } });
  // The app provides pusher-js (its browser build, a global `Pusher`), PUSHER_KEY and PUSHER_CLUSTER.
  const extraHead = `<script src="/vendor/pusher-js/dist/web/pusher.js"></script>
<script>
  const PUSHER_KEY = ${JSON.stringify(PUSHER_APP.key)};
  const PUSHER_CLUSTER = 'mt1';
</script>`;
  const appCode = `${snippet.app}\n${snippet.pusher}\nwindow.rep = rep;\nwindow.pusher = pusher;\n`;
  const app = await startAppServer(env, { appCode, space, extraHead });
  const browser = await launchChromium(env, snippetPort, server.port);
  const problems = [];
  const alice = await openPage(browser, app.url, 'alice', problems);
  await waitFor(
    async () => {
      if (problems.length) throw Object.assign(new Error(`page errors: ${problems.join('; ')}`), { fatal: true });
      return alice.page.evaluate((name) => Boolean(window.pusher?.channel(name)), channel);
    },
    { timeout: 20_000, message: 'the page to run both blocks and subscribe to the private channel' },
  );

  // What pusher-js does once its connection gives it a socket id: ask the snippet's endpoint.
  const socketId = '1234.5678';
  const authorize = () =>
    alice.page.evaluate(
      ([name, id]) =>
        new Promise((resolve) => {
          window.pusher.channel(name).authorize(id, (error, data) => resolve({ error: error?.message ?? null, data }));
        }),
      [channel, socketId],
    );
  const expected = `${PUSHER_APP.key}:${createHmac('sha256', PUSHER_APP.secret).update(`${socketId}:${channel}`).digest('hex')}`;
  const lastAuthRequest = () => alice.trace.filter((e) => e.type === 'request' && e.kind === 'pusher-auth').at(-1);

  const first = await authorize();
  assert.deepEqual(first, { error: null, data: { auth: expected } });
  assert.equal(lastAuthRequest().auth, bearer(app.issued.alice[0]));

  // After getAuth renewed the token (an expired one answered 401), the next authorization
  // carries the token the page holds now, not the one it started with.
  const expired = bearer(signToken({ sub: 'alice', spaces: [space] }, { ttl: -60 }));
  await alice.page.evaluate((auth) => {
    window.rep.auth = auth;
  }, expired);
  await alice.page.evaluate(() => window.rep.mutate.set({ key: 'k', value: 1 }));
  await waitFor(
    () =>
      alice.trace.some(
        (e) => e.type === 'request' && e.kind === 'push' && app.issued.alice.slice(1).map(bearer).includes(e.auth),
      ),
    { timeout: 15_000, message: 'a push with a token renewed through getAuth' },
  );
  const second = await authorize();
  assert.deepEqual(second, { error: null, data: { auth: expected } });
  assert.ok(
    app.issued.alice.slice(1).map(bearer).includes(lastAuthRequest().auth),
    'the channel authorization did not carry the renewed token',
  );
  assert.deepEqual(problems, [], 'no page errors');
});
