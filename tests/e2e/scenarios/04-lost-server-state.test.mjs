// Scenario 4: the server loses its state (restarted on a fresh, empty database on the same
// port) while clients hold cookies. A client that pulls gets the (now empty) space whole, at a
// cookie no lower than its own, and goes on without a reload. A client that pushes gets
// ClientStateNotFound (the server no longer knows which of its mutations it applied), observed
// through onClientStateNotFound. A fresh client with its name (what the page reload Replicache
// asks for by default makes) forks from its local data and cookie and recovers: its pushes land
// and it pulls the data. (Before, a pull from a cookie ahead of the space was also
// ClientStateNotFound; the fork then pulled from the same cookie and was refused again.)

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { E2E, uniqueId, waitFor, readKey, waitNoPending, requestsOf } from '../harness.mjs';

test(
  '4. after the database is wiped, pullers get the empty space, pushers start over, and all recover',
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

    // The puller pulls with its cookie (higher than the new space version 0): it gets the
    // space as it now is (empty), and the space's versions move up past its cookie.
    await puller.pull();
    await waitFor(async () => (await readKey(puller, 'count')) === undefined, {
      timeout: 10_000,
      message: 'the puller to see the wiped (empty) space',
    });
    const lastPull = requestsOf(pullerGroup, 'pull').at(-1);
    assert.ok(lastPull.cookie >= heldCookie && lastPull.cookie > 0, 'it pulled with its old cookie');
    assert.ok(
      (await server.snapshot(space)).cookie >= lastPull.cookie,
      'the space moved up past the cookie, so cookies never go down',
    );
    assert.equal(csn.puller, 0, 'no ClientStateNotFound for a pull');

    // The pusher makes a mutation: its client is unknown to the server and its mutation id is
    // above 1, so the push answers ClientStateNotFound.
    await pusher.mutate.increment({ key: 'count', delta: 1 });
    await waitFor(() => csn.pusher === 1, {
      timeout: 10_000,
      message: 'onClientStateNotFound on the client that pushed',
    });
    assert.deepEqual((await server.snapshot(space)).data, {}, "the old client's push did not land");

    // Recovery: a new Replicache with the pusher's name (what a reload makes) forks a new client
    // group from the disabled one's local data, whatever cookie that holds.
    const pusherGroup = await pusher.clientGroupID;
    await pusher.e2eClose();
    const recovered = await env.replicache(server, space, { name: pusher.e2eName, poke: 'sse' });
    assert.notEqual(await recovered.clientGroupID, pusherGroup, 'a new client group');
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
    await waitFor(async () => (await puller.pull(), await readKey(puller, 'count')) === 13, {
      timeout: 15_000,
      interval: 200,
      message: 'the puller, never reloaded, to follow along too',
    });
    assert.equal(recoveredCsn, 0);
    assert.equal(csn.puller, 0);
  },
);
