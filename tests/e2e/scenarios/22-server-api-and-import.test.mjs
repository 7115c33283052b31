// Scenario 22: the server API for trusted backends (REPLISYNC_SERVICE_TOKEN) and
// `replisync export` / `replisync import`, with the real Replicache and pusher-js.
//  a) A backend's `POST /api/spaces/{space}/mutations` (fetch, service token) is poked like a
//     push: a pusher-js watcher of `private-space-X` (sockudo, tokens on) gets the poke, and a
//     Replicache client that pulls only on pokes converges to the server's write. Replaying
//     the idempotency key answers `alreadyApplied` and writes nothing (the space's version
//     does not move): the client's counter shows the increment once. Calls without a token,
//     with an end user's (valid, space-granting) JWT or a wrong token are 401, change nothing,
//     poke no one and do not use up their idempotency key; a call whose second mutation fails
//     is 422 and writes nothing, its first mutation included.
//  b) Server A runs without the server API (its routes answer 404 ServerApiOff). A space a
//     Replicache client synced on A (puts, a delete, an increment) is exported from A's
//     database (SQLite: A stopped first; Postgres: A running) and imported into a fresh
//     database that server B (same port) serves; A changed the space after the export. A new client converges to exactly the export. The old client (same in-memory
//     state, now talking to B) gets `clear` and the whole export on its next pull, at a
//     cookie above its own, so its keys written after the export go away; its next push is
//     answered ClientStateNotFound (B never knew its client group) and changes nothing; the
//     reloaded client (same name: a new client group; the refused mutation is lost) holds
//     exactly B's data and its mutations reach B and the new client. A second import of the file is refused (exit 1)
//     and changes nothing.
//  c) a retry of a call under the same idempotency key with more mutations than the first
//     answers `alreadyApplied` and writes nothing.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import {
  E2E,
  JWT_SECRET,
  STORE,
  bearer,
  pushedAndPulled,
  realFetch,
  recordPullAnswers,
  requestsOf,
  signToken,
  uniqueId,
  waitFor,
  waitNoPending,
} from '../harness.mjs';

/** REPLISYNC_SERVICE_TOKEN of these servers (at least 32 characters). */
const SERVICE_TOKEN = 'e2e-service-token-0123456789abcdef-not-for-production';

