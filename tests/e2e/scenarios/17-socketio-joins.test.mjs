// Scenario 17: a socket.io cluster (two processes of tests/e2e/socketio-server.mjs, joined by
// the Redis adapter) lets a socket into a space's room only when replisync's
// GET /spaces/{space}/access says its token may read the space. A room broadcast from a third
// member of the cluster reaches the admitted sockets on both processes and never a refused one
// (scenario 18 has replisync's own pokes take that way).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Server } from 'socket.io';
import { createAdapter } from '@socket.io/redis-adapter';
import { createClient } from 'redis';
import { io as connect } from 'socket.io-client';
import { E2E, JWT_SECRET, signToken, uniqueId, waitFor } from '../harness.mjs';

/** A socket.io-client socket to `url` with `token` (none when undefined), connected. */
async function socketTo(t, url, token) {
  const socket = connect(url, { auth: token ? { token } : {}, transports: ['websocket'], reconnection: false });
  t.after(() => socket.close());
  await new Promise((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('connect_error', reject);
  });
  socket.pokes = 0;
  socket.on('poke', () => socket.pokes++);
  return socket;
}

function join(socket, space) {
  return socket.timeout(10_000).emitWithAck('join', space);
}

test('17. socket.io joins are authorized by replisync; a room broadcast reaches only admitted sockets, on every process', { timeout: 120_000 }, async (t) => {
  const env = new E2E();
  t.after(() => env.cleanup());
  const server = await env.startReplisync({ jwtSecret: JWT_SECRET });
  const redisKey = uniqueId('sio-');
  const [a, b] = [await env.startSocketIo(server, { redisKey }), await env.startSocketIo(server, { redisKey })];
  const space = uniqueId('room-');

  const alice = await socketTo(t, b.url, signToken({ sub: 'alice', spaces: [space] }));
  const reader = await socketTo(t, a.url, signToken({ sub: 'rita', spaces_read: [space] }));
  const mallory = await socketTo(t, b.url, signToken({ sub: 'mallory', spaces: ['elsewhere'] }));
  const nobody = await socketTo(t, a.url, undefined);
  const expired = await socketTo(t, a.url, signToken({ sub: 'alice', spaces: [space] }, { ttl: -3600 }));

  assert.deepEqual(await join(alice, space), { ok: true }, 'a writer joins');
  assert.deepEqual(await join(reader, space), { ok: true }, 'a reader joins');
  assert.deepEqual(await join(mallory, space), { ok: false, status: 403 }, 'no grant');
  assert.deepEqual(await join(nobody, space), { ok: false, status: 401 }, 'no token');
  assert.deepEqual(await join(expired, space), { ok: false, status: 401 }, 'an expired token');
  const garbled = await socketTo(t, b.url, 'x\r\nX-Injected: 1');
  assert.deepEqual(await join(garbled, space), { ok: false, status: 401 }, 'a token no header can carry');
  assert.deepEqual(await join(alice, '../pull'), { ok: false, status: 400 }, 'not a space id');
  // A socket that keeps asking is cut off before it can flood replisync with access checks.
  const flood = await socketTo(t, a.url, undefined);
  const answers = [];
  for (let i = 0; i < 51; i++) answers.push(await join(flood, space));
  assert.deepEqual(answers.at(-1), { ok: false, status: 429 }, 'the 51st join of one socket');
  assert.deepEqual(answers.at(-2), { ok: false, status: 401 }, 'the 50th is still asked');

  // A third member of the cluster broadcasts to the room, as a Redis publisher would.
  const pub = createClient({ url: 'redis://127.0.0.1:6379' });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  const third = new Server({ adapter: createAdapter(pub, sub, { key: redisKey }) });
  // It serves no sockets (no HTTP server): ending its Redis clients ends it.
  t.after(() => Promise.allSettled([pub.quit(), sub.quit()]));
  third.to(`space-${space}`).emit('poke');
  await waitFor(() => alice.pokes === 1 && reader.pokes === 1, {
    timeout: 10_000,
    message: 'the poke on both processes',
  });
  // A sentinel after the poke: once a second broadcast has arrived everywhere it goes, the
  // refused sockets have had every chance to receive the first.
  third.to(`space-${space}`).emit('poke');
  await waitFor(() => alice.pokes === 2 && reader.pokes === 2, { timeout: 10_000, message: 'the second poke' });
  assert.equal(mallory.pokes + nobody.pokes + expired.pokes, 0, 'refused sockets are not in the room');
});
