// Scenario 18: replisync's socket.io pokes. After a push commits, replisync publishes the
// @socket.io/redis-emitter packet for the space's room into Redis; a socket.io cluster (two
// processes of tests/e2e/socketio-server.mjs, joined by @socket.io/redis-adapter on a private
// Redis) delivers a `poke` to the room's sockets on every process.
//  a) Replicache client R1 (pullInterval 1 h) pulls only when its socket on process B is poked:
//     it sees R2's mutation, and each of its pulls is explained by a poke. A user without
//     access is refused the join (403) and is never poked (a sentinel poke comes first).
//  b) Redis is stopped, R2 pushes (answered 200 at once: pokes are off the response path),
//     Redis comes back on the same port: replisync's retries deliver the poke, R1 sees the
//     data, /metrics counts retries and gives nothing up.
//  c) R1's socket loses its connection: socket.io-client reconnects, the app joins the room
//     again on `connect` (a new server-side socket is in no room) and is poked again.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { io as connect } from 'socket.io-client';
import { createClient } from 'redis';
import {
  E2E, JWT_SECRET, bearer, delay, requestsOf, signToken, uniqueId, waitFor, withTimeout,
} from '../harness.mjs';

const HOUR_MS = 3_600_000;

/**
 * A socket.io-client socket to `url` with `token`, held as an app would: on every connection
 * (the first and each reconnection, as the server's new socket is in no room) it joins
 * `space`'s room; admitted again after a reconnection, it calls `onRejoined` (an app pulls
 * then, to catch up with pokes sent while it was away); each `poke` calls `onPoke`. Resolves once the first join is
 * answered. `pokes` holds arrival times, `connects` counts connections, `answers` holds the
 * join answers ({ ok: true } or { ok: false, status }), one per connection.
 */
async function roomSocket(t, url, { token, space, onPoke = () => {}, onRejoined = () => {} }) {
  const socket = connect(url, {
    auth: { token },
    transports: ['websocket'],
    reconnectionDelay: 100,
    reconnectionDelayMax: 1_000,
  });
  t.after(() => socket.close());
  socket.pokes = [];
  socket.connects = 0;
  socket.answers = [];
  socket.on('poke', () => {
    socket.pokes.push(performance.now());
    onPoke();
  });
  const firstAnswer = new Promise((resolve, reject) => {
    socket.on('connect', async () => {
      socket.connects++;
      const answer = await join(socket, space).catch((e) => ({ ok: false, error: e.message }));
      socket.answers.push(answer);
      if (answer.ok && socket.connects > 1) onRejoined();
      resolve(answer);
    });
    socket.once('connect_error', reject);
  });
  await withTimeout(firstAnswer, 15_000, `a socket to ${url} connecting and joining ${space}`);
  return socket;
}

function join(socket, space) {
  return socket.timeout(10_000).emitWithAck('join', space);
}

/**
 * How many socket.io processes of cluster `key` are subscribed on the Redis at `url`: every
 * @socket.io/redis-adapter of namespace `/` subscribes to `<key>-request#/#`, together with
 * the room channels, and subscribes again after a Redis restart once it has reconnected.
 */
async function adaptersSubscribed(url, key) {
  const client = createClient({ url, socket: { reconnectStrategy: false } });
  client.on('error', () => {});
  await client.connect();
  try {
    const [, count] = await client.sendCommand(['PUBSUB', 'NUMSUB', `${key}-request#/#`]);
    return count;
  } finally {
    await client.quit();
  }
}

/** Everything `rep`'s subscription to `key` has seen, oldest first. */
function watchKey(rep, key) {
  const seen = [];
  rep.subscribe((tx) => tx.get(key), { onData: (value) => seen.push(value) });
  return seen;
}

/** Waits until every request of `group` (of `kind`) has ended; returns how many there were. */
async function settled(group, kind, what) {
  await waitFor(() => requestsOf(group, kind).every((r) => r.end !== undefined), {
    timeout: 15_000,
    message: `${what} to finish`,
  });
  return requestsOf(group, kind).length;
}