/** A server API request; `auth` is the Authorization header (default: the service token). */
async function api(server, method, route, { auth = bearer(SERVICE_TOKEN), body } = {}) {
  const headers = {};
  if (auth !== null) headers.authorization = auth;
  if (body !== undefined) headers['content-type'] = 'application/json';
  const res = await realFetch(`${server.url}/api${route}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(15_000),
  });
  const text = await res.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    json = text;
  }
  return { status: res.status, body: json };
}

/** `POST /api/spaces/{space}/mutations` with `call` ({idempotencyKey, mutations}). */
function callMutations(server, space, call, opts) {
  return api(server, 'POST', `/spaces/${encodeURIComponent(space)}/mutations`, { body: call, ...opts });
}

/** The space as the server API reads it (one page, from one snapshot): {version, data}. */
async function readSpace(server, space) {
  const res = await api(server, 'GET', `/spaces/${encodeURIComponent(space)}/entries?limit=1000`);
  assert.equal(res.status, 200, `GET entries: ${JSON.stringify(res.body)}`);
  assert.equal(res.body.next, null, 'one page holds the whole space');
  return { version: res.body.version, data: Object.fromEntries(res.body.entries.map((e) => [e.key, e.value])) };
}

/** The client's whole store: `{key: value}`. */
async function holdings(rep) {
  return Object.fromEntries(await rep.query((tx) => tx.scan().entries().toArray()));
}

/** Waits until `rep`'s whole store deep-equals `expected`. */
async function holdsExactly(rep, expected, what, { timeout = 15_000 } = {}) {
  await waitFor(
    async () => {
      try {
        assert.deepEqual(await holdings(rep), expected);
        return true;
      } catch {
        return false;
      }
    },
    { timeout, message: `${rep.e2eName} ${what}` },
  ).catch(async (e) => {
    e.message += `\n${rep.e2eName} holds ${JSON.stringify(await holdings(rep))}\nexpected ${JSON.stringify(expected)}`;
    throw e;
  });
}

/** Parses an export (NDJSON): [{space, version, format, entries: {key: value}, end}]. */
function parseExport(text) {
  const spaces = [];
  let open;
  for (const line of text.split('\n').filter((l) => l.trim() !== '')) {
    const row = JSON.parse(line);
    if ('format' in row) {
      assert.equal(open, undefined, 'a header inside a space');
      open = { ...row, entries: {}, count: 0 };
    } else if ('end' in row) {
      assert.ok(open, 'an end line outside a space');
      assert.deepEqual(row, { end: open.space, entries: open.count }, 'the end line');
      spaces.push({ space: open.space, version: open.version, format: open.format, entries: open.entries });
      open = undefined;
    } else {
      assert.deepEqual(Object.keys(row).sort(), ['key', 'value'], `an entry line: ${line}`);
      assert.ok(!(row.key in open.entries), `key ${row.key} exported twice`);
      open.entries[row.key] = row.value;
      open.count++;
    }
  }
  assert.equal(open, undefined, 'the export ends inside a space');
  return spaces;
}

test(
  '22a. a backend call through the server API pokes, converges the client, applies once; no token, no call',
  { timeout: 120_000 },
  async (t) => {
    const env = new E2E();
    t.after(() => env.cleanup());
    const space = uniqueId('api-');
    const sentinel = uniqueId('sentinel-');

    const sockudo = await env.startSockudo();
    const server = await env.startReplisync({
      pusher: { port: sockudo.port },
      jwtSecret: JWT_SECRET,
      env: { REPLISYNC_SERVICE_TOKEN: SERVICE_TOKEN },
    });
    // An end user who may read and write both spaces: their token is good for push and pull,
    // never for the server API.
    const userToken = signToken({ sub: 'alice', spaces: [space, sentinel] });

    // A watcher: pusher-js alone on the space's channel, and on a sentinel space's.
    const watcher = await env.pusherClient(sockudo.port, { authServer: server, token: userToken });
    const pokes = await env.subscribe(watcher, `private-space-${space}`);
    const sentinelPokes = await env.subscribe(watcher, `private-space-${sentinel}`);
    // Pokes go out in order and sockudo forwards them in order: once the watcher has the poke
    // of a push to the sentinel made now, every poke of what came before it has arrived.
    const allPokesIn = async () => {
      const want = sentinelPokes.length + 1;
      const res = await server.push(sentinel, {
        clientGroupID: uniqueId('cg-'),
        clientID: uniqueId('c-'),
        auth: bearer(userToken),
        mutations: [{ name: 'set', args: { key: 'tick', value: want } }],
      });
      assert.equal(res.status, 200, `sentinel push: ${res.body}`);
      await waitFor(() => sentinelPokes.length >= want, { timeout: 10_000, message: `sentinel poke ${want}` });
    };

    // A Replicache client that pulls only when its own pusher-js subscription is poked.
    const rep = await env.replicache(server, space, {
      name: uniqueId('app-'),
      auth: bearer(userToken),
      pullInterval: 3_600_000,
    });
    const group = await rep.clientGroupID;
    let pullsAsked = 0;
    const appPusher = await env.pusherClient(sockudo.port, { authServer: server, token: userToken });
    await env.subscribe(appPusher, `private-space-${space}`, 'poke', () => {
      pullsAsked++;
      rep.pull().catch(() => {});
    });
    await waitFor(() => requestsOf(group, 'pull').some((r) => r.status === 200), { message: "the client's start-up pull" });

    // The client's own increment, synced through its poke.
    await rep.mutate.increment({ key: 'counter', delta: 1 });
    await waitNoPending(rep, { timeout: 15_000 });
    await holdsExactly(rep, { counter: 1 }, 'to hold its own increment');
    await allPokesIn();
    assert.deepEqual((await readSpace(server, space)).data, { counter: 1 });

    // 1. The backend's call: committed, poked, and the client converges without being asked.
    const call = {
      idempotencyKey: 'evt-1',
      mutations: [
        { name: 'increment', args: { key: 'counter', delta: 5 } },
        { name: 'set', args: { key: 'order/1', value: { status: 'paid', amount: 1250 } } },
        { name: 'set', args: { key: 'scratch', value: true } },
        { name: 'delete', args: { key: 'scratch' } },
      ],
    };
    const pokesBefore = pokes.length;
    const committed = await callMutations(server, space, call);
    assert.equal(committed.status, 200, JSON.stringify(committed.body));
    assert.equal(committed.body.status, 'committed', JSON.stringify(committed.body));
    assert.equal(typeof committed.body.version, 'number');
    await waitFor(() => pokes.length > pokesBefore, { timeout: 10_000, message: "the watcher's poke for the backend's call" });
    assert.equal(pokes[pokesBefore].data, '', 'a zero-payload poke');
    const afterCall = { counter: 6, 'order/1': { status: 'paid', amount: 1250 } };
    await holdsExactly(rep, afterCall, "to converge to the backend's write through the poke");
    const read = await readSpace(server, space);
    assert.deepEqual(read, { version: committed.body.version, data: afterCall }, 'the server API reads the call back');
    assert.deepEqual(
      (await server.snapshot(space, { auth: bearer(userToken) })).data,
      afterCall,
      'a raw pull agrees with the server API',
    );
    const entry = await api(server, 'GET', `/spaces/${space}/entry?key=${encodeURIComponent('order/1')}`);
    assert.deepEqual(entry, {
      status: 200,
      body: { space, version: committed.body.version, key: 'order/1', value: afterCall['order/1'] },
    });
    const gone = await api(server, 'GET', `/spaces/${space}/entry?key=scratch`);
    assert.equal(gone.status, 404);
    assert.equal(gone.body.error, 'NoSuchKey');

    // 2. The same idempotency key again: alreadyApplied, nothing written.
    await allPokesIn();
    const pokesBeforeReplay = pokes.length;
    const replay = await callMutations(server, space, call);
    assert.deepEqual(replay, { status: 200, body: { status: 'alreadyApplied' } });
    assert.deepEqual(await readSpace(server, space), read, 'the replay changed the space');
    // A later write, so the client has certainly synced past the replay.
    const marker = await callMutations(server, space, {
      idempotencyKey: 'evt-2',
      mutations: [{ name: 'set', args: { key: 'marker', value: 2 } }],
    });
    assert.equal(marker.body.status, 'committed', JSON.stringify(marker.body));
    assert.equal(marker.body.version, committed.body.version + 1, 'the replay took no version');
    await holdsExactly(rep, { ...afterCall, marker: 2 }, 'to see the write after the replay');
    assert.equal((await holdings(rep)).counter, 6, 'the increment applied once');
    await allPokesIn();
    const replayPokes = pokes.length - pokesBeforeReplay - 1; // minus evt-2's
    t.diagnostic(`pokes for the replayed call: ${replayPokes}`);

    // 3. No token, an end user's token, a wrong token: 401, nothing written, nobody poked.
    const state = await readSpace(server, space);
    const pokesBeforeRefused = pokes.length;
    const sneaky = {
      idempotencyKey: 'evt-3',
      mutations: [{ name: 'increment', args: { key: 'counter', delta: 1000 } }],
    };
    const refused = {
      'no Authorization': null,
      "the end user's token": bearer(userToken),
      'the service token without Bearer': SERVICE_TOKEN,
      'a wrong token': bearer(`${SERVICE_TOKEN}x`),
      'a JWT signed with the service token': bearer(signToken({ sub: 'backend', spaces: ['*'] }, { secret: SERVICE_TOKEN })),
    };
    for (const [what, auth] of Object.entries(refused)) {
      const res = await callMutations(server, space, sneaky, { auth });
      assert.equal(res.status, 401, `${what}: ${JSON.stringify(res.body)}`);
      assert.equal(res.body.error, 'Unauthorized', what);
      const get = await api(server, 'GET', `/spaces/${space}/entries`, { auth });
      assert.equal(get.status, 401, `GET entries with ${what}`);
      assert.equal(get.body.error, 'Unauthorized', what);
      assert.ok(!JSON.stringify(get.body).includes('counter'), `${what}: the refusal shows data`);
    }
    // Control: the end user's token is good for a push.
    const userPush = await server.push(sentinel, {
      clientGroupID: uniqueId('cg-'),
      clientID: uniqueId('c-'),
      auth: bearer(userToken),
      mutations: [{ name: 'set', args: { key: 'by-user', value: 1 } }],
    });
    assert.equal(userPush.status, 200, `control: the end user's token pushes: ${userPush.body}`);
    await allPokesIn();
    assert.deepEqual(await readSpace(server, space), state, 'a refused call changed the space');
    assert.equal(pokes.length, pokesBeforeRefused, 'a refused call poked the space');
    assert.deepEqual(await holdings(rep), { ...afterCall, marker: 2 }, "the client's data changed");
    // The refused calls did not use up their key: with the service token it commits, once.
    const late = await callMutations(server, space, sneaky);
    assert.equal(late.body.status, 'committed', `the refused calls' key: ${JSON.stringify(late.body)}`);
    await holdsExactly(rep, { ...afterCall, marker: 2, counter: 1006 }, 'to see the call refused before, now made right');

    // 4. All or nothing: the second mutation fails, so the first is not applied either.
    await allPokesIn();
    const beforeFailed = await readSpace(server, space);
    const pokesBeforeFailed = pokes.length;
    const failing = await callMutations(server, space, {
      idempotencyKey: 'evt-4',
      mutations: [
        { name: 'set', args: { key: 'half', value: 'done' } },
        { name: 'increment', args: { key: 'order/1', delta: 1 } }, // not a number
      ],
    });
    assert.equal(failing.status, 422, JSON.stringify(failing.body));
    assert.equal(failing.body.error, 'MutationFailed');
    assert.equal(failing.body.index, 1);
    assert.equal(failing.body.name, 'increment');
    await allPokesIn();
    assert.deepEqual(await readSpace(server, space), beforeFailed, 'a failed call wrote something');
    assert.equal(pokes.length, pokesBeforeFailed, 'a failed call poked');
    const fixed = await callMutations(server, space, {
      idempotencyKey: 'evt-4',
      mutations: [{ name: 'set', args: { key: 'half', value: 'done' } }],
    });
    assert.equal(fixed.body.status, 'committed', `the failed call's key: ${JSON.stringify(fixed.body)}`);
    const final = { ...afterCall, marker: 2, counter: 1006, half: 'done' };
    await holdsExactly(rep, final, 'to converge at the end');
    assert.deepEqual((await readSpace(server, space)).data, final);

    // Every pull of the client after its start-up pull was asked for by a poke.
    const pulls = requestsOf(group, 'pull').length - 1;
    assert.ok(pulls <= pullsAsked, `the client made ${pulls} pulls for ${pullsAsked} pokes`);
    assert.ok(pulls >= 1);
  },
);

