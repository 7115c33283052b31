// Scenario 11: a large offline backlog. A client makes 50,000 mutations while replisync is down;
// Replicache then sends them all in one push, larger than one push may apply (10,000 mutations
// by default) and larger than the general body limit. With the default configuration, replisync
// applies a prefix per push and answers 503 PartiallyApplied, so Replicache pushes again at once
// (its push loop has no timer): every mutation lands exactly once, with no new mutation needed.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { E2E, uniqueId, readKey, waitNoPending, requestsOf, STORE } from '../harness.mjs';

test(
  '11. 50,000 mutations made offline land exactly once after reconnecting',
  { timeout: 600_000 },
  async (t) => {
    const env = new E2E();
    t.after(() => env.cleanup());

    const server = await env.startReplisync();
    const space = uniqueId('backlog-');
    const A = await env.replicache(server, space, { name: uniqueId('A-'), poke: 'sse' });
    const groupA = await A.clientGroupID;

    await A.mutate.increment({ key: 'count', delta: 1 });
    await waitNoPending(A);

    await server.stop({ signal: 'SIGKILL' });
    const downAt = performance.now();

    const OFFLINE = 50_000;
    for (let i = 0; i < OFFLINE; i++) {
      await A.mutate.increment({ key: 'count', delta: 1 });
    }
    assert.equal((await A.experimentalPendingMutations()).length, OFFLINE);

    await server.restart();
    await waitNoPending(A, { timeout: 400_000 });

    const pushes = requestsOf(groupA, 'push').filter((r) => r.start >= downAt);
    const refused = pushes.filter((r) => r.status !== undefined && ![200, 503].includes(r.status));
    assert.deepEqual(
      refused.map((r) => r.status),
      [],
      'no push was refused (413 and the like) once the server was back',
    );
    const partial = pushes.filter((r) => r.status === 503).length;
    assert.ok(partial >= 1, 'the backlog took more than one push');

    const snap = await server.snapshot(space);
    assert.deepEqual(snap.data, { count: 1 + OFFLINE }, `store ${STORE}: each mutation once`);
    const pull = await server.pull(space, { clientGroupID: groupA });
    assert.deepEqual(pull.lastMutationIDChanges, { [A.clientID]: 1 + OFFLINE });
    assert.equal(await readKey(A, 'count'), 1 + OFFLINE);
    t.diagnostic(
      `pushes after reconnecting: ${pushes.filter((r) => r.status === 200).length} answered 200, ${partial} PartiallyApplied`,
    );
  },
);