test(
  '18. socket.io pokes through Redis reach only admitted sockets, on every process, and survive a Redis restart',
  { timeout: 150_000 },
  async (t) => {
    const env = new E2E();
    t.after(() => env.cleanup());

    const redis = await env.startRedis();
    const redisKey = uniqueId('sio-');
    const server = await env.startReplisync({
      jwtSecret: JWT_SECRET,
      socketio: { redisUrl: redis.url, key: redisKey },
    });
    const [procA, procB] = [
      await env.startSocketIo(server, { redisKey, redisUrl: redis.url }),
      await env.startSocketIo(server, { redisKey, redisUrl: redis.url }),
    ];
    const space = uniqueId('room-');
    const aliceToken = signToken({ sub: 'alice', spaces: [space] }, { ttl: 3600 });
    const bobToken = signToken({ sub: 'bob', spaces: [space] }, { ttl: 3600 });
    const mallorySpace = uniqueId('elsewhere-');
    const malloryToken = signToken({ sub: 'mallory', spaces: [mallorySpace] }, { ttl: 3600 });

    // R1 (alice) pulls only at start-up and when poked or admitted to the room again after a
    // reconnection. Every pull it is asked for is recorded with its cause.
    const R1 = await env.replicache(server, space, {
      name: uniqueId('R1-'),
      auth: bearer(aliceToken),
      pullInterval: HOUR_MS,
    });
    const groupR1 = await R1.clientGroupID;
    const asked = [];
    const pullR1 = (cause) => {
      asked.push({ cause, at: performance.now() });
      R1.pull().catch(() => {});
    };
    const r1Socket = await roomSocket(t, procB.url, {
      token: aliceToken,
      space,
      onPoke: () => pullR1('poke'),
      onRejoined: () => pullR1('join'),
    });
    assert.deepEqual(r1Socket.answers, [{ ok: true }], 'alice joins on process B');
    // R2 (bob) pushes; its socket on process A also pulls on pokes, like any app client.
    const R2 = await env.replicache(server, space, {
      name: uniqueId('R2-'),
      auth: bearer(bobToken),
      pullInterval: HOUR_MS,
    });
    const groupR2 = await R2.clientGroupID;
    const r2Socket = await roomSocket(t, procA.url, {
      token: bobToken,
      space,
      onPoke: () => R2.pull().catch(() => {}),
    });
    assert.deepEqual(r2Socket.answers, [{ ok: true }], 'bob joins on process A');
    // Mallory may read another space only: refused on both processes, admitted to her own.
    const mallory = [];
    for (const proc of [procA, procB]) {
      const socket = await roomSocket(t, proc.url, { token: malloryToken, space });
      assert.deepEqual(socket.answers, [{ ok: false, status: 403 }], 'mallory is refused the room');
      assert.deepEqual(await join(socket, mallorySpace), { ok: true }, 'mallory joins her own space');
      mallory.push(socket);
    }

    // R1's start-up pull is over: every later pull needs a poke or a join after reconnecting.
    await waitFor(() => requestsOf(groupR1, 'pull').some((r) => r.status === 200), { message: "R1's first pull" });
    const r1Baseline = await settled(groupR1, 'pull', "R1's start-up pulls");
    const askedBaseline = asked.length;
    const seenByR1 = watchKey(R1, 'note');
    await waitFor(() => seenByR1.length >= 1, { message: "R1's subscription to start" });
    assert.equal(seenByR1.at(-1), undefined, 'R1 starts without the note');

    /** R2 sets `note` to `value`; resolves to its push's fetch-log entry once answered. */
    const r2Sets = async (value) => {
      const before = requestsOf(groupR2, 'push').length;
      await R2.mutate.set({ key: 'note', value });
      return waitFor(
        () => {
          const entry = requestsOf(groupR2, 'push')[before];
          return entry?.end !== undefined && entry;
        },
        { timeout: 5_000, message: `R2's push of note=${value} to be answered (within 5 s)` },
      );
    };
    const r1Sees = (value, timeout, what) =>
      waitFor(() => seenByR1.includes(value), {
        timeout,
        message: `${what}: R1 to see note=${value} (seen: ${JSON.stringify(seenByR1)}; ` +
          `pokes: ${r1Socket.pokes.length})`,
      });

    // a) R2's push pokes both processes; R1 pulls on its poke and sees the note.
    const first = await r2Sets('hello from R2');
    assert.equal(first.status, 200, "R2's push");
    await waitFor(() => r1Socket.pokes.length >= 1 && r2Socket.pokes.length >= 1, {
      timeout: 10_000,
      message: `the poke at R1's socket (B) and R2's (A): ${r1Socket.pokes.length}, ${r2Socket.pokes.length}`,
    });
    await r1Sees('hello from R2', 10_000, 'after the poke');
    // A sentinel: once a second push's poke has reached both processes, mallory's sockets
    // have had every chance to receive the first (each process gets the pokes in order).
    assert.equal((await r2Sets('sentinel')).status, 200, "R2's sentinel push");
    await waitFor(() => r1Socket.pokes.length >= 2 && r2Socket.pokes.length >= 2, {
      timeout: 10_000,
      message: 'the sentinel poke at both processes',
    });
    await r1Sees('sentinel', 10_000, 'after the sentinel poke');
    await settled(groupR2, 'push', "R2's pushes");
    const pushesSoFar = requestsOf(groupR2, 'push').filter((r) => r.status === 200).length;
    assert.equal(r1Socket.pokes.length, pushesSoFar, `one poke per push at B (pokes ${r1Socket.pokes.length})`);
    assert.equal(r2Socket.pokes.length, pushesSoFar, `one poke per push at A (pokes ${r2Socket.pokes.length})`);
    assert.deepEqual(mallory.map((s) => s.pokes.length), [0, 0], 'a refused socket was poked');
    // Only the pokes explain R1's pulls: no more requests than pokes, none before the first.
    await settled(groupR1, 'pull', "R1's poke pulls");
    const pullsA = requestsOf(groupR1, 'pull').slice(r1Baseline);
    const askedA = asked.slice(askedBaseline);
    assert.ok(askedA.every((a) => a.cause === 'poke'), `R1 pulled for another cause: ${JSON.stringify(askedA)}`);
    assert.ok(pullsA.length >= 1, 'R1 pulled after its pokes');
    assert.ok(pullsA.length <= askedA.length, `R1 made ${pullsA.length} pulls for ${askedA.length} pokes`);
    assert.ok(pullsA.every((r) => r.start >= r1Socket.pokes[0]), 'R1 pulled before it was poked');
    assert.equal(requestsOf(groupR1, 'push').length, 0, 'R1 never pushed');

    // b) Redis goes away. R2's push is answered at once; its poke waits for Redis.
    const r1PokesBefore = r1Socket.pokes.length;
    const metricsBefore = await server.metrics();
    assert.equal(await adaptersSubscribed(redis.url, redisKey), 2, 'both processes subscribed');
    await redis.stop();
    const outagePush = await r2Sets('while Redis was down');
    assert.equal(outagePush.status, 200, "R2's push while Redis is down");
    const outagePushMs = outagePush.end - outagePush.start;
    // Were the poke on the response path, its retries (from 100 ms, doubling; about 11 s in all)
    // would hold the push for seconds.
    assert.ok(outagePushMs < 2_000, `the push took ${outagePushMs.toFixed(0)} ms with Redis down`);
    await delay(1_000);
    assert.equal(r1Socket.pokes.length, r1PokesBefore, 'a poke arrived with Redis down');
    assert.equal(seenByR1.includes('while Redis was down'), false, 'R1 saw the note with Redis down');
    const restartAt = performance.now();
    await redis.restart();
    await r1Sees('while Redis was down', 20_000, 'after Redis restarted');
    const seenAfterMs = performance.now() - restartAt;
    assert.ok(r1Socket.pokes.length > r1PokesBefore, 'R1 saw the note without a poke');
    const pokeAfterMs = r1Socket.pokes[r1PokesBefore] - restartAt;
    assert.ok(pokeAfterMs >= 0, 'the poke came before Redis was back');
    const metrics = await server.metrics();
    const counter = (name) => metrics[`replisync_socketio_${name}`];
    assert.ok(counter('retries_total') > 0, `retries_total is ${counter('retries_total')}`);
    assert.equal(counter('given_up_spaces_total'), 0, 'replisync gave a poke up');
    // The cluster is whole again: both processes have subscribed again, and the sockets are
    // in the room (kept, or re-joined by the app when socket.io-client reconnected).
    await waitFor(async () => (await adaptersSubscribed(redis.url, redisKey)) === 2, {
      timeout: 10_000,
      interval: 100,
      message: 'both socket.io processes to subscribe again',
    });
    assert.ok(r1Socket.answers.at(-1).ok && r2Socket.answers.at(-1).ok, 'a socket lost its room');
    const r2PokesBefore = r2Socket.pokes.length;
    const r1PokesAfter = r1Socket.pokes.length;
    assert.equal((await r2Sets('after the restart')).status, 200);
    await r1Sees('after the restart', 10_000, 'after the restart');
    await waitFor(() => r2Socket.pokes.length > r2PokesBefore && r1Socket.pokes.length > r1PokesAfter, {
      timeout: 10_000,
      message: 'the poke of a push after the restart at both processes',
    });
    assert.deepEqual(mallory.map((s) => s.pokes.length), [0, 0], 'a refused socket was poked');
    await settled(groupR1, 'pull', "R1's pulls");
    const pullsB = requestsOf(groupR1, 'pull').slice(r1Baseline);
    const askedB = asked.slice(askedBaseline);
    assert.ok(pullsB.length <= askedB.length, `R1 made ${pullsB.length} pulls for ${askedB.length} pokes and joins`);
    const retries = counter('retries_total') - (metricsBefore.replisync_socketio_retries_total ?? 0);
    t.diagnostic(
      `Redis restart: push answered in ${outagePushMs.toFixed(1)} ms with Redis down; after the ` +
        `restart R1 was poked in ${pokeAfterMs.toFixed(0)} ms and saw the note in ` +
        `${seenAfterMs.toFixed(0)} ms; ${retries} retries; socket connections R1 ${r1Socket.connects}, ` +
        `R2 ${r2Socket.connects}`,
    );

    // c) R1's connection drops (socket.io-client reconnects by itself): the app's join on
    // `connect` puts the new server-side socket in the room, and it is poked again.
    const connectsBefore = r1Socket.connects;
    const pullsBeforeDrop = requestsOf(groupR1, 'pull').length;
    r1Socket.io.engine.close();
    await waitFor(() => r1Socket.answers.length > connectsBefore, {
      timeout: 15_000,
      message: "R1's socket to reconnect and join",
    });
    assert.deepEqual(r1Socket.answers.at(-1), { ok: true }, 'R1 is admitted again after reconnecting');
    await waitFor(() => requestsOf(groupR1, 'pull').length > pullsBeforeDrop, { message: "R1's catch-up pull" });
    await settled(groupR1, 'pull', "R1's catch-up pull after joining again");
    const r1PokesRejoined = r1Socket.pokes.length;
    assert.equal((await r2Sets('after reconnecting')).status, 200);
    await waitFor(() => r1Socket.pokes.length > r1PokesRejoined, {
      timeout: 10_000,
      message: "the poke at R1's reconnected socket",
    });
    await r1Sees('after reconnecting', 10_000, 'after reconnecting');
  },
);
