// Scenario 1: two Replicache client groups on one space. A increments; B never pulls on its
// own (pullInterval: null) and only pulls when its pusher-js subscription (through sockudo)
// receives a `poke`. B's Replicache subscription must see the final count, and every pull B
// made after its start-up pull must have been caused by a poke.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { E2E, uniqueId, waitFor, readKey, requestsOf } from '../harness.mjs';

test(
  "1. pusher-js poke makes a pull-less client see another client group's increments",
  { timeout: 120_000 },
  async (t) => {
    const env = new E2E();
    t.after(() => env.cleanup());

    const sockudo = await env.startSockudo();
    const server = await env.startReplisync({ pusher: { port: sockudo.port } });
    const space = uniqueId('count-');
    const channel = `space-${space}`;

    // A: the writer. B: pulls only when poked.
    const A = await env.replicache(server, space, { name: uniqueId('A-'), pullInterval: null });
    const B = await env.replicache(server, space, { name: uniqueId('B-'), pullInterval: null });
    assert.notEqual(await A.clientGroupID, await B.clientGroupID, 'A and B are separate client groups');
    assert.equal(B.pullInterval, null);
    const groupB = await B.clientGroupID;

    // Everything B's subscription sees.
    const seenByB = [];
    B.subscribe((tx) => tx.get('count'), { onData: (v) => seenByB.push(v) });

    // B's start-up pull (Replicache always pulls once when it starts) must be over before we
    // begin, so that any later pull of B is one we can account for.
    await waitFor(() => requestsOf(groupB, 'pull').some((r) => r.status === 200), {
      message: "B's start-up pull",
    });
    await waitFor(() => requestsOf(groupB, 'pull').every((r) => r.end !== undefined), {
      message: "B's start-up pull to finish",
    });
    const startupPulls = requestsOf(groupB, 'pull').length;
    assert.equal(await readKey(B, 'count'), undefined);

    // B's pusher-js subscription. While `honourPokes` is false it only counts pokes.
    let honourPokes = false;
    let pokePulls = 0;
    const pusherB = await env.pusherClient(sockudo.port);
    const pokes = await env.subscribe(pusherB, channel, 'poke', () => {
      if (!honourPokes) return;
      pokePulls++;
      B.pull().catch(() => {});
    });
    // A sentinel space on the same connection: replisync sends pokes one call after another
    // and sockudo forwards them in order, so once the sentinel's poke has arrived, so has every
    // poke of the pushes before it.
    const sentinel = uniqueId('sentinel-');
    const sentinelPokes = await env.subscribe(pusherB, `space-${sentinel}`);

    // Control: with pokes ignored, B does not learn about A's increment, although the server
    // committed it (the poke proves that) and time passes. No fixed window for "nothing else
    // happens": a push to the sentinel space must poke, and once its poke is in, the counts are
    // exact (a second poke of A's increment would have come before it).
    await A.mutate.increment({ key: 'count', delta: 1 });
    await waitFor(() => pokes.length >= 1, { timeout: 10_000, message: 'the first poke at B' });
    const sentinelPush = await server.push(sentinel, {
      clientGroupID: uniqueId('cg-'),
      clientID: uniqueId('c-'),
      mutations: [{ name: 'set', args: { key: 'k', value: 1 } }],
    });
    assert.equal(sentinelPush.status, 200, sentinelPush.body);
    await waitFor(() => sentinelPokes.length >= 1, { timeout: 10_000, message: "the sentinel's poke" });
    assert.equal(pokes.length, 1, 'one increment, one poke');
    assert.equal(await readKey(B, 'count'), undefined, 'B saw the increment without a poke-driven pull');
    assert.equal(requestsOf(groupB, 'pull').length, startupPulls, 'B pulled without being poked');
    assert.deepEqual((await server.snapshot(space)).data, { count: 1 });

    // Now B honours pokes. Three bursts of increments; after each, B must catch up.
    honourPokes = true;
    const pokesBefore = pokes.length;
    let expected = 1;
    const bursts = [[2, 3], [4, 5, 6], [7]];
    for (const burst of bursts) {
      for (const delta of burst) {
        await A.mutate.increment({ key: 'count', delta });
        expected += delta;
      }
      const want = expected;
      await waitFor(async () => (await readKey(B, 'count')) === want, {
        timeout: 15_000,
        message: `B to see count ${want} (B has ${await readKey(B, 'count')}, pokes ${pokes.length})`,
      });
    }
    assert.equal(expected, 1 + 2 + 3 + 4 + 5 + 6 + 7);
    await waitFor(() => seenByB.at(-1) === expected, { message: "B's subscription to see the final count" });
    assert.equal(seenByB[0], undefined, "B's subscription started empty");

    // Only the pokes can explain it: B's pulls after start-up number no more than the pokes it
    // acted on, and none began before the first poke it acted on arrived.
    const laterPulls = requestsOf(groupB, 'pull').slice(startupPulls);
    assert.ok(laterPulls.length >= 1, 'B pulled after pokes');
    assert.ok(
      laterPulls.length <= pokePulls,
      `B made ${laterPulls.length} pulls but acted on only ${pokePulls} pokes`,
    );
    const firstHonouredPoke = pokes[pokesBefore];
    assert.ok(firstHonouredPoke, 'a poke arrived after B began honouring pokes');
    for (const r of laterPulls) {
      assert.ok(r.start >= firstHonouredPoke.at, 'a pull of B began before any poke it acted on');
    }
    assert.equal(requestsOf(groupB, 'push').length, 0, 'B never pushed');
    assert.deepEqual((await server.snapshot(space)).data, { count: expected });
  },
);
