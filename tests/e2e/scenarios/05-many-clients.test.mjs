// Scenario 5: many clients. 24 Replicache clients (24 client groups) on one space each push a
// series of increments concurrently, pulling on SSE pokes; all converge to the exact total.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { E2E, uniqueId, waitFor, readKey, delay } from '../harness.mjs';

const CLIENTS = 24;
const INCREMENTS = 10;

test(
  `5. ${CLIENTS} clients incrementing concurrently converge to the exact total`,
  { timeout: 180_000 },
  async (t) => {
    const env = new E2E();
    t.after(() => env.cleanup());

    const server = await env.startReplisync();
    const space = uniqueId('crowd-');

    const clients = [];
    for (let i = 0; i < CLIENTS; i++) {
      clients.push(await env.replicache(server, space, { name: uniqueId(`c${i}-`), poke: 'sse' }));
    }
    const groups = new Set(await Promise.all(clients.map((c) => c.clientGroupID)));
    assert.equal(groups.size, CLIENTS, 'one client group per client');

    // Client i adds (i+1) per increment; a shared key and a per-client key.
    let expected = 0;
    for (let i = 0; i < CLIENTS; i++) expected += (i + 1) * INCREMENTS;

    const started = performance.now();
    await Promise.all(
      clients.map(async (rep, i) => {
        for (let k = 0; k < INCREMENTS; k++) {
          await rep.mutate.increment({ key: 'total', delta: i + 1 });
          await rep.mutate.increment({ key: `mine/${i}`, delta: 1 });
          // Interleave the clients' pushes (pushDelay is 10 ms).
          await delay(5 + ((i * 7 + k * 13) % 20));
        }
      }),
    );

    const pending = async () =>
      (await Promise.all(clients.map((c) => c.experimentalPendingMutations()))).reduce(
        (n, p) => n + p.length,
        0,
      );
    await waitFor(
      async () => {
        const totals = await Promise.all(clients.map((c) => readKey(c, 'total')));
        return totals.every((v) => v === expected) && (await pending()) === 0;
      },
      {
        timeout: 90_000,
        interval: 100,
        message: `all ${CLIENTS} clients to read total ${expected} with nothing pending`,
      },
    );
    const convergedMs = performance.now() - started;

    const snap = await server.snapshot(space);
    assert.equal(snap.data.total, expected, 'server total');
    for (let i = 0; i < CLIENTS; i++) {
      assert.equal(snap.data[`mine/${i}`], INCREMENTS, `client ${i}'s own counter`);
    }
    // Every client sees every other client's per-client counter too.
    for (const c of clients) {
      const mine = await c.query(async (tx) => tx.scan({ prefix: 'mine/' }).values().toArray());
      assert.equal(mine.length, CLIENTS);
      assert.ok(mine.every((v) => v === INCREMENTS));
    }
    assert.ok(snap.cookie >= 1);
    t.diagnostic(
      `${CLIENTS} clients x ${INCREMENTS * 2} mutations converged in ${convergedMs.toFixed(0)} ms; space version ${snap.cookie}`,
    );
  },
);
