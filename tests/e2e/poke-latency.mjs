// Measures poke latency: the time from a push's HTTP response (replisync answered 200) to a
// client of the space receiving its `poke`, through sockudo (a pusher-js client subscribed to
// the space's channel) and through socket.io (replisync PUBLISHes into Redis; a cluster of two
// socket.io processes joined by the Redis adapter; a socket.io-client in the space's room on one
// of them). Not a test: it prints figures, and its last line on stdout is one JSON object with
// a member per path measured.
//
//   node poke-latency.mjs [--via sockudo|socketio|both] [--pokes N] [--gap MS]
//                                           (defaults: both, 60 pokes, 50 ms apart)
//
// Each path has a replisync of its own. Pushes go one at a time, each waiting for its poke
// (bounded) and then `gap` ms, so pokes never coalesce. A poke can arrive before the client has
// finished reading the response (replisync pokes right after commit, in parallel with
// answering); those count as negative.

import { parseArgs } from 'node:util';
import { io as connectSocketIo } from 'socket.io-client';
import { E2E, uniqueId, waitFor, delay, withTimeout, STORE, REPLISYNC_BIN } from './harness.mjs';

/** The Redis socket.io-server.mjs uses by default (loopback, shared: the key is unique). */
const REDIS_URL = 'redis://127.0.0.1:6379';
const PATHS = ['sockudo', 'socketio'];

const { values } = parseArgs({
  options: {
    via: { type: 'string', default: 'both' },
    pokes: { type: 'string', default: '60' },
    gap: { type: 'string', default: '50' },
  },
});
if (![...PATHS, 'both'].includes(values.via)) {
  console.error(`--via must be sockudo, socketio or both, not ${values.via}`);
  process.exit(2);
}
const VIA = values.via === 'both' ? PATHS : [values.via];
const POKES = Math.max(1, Math.min(10_000, Number(values.pokes)));
const GAP_MS = Math.max(0, Number(values.gap));

function percentile(sorted, p) {
  if (!sorted.length) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i];
}
const round = (x) => Math.round(x * 100) / 100;

/**
 * replisync poking through sockudo, and a pusher-js client subscribed to `space`'s channel.
 * Resolves to `{ server, pokes, client }`: `pokes` receives `{ at }` per poke.
 */
async function throughSockudo(env, space) {
  const sockudo = await env.startSockudo();
  const server = await env.startReplisync({ pusher: { port: sockudo.port } });
  const client = await env.pusherClient(sockudo.port);
  const pokes = await env.subscribe(client, `space-${space}`);
  return { server, pokes, client: 'pusher-js' };
}

/**
 * replisync publishing socket.io pokes into Redis under a fresh adapter key; two processes of
 * socketio-server.mjs on that key (a real cluster); a socket.io-client connected to the first,
 * joined to `space`'s room. Resolves to `{ server, pokes, client }` as `throughSockudo` does.
 */
async function throughSocketIo(env, space) {
  const redisKey = uniqueId('poke-latency-');
  const server = await env.startReplisync({
    env: { REPLISYNC_SOCKETIO_REDIS_URL: REDIS_URL, REPLISYNC_SOCKETIO_KEY: redisKey },
  });
  const [first] = [await env.startSocketIo(server, { redisKey }), await env.startSocketIo(server, { redisKey })];
  const socket = connectSocketIo(first.url, { transports: ['websocket'], reconnection: false });
  env.defer(() => socket.close());
  await withTimeout(
    new Promise((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('connect_error', reject);
    }),
    10_000,
    `socket.io-client connecting to ${first.url}`,
  );
  const pokes = [];
  socket.on('poke', () => pokes.push({ at: performance.now() }));
  // Without a JWT secret replisync lets every caller read, so the join is admitted.
  const joined = await socket.timeout(10_000).emitWithAck('join', space);
  if (!joined?.ok) throw new Error(`joining the room of ${space} was refused: ${JSON.stringify(joined)}`);
  return { server, pokes, client: 'socket.io-client' };
}

/**
 * A warm-up push (first connection, first transaction; not measured), then POKES pushes to
 * `space` one at a time, each followed by its poke (or 5 s) and GAP_MS. Resolves to the figures.
 */
async function measure({ server, pokes }, space) {
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
  return summary(latencies, pushMs, lost);
}

function summary(latencies, pushMs, lost) {
  const sorted = [...latencies].sort((a, b) => a - b);
  const sortedPush = [...pushMs].sort((a, b) => a - b);
  return {
    pokes: latencies.length,
    lost,
    median_ms: round(percentile(sorted, 50)),
    p90_ms: round(percentile(sorted, 90)),
    min_ms: round(sorted[0]),
    max_ms: round(sorted.at(-1)),
    mean_ms: round(sorted.reduce((a, b) => a + b, 0) / (sorted.length || 1)),
    push_round_trip_median_ms: round(percentile(sortedPush, 50)),
    push_round_trip_p90_ms: round(percentile(sortedPush, 90)),
  };
}

function report(path, client, figures) {
  console.log(
    `poke latency through ${path} (push response -> ${client} 'poke'), ${figures.pokes} pokes, ${figures.lost} lost:`,
  );
  console.log(
    `  median ${figures.median_ms} ms   p90 ${figures.p90_ms} ms   min ${figures.min_ms} ms   max ${figures.max_ms} ms   mean ${figures.mean_ms} ms`,
  );
  console.log(
    `  push round trip: median ${figures.push_round_trip_median_ms} ms   p90 ${figures.push_round_trip_p90_ms} ms`,
  );
}

const SETUPS = { sockudo: throughSockudo, socketio: throughSocketIo };
const result = { gap_ms: GAP_MS, store: STORE, replisync_bin: REPLISYNC_BIN };
let exitCode = 0;
for (const path of VIA) {
  // One environment per path: its processes are stopped before the next path starts.
  const env = new E2E(`poke-latency-${path}`);
  try {
    const space = uniqueId('latency-');
    const setup = await SETUPS[path](env, space);
    const figures = await measure(setup, space);
    report(path, setup.client, figures);
    result[path] = figures;
    if (figures.lost > 0 || figures.pokes < Math.min(50, POKES)) exitCode = 1;
  } catch (e) {
    console.error(`poke latency through ${path} failed:`, e);
    exitCode = 1;
  } finally {
    await env.cleanup().catch((e) => {
      console.error(`stopping the processes of the ${path} path failed:`, e);
      exitCode = 1;
    });
  }
}
console.log(JSON.stringify(result));
// Replicache is not used here, but pusher-js, socket.io-client and undici may keep the loop
// alive briefly.
process.exit(exitCode);
