// Scenario 7: SSE pokes. With no Pusher configuration, a listener on GET /spaces/A/poke gets a
// poke after a push to A and nothing after a push to B.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { E2E, uniqueId, waitFor } from '../harness.mjs';

test('7. SSE pokes reach the pushed space only', { timeout: 60_000 }, async (t) => {
  const env = new E2E();
  t.after(() => env.cleanup());

  const server = await env.startReplisync();
  assert.ok(
    server.lines.some((l) => /SSE pokes on/.test(l)),
    'SSE is on without Pusher configuration',
  );
  const spaceA = uniqueId('A-');
  const spaceB = uniqueId('B-');

  const listenerA = env.sse(server, spaceA);
  const listenerB = env.sse(server, spaceB);
  await listenerA.connected;
  await listenerB.connected;
  assert.match(listenerA.contentType ?? '', /^text\/event-stream/);
  assert.ok(
    listenerA.comments.includes('connected'),
    `": connected" comment (got ${JSON.stringify(listenerA.comments)})`,
  );
  assert.equal(listenerA.pokes().length, 0, 'no poke before any push');

  let n = 0;
  const push = async (space) => {
    n++;
    const res = await server.push(space, {
      clientGroupID: uniqueId('cg-'),
      clientID: uniqueId('c-'),
      mutations: [{ name: 'increment', args: { key: 'n', delta: 1 } }],
    });
    assert.equal(res.status, 200, res.body);
  };

  await push(spaceA);
  await waitFor(() => listenerA.pokes().length >= 1, { timeout: 10_000, message: 'the SSE poke on A' });
  assert.equal(listenerA.pokes()[0].data, '{}');

  // No fixed window for "nothing else arrives": a push to a sentinel space must poke its own
  // stream, and a push pokes its streams before it is answered, so once the sentinel's poke is
  // in, the pokes of every earlier push were sent long before, and the counts are exact.
  const sentinelSpace = uniqueId('S-');
  const sentinel = env.sse(server, sentinelSpace);
  await sentinel.connected;
  const allPokesIn = async () => {
    const want = sentinel.pokes().length + 1;
    await push(sentinelSpace);
    await waitFor(() => sentinel.pokes().length >= want, { timeout: 10_000, message: "the sentinel's poke" });
  };

  await push(spaceB);
  await waitFor(() => listenerB.pokes().length >= 1, { timeout: 10_000, message: 'the SSE poke on B' });
  await allPokesIn();
  assert.equal(listenerA.pokes().length, 1, 'the push to B poked A');
  assert.equal(listenerB.pokes().length, 1, 'the push to A poked B');

  // A push that changes nothing because a gap blocks it pokes no one; a resend of a mutation
  // already applied pokes again (it follows a lost answer, whose commit's poke may be lost too).
  const cg = uniqueId('cg-');
  const c = uniqueId('c-');
  const once = { clientGroupID: cg, clientID: c, mutations: [{ name: 'set', args: { key: 'x', value: 1 } }] };
  assert.equal((await server.push(spaceA, once)).status, 200);
  await waitFor(() => listenerA.pokes().length === 2, { timeout: 10_000, message: 'the second poke on A' });
  const gap = { ...once, firstID: 5 };
  assert.equal((await server.push(spaceA, gap)).status, 200, 'a push a gap blocks answers 200');
  await allPokesIn();
  assert.equal(listenerA.pokes().length, 2, 'a push that changed nothing poked');
  assert.equal((await server.push(spaceA, once)).status, 200, 'a replayed push answers 200');
  await waitFor(() => listenerA.pokes().length >= 3, { timeout: 10_000, message: 'the poke of a resend' });
  await allPokesIn();
  assert.equal(listenerA.pokes().length, 3, 'one poke for the resend');
  assert.deepEqual((await server.snapshot(spaceA)).data, { n: 1, x: 1 });
});
