// Measures poke latency through sockudo: the time from a push's HTTP response (replisync
// answered 200) to a pusher-js client, subscribed to the space's channel, receiving the `poke`.
// Not a test: it prints figures, and its last line on stdout is one JSON object.
//
//   node poke-latency.mjs [--pokes N] [--gap MS]      (defaults: 60 pokes, 50 ms apart)
//
// Pushes go one at a time, each waiting for its poke (bounded) and then `gap` ms, so pokes
// never coalesce. A poke can arrive before the client has finished reading the response
// (replisync pokes right after commit, in parallel with answering); those count as negative.

import { parseArgs } from 'node:util';
import { E2E, uniqueId, waitFor, delay, STORE, REPLISYNC_BIN } from './harness.mjs';

const { values } = parseArgs({
  options: {
    pokes: { type: 'string', default: '60' },
    gap: { type: 'string', default: '50' },
  },
});
const POKES = Math.max(1, Math.min(10_000, Number(values.pokes)));
const GAP_MS = Math.max(0, Number(values.gap));

function percentile(sorted, p) {
  if (!sorted.length) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i];
}
const round = (x) => Math.round(x * 100) / 100;

const env = new E2E('poke-latency');
let exitCode = 0;
try {
  const sockudo = await env.startSockudo();
  const server = await env.startReplisync({ pusher: { port: sockudo.port } });
  const space = uniqueId('latency-');
  const client = await env.pusherClient(sockudo.port);
  const pokes = await env.subscribe(client, `space-${space}`);

  // Warm-up push (first connection, first transaction), not measured.
  const warm = await server.push(space, {
    clientGroupID: uniqueId('cg-'),
    clientID: uniqueId('c-'),
    mutations: [{ name: 'set', args: { key: 'warm', value: true } }],
  });
  if (warm.status !== 200) throw new Error(`warm-up push answered ${warm.status}`);
  await waitFor(() => pokes.length >= 1, { timeout: 10_000, message: 'the warm-up poke' });
  await delay(GAP_MS);

  const latencies = []; // poke arrival - push response, ms
  const pushMs = []; // push round trip, ms
  let lost = 0;
  const clientGroupID = uniqueId('cg-');
  const clientID = uniqueId('c-');
  for (let i = 0; i < POKES; i++) {
    const before = pokes.length;
    const res = await server.push(space, {
      clientGroupID,
      clientID,
      mutations: [{ id: i + 1, name: 'increment', args: { key: 'n', delta: 1 } }],
    });
    if (res.status !== 200) throw new Error(`push ${i + 1} answered ${res.status}: ${res.body}`);
    pushMs.push(res.ms);
    try {
      await waitFor(() => pokes.length > before, { timeout: 5_000, interval: 1, message: `poke ${i + 1}` });
      latencies.push(pokes[before].at - res.respondedAt);
    } catch {
      lost++;
    }
    await delay(GAP_MS);
  }

  const sorted = [...latencies].sort((a, b) => a - b);
  const sortedPush = [...pushMs].sort((a, b) => a - b);
  const result = {
    pokes: latencies.length,
    lost,
    gap_ms: GAP_MS,
    store: STORE,
    replisync_bin: REPLISYNC_BIN,
    median_ms: round(percentile(sorted, 50)),
    p90_ms: round(percentile(sorted, 90)),
    min_ms: round(sorted[0]),
    max_ms: round(sorted.at(-1)),
    mean_ms: round(sorted.reduce((a, b) => a + b, 0) / (sorted.length || 1)),
    push_round_trip_median_ms: round(percentile(sortedPush, 50)),
    push_round_trip_p90_ms: round(percentile(sortedPush, 90)),
  };
  console.log(
    `poke latency through sockudo (push response -> pusher-js 'poke'), ${result.pokes} pokes, ${lost} lost:`,
  );
  console.log(
    `  median ${result.median_ms} ms   p90 ${result.p90_ms} ms   min ${result.min_ms} ms   max ${result.max_ms} ms   mean ${result.mean_ms} ms`,
  );
  console.log(
    `  push round trip: median ${result.push_round_trip_median_ms} ms   p90 ${result.push_round_trip_p90_ms} ms`,
  );
  console.log(JSON.stringify(result));
  if (lost > 0 || latencies.length < Math.min(50, POKES)) exitCode = 1;
} catch (e) {
  console.error(e);
  exitCode = 1;
} finally {
  await env.cleanup();
}
// Replicache is not used here, but pusher-js and undici may keep the loop alive briefly.
process.exit(exitCode);