test(
  '22b. export a synced space, import it into a fresh database: new and old clients converge to the import',
  { timeout: 180_000 },
  async (t) => {
    const env = new E2E();
    t.after(() => env.cleanup());
    const pullAnswers = recordPullAnswers(t);
    const space = uniqueId('moved-');
    const apiEnv = { REPLISYNC_SERVICE_TOKEN: SERVICE_TOKEN }; // B's

    // A without the server API (no REPLISYNC_SERVICE_TOKEN): its routes answer 404.
    const dbA = env.newDatabaseUrl();
    const server = await env.startReplisync({ databaseUrl: dbA });
    const port = server.port;
    const off = await api(server, 'GET', `/spaces/${space}/entries`);
    assert.equal(off.status, 404, JSON.stringify(off.body));
    assert.equal(off.body.error, 'ServerApiOff');

    // The old client, on A; it pulls when the test says so.
    const old = await env.replicache(server, space, { name: uniqueId('old-'), pullInterval: null });
    let oldCsn = 0;
    old.onClientStateNotFound = () => oldCsn++;
    const sync = (rep) => pushedAndPulled(rep, { timeout: 15_000 });
    await old.mutate.set({ key: 'a', value: 1 });
    await old.mutate.set({ key: 'b', value: 'to be deleted' });
    await old.mutate.set({ key: 'c', value: { nested: ['x', 2, null], text: 'ünïcödé "q"' } });
    await old.mutate.increment({ key: 'n', delta: 3 });
    await old.mutate.delete({ key: 'b' });
    await old.mutate.increment({ key: 'n', delta: 4 });
    const exported = { a: 1, c: { nested: ['x', 2, null], text: 'ünïcödé "q"' }, n: 7 };
    await sync(old);
    await holdsExactly(old, exported, 'to hold what it wrote on A');
    const atExport = await server.snapshot(space);
    assert.deepEqual(atExport.data, exported, 'A holds what the client wrote');

    // Export: SQLite with A stopped, Postgres with A running.
    const file = path.join(env.tmp, 'export.ndjson');
    if (STORE === 'sqlite') await server.stop();
    const exporting = await env.runReplisync(['export', space, '-o', file], { databaseUrl: dbA });
    assert.equal(exporting.code, 0, `export failed:\n${exporting.stderr}`);
    assert.equal(exporting.stdout, '', 'export -o writes nothing to stdout');
    assert.match(exporting.stderr, /exported 1 spaces, 3 entries/);
    const dump = readFileSync(file, 'utf8');
    const spaces = parseExport(dump);
    assert.deepEqual(spaces, [{ space, version: atExport.cookie, format: 'replisync-space/1', entries: exported }]);
    if (STORE === 'sqlite') await server.restart();

    // A goes on after the export: the old client writes, changes and deletes; it now holds
    // keys the export does not have, and lacks one it has.
    await old.mutate.set({ key: 'late', value: 'after the export' });
    await old.mutate.set({ key: 'a', value: 'changed after the export' });
    await old.mutate.delete({ key: 'c' });
    await sync(old);
    const onA = { a: 'changed after the export', late: 'after the export', n: 7 };
    await holdsExactly(old, onA, 'to hold its writes after the export');
    assert.deepEqual((await server.snapshot(space)).data, onA);
    const oldGroup = await old.clientGroupID;
    const oldCookie = pullAnswers.filter((p) => p.clientGroupID === oldGroup).at(-1).answer.cookie;
    await server.stop();

    // Import into a fresh database.
    const dbB = env.newDatabaseUrl();
    const importing = await env.runReplisync(['import', '-i', file], { databaseUrl: dbB });
    assert.equal(importing.code, 0, `import failed:\n${importing.stderr}`);
    const m = new RegExp(`imported space ${space} at version (\\d+)`).exec(importing.stderr);
    assert.ok(m, `import names the space and its version:\n${importing.stderr}`);
    const importedVersion = Number(m[1]);
    assert.equal(importedVersion, atExport.cookie + 2 ** 30, 'an imported space starts 2^30 above the export');
    assert.match(importing.stderr, /imported 1 spaces, 3 entries/);
    // The same file again: refused, and B's space unchanged.
    const exportB = async () => {
      const res = await env.runReplisync(['export', space], { databaseUrl: dbB });
      assert.equal(res.code, 0, res.stderr);
      return res.stdout;
    };
    const beforeAgain = await exportB();
    assert.deepEqual(parseExport(beforeAgain), [{ ...spaces[0], version: importedVersion }]);
    const again = await env.runReplisync(['import', '-i', file], { databaseUrl: dbB });
    assert.equal(again.code, 1, `a second import of the space: exit ${again.code}\n${again.stderr}`);
    assert.match(again.stderr, /exists/);
    assert.equal(await exportB(), beforeAgain, 'the refused import changed the space');

    // B: on the same port, so the old client talks to it now.
    await server.restart({ databaseUrl: dbB, env: apiEnv });
    assert.equal(server.port, port);
    assert.deepEqual((await readSpace(server, space)).data, exported, 'B serves the import');

    // (a) A new client converges to exactly the export.
    const fresh = await env.replicache(server, space, { name: uniqueId('fresh-'), poke: 'sse' });
    await holdsExactly(fresh, exported, 'to hold exactly the export');

    // (b) The old client's next pull: clear and the whole export, at a cookie above its own.
    assert.deepEqual(await holdings(old), onA, 'before its pull, the old client still holds what it had from A');
    const at = performance.now();
    await old.pull();
    const reset = await waitFor(
      () => pullAnswers.find((p) => p.clientGroupID === oldGroup && p.start >= at),
      { timeout: 15_000, message: "the old client's pull answer from B" },
    );
    assert.equal(reset.cookie, oldCookie, 'the old client pulled with its cookie from A');
    const { patch, cookie } = reset.answer;
    assert.deepEqual(patch[0], { op: 'clear' }, 'the answer starts with clear');
    assert.deepEqual(patch.slice(1).filter((op) => op.op !== 'put'), [], 'only puts after clear');
    assert.deepEqual(Object.fromEntries(patch.slice(1).map((op) => [op.key, op.value])), exported);
    assert.ok(cookie > oldCookie && cookie >= importedVersion, `cookie ${cookie} above ${oldCookie} and at the import`);
    await holdsExactly(old, exported, "to hold exactly the import after its pull (its later keys gone)");
    assert.equal(oldCsn, 0, 'a pull is no ClientStateNotFound');

    // Its next mutation: B does not know its client group, so the push is ClientStateNotFound.
    const pushesBefore = requestsOf(oldGroup, 'push').length;
    await old.mutate.increment({ key: 'n', delta: 100 });
    await waitFor(() => oldCsn > 0, { timeout: 15_000, message: "onClientStateNotFound on the old client's push" });
    const refusedPush = requestsOf(oldGroup, 'push').slice(pushesBefore);
    assert.ok(refusedPush.length >= 1 && refusedPush.every((r) => r.status === 200), JSON.stringify(refusedPush));
    assert.deepEqual((await server.snapshot(space)).data, exported, "the old group's push changed B");

    // What a reload makes (Replicache's default onClientStateNotFound): a client of the same
    // name, a new client group, which converges to B and syncs.
    await old.e2eClose();
    const reloaded = await env.replicache(server, space, { name: old.e2eName, poke: 'sse' });
    let reloadedCsn = 0;
    reloaded.onClientStateNotFound = () => reloadedCsn++;
    assert.notEqual(await reloaded.clientGroupID, oldGroup, 'a new client group');
    await holdsExactly(reloaded, exported, "to hold B's data (the old group's pending +100 is lost)");
    await reloaded.mutate.increment({ key: 'n', delta: 10 });
    await reloaded.mutate.set({ key: 'after', value: 'the import' });
    await waitNoPending(reloaded, { timeout: 15_000 });
    const onB = { ...exported, n: 17, after: 'the import' };
    await holdsExactly(reloaded, onB, 'to hold its writes on B');
    assert.deepEqual((await server.snapshot(space)).data, onB, 'its mutations reached B, once');
    await holdsExactly(fresh, onB, "to see the reloaded client's writes");
    await fresh.mutate.delete({ key: 'a' });
    const { a: _gone, ...withoutA } = onB;
    await holdsExactly(reloaded, withoutA, "to see the new client's delete");
    assert.equal(reloadedCsn, 0);
    t.diagnostic(`${STORE}: exported at version ${atExport.cookie}, imported at ${importedVersion}; old cookie ${oldCookie} -> ${cookie}`);
  },
);

test(
  '22c. a retry under the same idempotency key with more mutations applies nothing',
  { timeout: 60_000 },
  async (t) => {
    const env = new E2E();
    t.after(() => env.cleanup());
    const space = uniqueId('retry-');
    const server = await env.startReplisync({ env: { REPLISYNC_SERVICE_TOKEN: SERVICE_TOKEN } });
    const inc = { name: 'increment', args: { key: 'n', delta: 1 } };
    const first = await callMutations(server, space, { idempotencyKey: 'evt-1', mutations: [inc] });
    assert.equal(first.body.status, 'committed', JSON.stringify(first.body));
    const retry = await callMutations(server, space, {
      idempotencyKey: 'evt-1',
      mutations: [inc, { name: 'set', args: { key: 'extra', value: true } }],
    });
    assert.deepEqual(retry, { status: 200, body: { status: 'alreadyApplied' } });
    assert.deepEqual((await readSpace(server, space)).data, { n: 1 });
  },
);
