// Prints what the real socket.io Redis emitter (@socket.io/redis-emitter, socket.io 4) publishes
// for `emitter.of(nsp).to(room).emit(event)`: replisync's Rust packet tests compare against it.
//
//   node socketio-emitter-fixtures.mjs
//
// The emitter is given a stub Redis client that only records `publish(channel, message)`, so
// no Redis is needed. Prints one JSON array: per case, its inputs, the channel and the message
// as lowercase hex. src/poke/socketio/packet.rs pastes these as its test constants.

import { Emitter } from '@socket.io/redis-emitter';

const ROOM_100 = 'space-' + 'x'.repeat(94);
const ROOM_32 = 'space-' + 'y'.repeat(26);

// [key (undefined: the emitter's default, "socket.io"), namespace, room, event]
const CASES = [
  [undefined, '/', 'space-abc', 'poke'],
  [undefined, '/pokes', 'space-abc', 'poke'],
  [undefined, 'pokes', 'space-abc', 'poke'],
  [undefined, '/', ROOM_100, 'poke'],
  [undefined, '/pokes', ROOM_32, 'poke'],
  ['myapp', '/', 'space-abc', 'poke'],
];

function publishedBy(key, nsp, room, event) {
  const published = [];
  const client = { publish: (channel, message) => published.push({ channel, message }) };
  const emitter = new Emitter(client, key === undefined ? {} : { key });
  emitter.of(nsp).to(room).emit(event);
  if (published.length !== 1) {
    throw new Error(`expected one publish, the emitter made ${published.length}`);
  }
  return published[0];
}

const fixtures = CASES.map(([key, nsp, room, event]) => {
  const { channel, message } = publishedBy(key, nsp, room, event);
  return {
    key: key ?? 'socket.io',
    nsp,
    room,
    event,
    channel,
    message: Buffer.from(message).toString('hex'),
  };
});

console.log(JSON.stringify(fixtures, null, 2));
