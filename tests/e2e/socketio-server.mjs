// A socket.io 4 server for replisync's pokes, as an app would run it (two or more processes
// behind a load balancer): the Redis adapter joins the processes, so a poke published into
// Redis for a space's room reaches its sockets on every process. A socket joins a room only
// when replisync says the socket's token may read that space (GET /spaces/{space}/access).
//
//   REPLISYNC_URL  where replisync answers (default http://127.0.0.1:8080)
//   REDIS_URL      the Redis the processes share (default redis://127.0.0.1:6379)
//   REDIS_KEY      the adapter's channel prefix (default socket.io, as the emitter's)
//   ROOM_PREFIX    a space's room is ROOM_PREFIX + space (default space-)
//   HOST, PORT     where this process listens (default 127.0.0.1:3001; PORT=0: any free port)
//
// Clients: io(url, { auth: { token } }), then socket.emit('join', space, answer) and
// socket.on('poke', () => rep.pull()). `answer` receives { ok: true } or { ok: false, status }
// (401: no or expired token, 403: no access, 400: not a space id, 429: over 50 joins on this
// socket, 503: replisync did not answer).

import { createServer } from 'node:http';
import { Server } from 'socket.io';
import { createAdapter } from '@socket.io/redis-adapter';
import { createClient } from 'redis';

const REPLISYNC_URL = (process.env.REPLISYNC_URL ?? 'http://127.0.0.1:8080').replace(/\/+$/, '');
const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const REDIS_KEY = process.env.REDIS_KEY ?? 'socket.io';
const ROOM_PREFIX = process.env.ROOM_PREFIX ?? 'space-';
const HOST = process.env.HOST ?? '127.0.0.1';
const PORT = Number(process.env.PORT ?? 3001);
const SPACE_ID = /^[A-Za-z0-9_-]{1,100}$/;
const TOKEN = /^[\x21-\x7e]{1,8192}$/;
/** Joins one socket may ask for: each costs a call to replisync, so a socket cannot flood it. */
const MAX_JOINS_PER_SOCKET = 50;

/** Asks replisync whether `token` may read `space`: the HTTP status of its answer. */
async function accessStatus(space, token) {
  // A token is printable ASCII (a JWT is); anything else is asked about as no token at all.
  const headers = typeof token === 'string' && TOKEN.test(token) ? { authorization: `Bearer ${token}` } : {};
  try {
    const answer = await fetch(`${REPLISYNC_URL}/spaces/${space}/access`, {
      headers,
      signal: AbortSignal.timeout(3_000),
    });
    await answer.body?.cancel();
    return answer.status;
  } catch {
    return 503;
  }
}

const pub = createClient({ url: REDIS_URL });
const sub = pub.duplicate();
for (const client of [pub, sub]) {
  client.on('error', (error) => console.error(`redis: ${error.message}`));
}
await Promise.all([pub.connect(), sub.connect()]);

const http = createServer();
const io = new Server(http, {
  cors: { origin: true },
  adapter: createAdapter(pub, sub, { key: REDIS_KEY }),
});

io.on('connection', (socket) => {
  let joins = 0;
  socket.on('join', async (space, answer) => {
    const reply = typeof answer === 'function' ? answer : () => {};
    if (++joins > MAX_JOINS_PER_SOCKET) return reply({ ok: false, status: 429 });
    if (typeof space !== 'string' || !SPACE_ID.test(space)) return reply({ ok: false, status: 400 });
    const status = await accessStatus(space, socket.handshake.auth?.token);
    if (status !== 200) return reply({ ok: false, status });
    await socket.join(ROOM_PREFIX + space);
    reply({ ok: true });
  });
});

http.listen(PORT, HOST, () => {
  console.log(`socket.io server: http://${HOST}:${http.address().port}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    io.close();
    Promise.allSettled([pub.quit(), sub.quit()]).then(() => process.exit(0));
  });
}
