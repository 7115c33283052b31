// Scenario 4: the server loses its state (restarted on a fresh, empty database on the same
// port) while clients hold cookies. A client that pulls, and a client that pushes, each get
// ClientStateNotFound (observed through onClientStateNotFound). A fresh client (same name,
// as after the page reload Replicache asks for by default) recovers: its pushes land and it
// pulls the data.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { E2E, uniqueId, waitFor, readKey, waitNoPending, requestsOf } from '../harness.mjs';

test(
  '4. after the database is wiped, old clients get ClientStateNotFound and fresh ones recover',
  { timeout: 120_000 },
  async (t) => {
    const env = new E2E();
    t.after(() => env.cleanup());

    const server = await env.startReplisync();
    const port = server.port;
    const space = uniqueId('wiped-');

    // Puller: will notice by pulling. Pusher: pulls never on its own, notices by pushing.
    const puller = await env.replicache(server, space, { name: uniqueId('puller-'), pullInterval: null });
    const pusher = await env.replicache(server, space, { name: uniqueId('pusher-'), pullInterval: null });
    const csn = { puller: 0, pusher: 0 };
    puller.onClientStateNotFound = () => csn.puller++;
    pusher.onClientStateNotFound = () => csn.pusher++;

    await puller.mutate.increment({ key: 'count', delta: 5 });
    await pusher.mutate.increment({ key: 'count', delta: 7 });
    await pusher.mutate.set({ key: 'old', value: 'before the wipe' });
    await waitFor(async () => (await server.snapshot(space)).data.count === 12, {
      message: 'both clients to have pushed',
    });
    await puller.pull();
    await pusher.pull();
    await waitNoPending(puller);
    await waitNoPending(pusher);
    assert.equal(await readKey(puller, 'count'), 12);
    const pullerGroup = await puller.clientGroupID;
    const heldCookie = requestsOf(pullerGroup, 'pull').at(-1).cookie;
    const serverVersion = (await server.snapshot(space)).cookie;
    assert.ok(serverVersion >= 1, `the space has a version (${serverVersion})`);

    // Wipe: same port, fresh empty database.
    await server.restart({ databaseUrl: env.newDatabaseUrl() });
    assert.equal(server.port, port);
    assert.deepEqual((await server.snapshot(space)).data, {}, 'the new database is empty');

    // The puller pulls with its cookie (higher than the new space version 0). The outcome is
    // observed through onClientStateNotFound, whatever pull() itself resolves to.
    await puller.pull().catch(() => {});
    await waitFor(() => csn.puller === 1, {
      timeout: 10_000,
      message: 'onClientStateNotFound on the client that pulled',
    });
    const lastPull = requestsOf(pullerGroup, 'pull').at(-1);
    assert.ok(lastPull.cookie >= heldCookie && lastPull.cookie > 0, 'it pulled with its old cookie');
    assert.ok(
      puller.e2eLogs.some((l) => /client state not found/i.test(l.text)),
      'Replicache logged the lost client state',
    );

    // The pusher makes a mutation: its client is unknown to the server and its mutation id is
    // above 1, so the push answers ClientStateNotFound.
    await pusher.mutate.increment({ key: 'count', delta: 1 });
    await waitFor(() => csn.pusher === 1, {
      timeout: 10_000,
      message: 'onClientStateNotFound on the client that pushed',
    });
    assert.deepEqual((await server.snapshot(space)).data, {}, "the old client's push did not land");

    // Recovery: a new Replicache with the same name (what a reload makes) gets a new client group.
    await puller.e2eClose();
    const recovered = await env.replicache(server, space, { name: puller.e2eName, poke: 'sse' });
    assert.notEqual(await recovered.clientGroupID, pullerGroup, 'a new client group');
    let recoveredCsn = 0;
    recovered.onClientStateNotFound = () => recoveredCsn++;
    await recovered.mutate.increment({ key: 'count', delta: 3 });
    await recovered.mutate.set({ key: 'note', value: 'after the wipe' });
    await waitNoPending(recovered);
    assert.equal(await readKey(recovered, 'count'), 3);
    assert.equal(await readKey(recovered, 'old'), undefined, 'no stale data from before the wipe');
    assert.deepEqual((await server.snapshot(space)).data, { count: 3, note: 'after the wipe' });

    // And it pulls what others write: a second fresh client pushes, the recovered one sees it.
    const other = await env.replicache(server, space, { name: uniqueId('other-'), poke: 'sse' });
    await other.mutate.increment({ key: 'count', delta: 10 });
    await waitFor(async () => (await readKey(recovered, 'count')) === 13, {
      timeout: 15_000,
      message: "the recovered client to pull the other client's increment",
    });
    assert.equal(recoveredCsn, 0);
    assert.equal(csn.puller, 1);
  },
);
