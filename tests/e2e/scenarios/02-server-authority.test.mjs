// Scenario 2: the server is authoritative. A client whose local `increment` mutator is wrong
// (it adds delta*10) shows its wrong value optimistically, then snaps to the server's value
// once its push is applied and a pull (triggered by the SSE poke) brings the server's result.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { E2E, uniqueId, waitFor, readKey, waitNoPending, serverMutators } from '../harness.mjs';

test(
  '2. a wrong client mutator is overruled by the server after push and pull',
  { timeout: 90_000 },
  async (t) => {
    const env = new E2E();
    t.after(() => env.cleanup());

    const server = await env.startReplisync();
    const space = uniqueId('authority-');

    const rogue = await env.replicache(server, space, {
      name: uniqueId('rogue-'),
      mutators: serverMutators({ incrementFactor: 10 }),
      poke: 'sse',
      // Keep each optimistic value in place for a while before the push, so that reading it and
      // the subscription seeing it are certain rather than a race with the round trip.
      pushDelay: 200,
    });
    const seen = [];
    rogue.subscribe((tx) => tx.get('n'), { onData: (v) => seen.push(v) });

    // First mutation: optimistic 3*10 = 30, server says 3.
    await rogue.mutate.increment({ key: 'n', delta: 3 });
    const optimistic = await readKey(rogue, 'n');
    assert.equal(optimistic, 30, 'the optimistic value comes from the (wrong) local mutator');

    await waitFor(async () => (await readKey(rogue, 'n')) === 3, {
      timeout: 15_000,
      message: 'the rogue client to snap to the server value 3',
    });
    await waitNoPending(rogue);
    await waitFor(() => seen.at(-1) === 3, { message: 'the subscription to see 3' });
    assert.ok(seen.indexOf(30) >= 0, `the subscription saw the optimistic 30 (saw ${JSON.stringify(seen)})`);
    assert.ok(seen.indexOf(30) < seen.lastIndexOf(3), 'the optimistic value came before the server value');

    // Second mutation, rebased on the server's state: optimistic 3 + 2*10 = 23, server 5.
    await rogue.mutate.increment({ key: 'n', delta: 2 });
    assert.equal(await readKey(rogue, 'n'), 23);
    await waitFor(async () => (await readKey(rogue, 'n')) === 5, {
      timeout: 15_000,
      message: 'the rogue client to snap to the server value 5',
    });
    await waitNoPending(rogue);
    assert.ok(seen.includes(23), `the subscription saw the optimistic 23 (saw ${JSON.stringify(seen)})`);
    assert.equal(seen.at(-1), 5);

    // An honest client in another group agrees with the server, not with the rogue's optimism.
    assert.deepEqual((await server.snapshot(space)).data, { n: 5 });
    const honest = await env.replicache(server, space, { name: uniqueId('honest-'), pullInterval: null });
    await waitFor(async () => (await readKey(honest, 'n')) === 5, {
      message: 'a fresh honest client to read 5',
    });
  },
);
