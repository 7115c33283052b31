// Scenario 3: offline and back. A client makes mutations while replisync is down; Replicache's
// pushes fail and are retried on their own; replisync comes back on the same port with the
// same database; every mutation lands exactly once.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { E2E, uniqueId, waitFor, readKey, waitNoPending, requestsOf, STORE } from '../harness.mjs';

test(
  '3. mutations made while the server is down land exactly once after it restarts',
  { timeout: 120_000 },
  async (t) => {
    const env = new E2E();
    t.after(() => env.cleanup());

    const server = await env.startReplisync();
    const port = server.port;
    const space = uniqueId('offline-');

    const A = await env.replicache(server, space, { name: uniqueId('A-'), poke: 'sse' });
    const groupA = await A.clientGroupID;

    // One increment while online, acknowledged.
    await A.mutate.increment({ key: 'count', delta: 1 });
    await waitNoPending(A);
    assert.deepEqual((await server.snapshot(space)).data, { count: 1 });

    // The server goes away abruptly (SIGKILL: no graceful shutdown).
    await server.stop({ signal: 'SIGKILL' });
    const downAt = performance.now();
    assert.ok(server.proc.exited);

    const OFFLINE = 9;
    for (let i = 0; i < OFFLINE; i++) {
      await A.mutate.increment({ key: 'count', delta: 1 });
    }
    assert.equal(await readKey(A, 'count'), 1 + OFFLINE, 'optimistic count while offline');
    assert.equal((await A.experimentalPendingMutations()).length, OFFLINE);

    // Replicache retries the push by itself: wait until it has failed at least 3 times.
    const failedPushes = () =>
      requestsOf(groupA, 'push').filter((r) => r.start >= downAt && r.error !== undefined);
    await waitFor(() => failedPushes().length >= 3, {
      timeout: 15_000,
      message: 'Replicache to retry its push at least 3 times while the server is down',
    });
    const failuresWhileDown = failedPushes().length;

    // Back on the same port with the same database.
    await server.restart();
    assert.equal(server.port, port, 'same port after restart');

    await waitNoPending(A, { timeout: 60_000 });
    const okPushes = requestsOf(groupA, 'push').filter((r) => r.start >= downAt && r.status === 200);
    assert.ok(okPushes.length >= 1, 'a retried push succeeded');
    const lastOk = okPushes.at(-1).mutationIDs;
    assert.ok(lastOk.length >= 1, 'the successful push carried the offline mutations');

    // Exactly once: the server's counter equals the number of increments, and A's last
    // mutation id is acknowledged.
    const snap = await server.snapshot(space);
    assert.deepEqual(snap.data, { count: 1 + OFFLINE }, `store ${STORE}`);
    const pullA = await server.pull(space, { clientGroupID: groupA });
    assert.deepEqual(pullA.lastMutationIDChanges, { [A.clientID]: 1 + OFFLINE });

    // A fresh client (new client group) sees the same.
    const fresh = await env.replicache(server, space, { name: uniqueId('fresh-'), pullInterval: null });
    await waitFor(async () => (await readKey(fresh, 'count')) === 1 + OFFLINE, {
      message: `a fresh client to read ${1 + OFFLINE}`,
    });
    assert.equal(await readKey(A, 'count'), 1 + OFFLINE);
    t.diagnostic(`push attempts failed while down: ${failuresWhileDown}`);
  },
);
