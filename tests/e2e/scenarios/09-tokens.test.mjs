// Scenario 9: tokens. replisync runs with REPLISYNC_JWT_SECRET; tokens are HS256 JWTs signed
// here with node's crypto (harness `signToken`): `sub` the user, `spaces` read-write,
// `spaces_read` read-only (an entry ending in `*` matches a prefix), `exp` required.
//  a) a token that expires mid-session (and one that is expired from the start) is renewed
//     through Replicache's `getAuth`; every mutation lands exactly once;
//  b) a user whose token does not grant the space gets 403 on push and pull, sees none of its
//     data, and changes nothing;
//  c) with sockudo, pokes go to `private-space-X` only; pusher-js subscribes through
//     replisync's POST /pusher/auth for a user who may read X and is refused (403) otherwise;
//  d) the SSE stream takes the token as `?auth=`: none 401, no access 403, good one pokes;
//  e) a read-only grant (`spaces_read`) pulls and listens but cannot push.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import {
  E2E,
  JWT_SECRET,
  PUSHER_APP,
  bearer,
  fetchLog,
  readKey,
  realFetch,
  requestsOf,
  signToken,
  uniqueId,
  waitFor,
} from '../harness.mjs';

async function errorBody(res) {
  const text = await res.text();
  try {
    return JSON.parse(text);
  } catch {
    return { unparsed: text };
  }
}

function setMutation(key, value) {
  return { name: 'set', args: { key, value } };
}

/**
 * Waits until `rep` has pushed everything and pulled back the acknowledgements (these
 * clients have no pull interval and no pokes, so they pull here).
 */
async function settle(rep, { timeout = 20_000 } = {}) {
  await waitFor(
    async () => {
      await rep.pull({ now: true }).catch(() => {});
      return (await rep.experimentalPendingMutations()).length === 0;
    },
    { timeout, interval: 100, message: `${rep.e2eName} to have no pending mutations` },
  );
}

/** A raw push of one client's mutations (first id 1), as `auth`. */
function pushAs(server, space, auth, mutations) {
  return server.push(space, { clientGroupID: uniqueId('cg-'), clientID: uniqueId('c-'), mutations, auth });
}

test('9a. an expired token is renewed through getAuth; every mutation lands once', { timeout: 120_000 }, async (t) => {
  const env = new E2E();
  t.after(() => env.cleanup());

  const server = await env.startReplisync({ jwtSecret: JWT_SECRET });
  const space = uniqueId('tok-');
  const grant = { sub: 'alice', spaces: [space] };
  const expired = () => bearer(signToken(grant, { ttl: -60 })); // past the server's 30 s leeway

  // The server refuses an expired token with a JSON 401 and takes nothing from it.
  const refused = await pushAs(server, space, expired(), [setMutation('never', 1)]);
  assert.equal(refused.status, 401, refused.body);
  const refusedBody = JSON.parse(refused.body);
  assert.equal(refusedBody.error, 'Unauthorized');
  assert.match(refusedBody.message, /expired/);

  let renewals = 0;
  const getAuth = async () => {
    renewals++;
    return bearer(signToken(grant, { ttl: 300 }));
  };

  // A: starts with a valid token; it is swapped for an expired one mid-session.
  const A = await env.replicache(server, space, {
    name: uniqueId('A-'),
    auth: bearer(signToken(grant)),
    getAuth,
    pullInterval: null,
  });
  const groupA = await A.clientGroupID;
  let total = 0;
  for (const delta of [1, 2, 3]) {
    await A.mutate.increment({ key: 'count', delta });
    total += delta;
  }
  await settle(A);
  assert.equal(renewals, 0, 'getAuth was called while the token was valid');
  assert.ok(requestsOf(groupA).every((r) => r.status === 200), 'a request failed with a valid token');

  // The token expires: the next push is answered 401, Replicache calls getAuth and retries.
  const staleAuth = expired();
  A.auth = staleAuth;
  const mark = fetchLog.length;
  for (const delta of [4, 5, 6]) {
    await A.mutate.increment({ key: 'count', delta });
    total += delta;
  }
  await settle(A).catch((e) => {
    e.message += `\nrenewals ${renewals}; A's requests: ${JSON.stringify(requestsOf(groupA).map((r) => [r.kind, r.status, r.mutationIDs]))}\nlogs: ${A.e2eLogs.slice(-10).map((l) => l.text).join('\n')}`;
    throw e;
  });
  assert.ok(renewals >= 1, 'getAuth was not called after the token expired');
  assert.notEqual(A.auth, staleAuth, 'Replicache still holds the expired token');
  // The first request with the expired token (a push or the pull that may overtake it) is
  // answered 401; after the renewal the increments are pushed and answered 200.
  const after = fetchLog.slice(mark).filter((e) => e.clientGroupID === groupA);
  const trace = JSON.stringify(after.map((e) => [e.kind, e.status, e.mutationIDs]));
  const first401 = after.findIndex((e) => e.status === 401);
  assert.ok(first401 >= 0, `no request was answered 401: ${trace}`);
  assert.ok(
    after.slice(first401 + 1).some((e) => e.kind === 'push' && e.status === 200 && e.mutationIDs?.includes(6)),
    `the increments were not pushed after the renewal: ${trace}`,
  );

  // B: starts with an expired token; its very first requests are renewed.
  const renewalsBeforeB = renewals;
  const B = await env.replicache(server, space, {
    name: uniqueId('B-'),
    auth: expired(),
    getAuth,
    pullInterval: null,
  });
  const groupB = await B.clientGroupID;
  await B.mutate.increment({ key: 'count', delta: 10 });
  total += 10;
  await settle(B);
  assert.ok(renewals > renewalsBeforeB, "B's expired start-up token was not renewed");
  assert.ok(requestsOf(groupB).some((r) => r.status === 401), 'B was never answered 401');
  assert.ok(requestsOf(groupB, 'push').some((r) => r.status === 200), "B's push never succeeded");

  // Exactly once: the server's total is the sum of every delta, no more (a replayed
  // mutation would add its delta twice) and no less.
  assert.equal(total, 31);
  const snap = await server.snapshot(space, { auth: bearer(signToken(grant)) });
  assert.deepEqual(snap.data, { count: total });

  // A fresh client (valid token from the start) pulls the same total.
  const C = await env.replicache(server, space, {
    name: uniqueId('C-'),
    auth: bearer(signToken(grant)),
    pullInterval: null,
  });
  await waitFor(async () => (await readKey(C, 'count')) === total, {
    message: `a fresh client to pull count ${total}`,
  });
  t.diagnostic(`getAuth calls: ${renewals}`);
});

test('9b. a user without access to a space gets 403, sees none of its data and changes nothing', { timeout: 120_000 }, async (t) => {
  const env = new E2E();
  t.after(() => env.cleanup());

  const server = await env.startReplisync({ jwtSecret: JWT_SECRET });
  const team = `${uniqueId('team-')}-`;
  const space = `${team}doc`;
  const bobsSpace = `${space}-other`;
  // Alice may use every space of the team (a prefix grant); Bob has a space whose name starts
  // like Alice's and a prefix that does not cover it.
  const aliceAuth = bearer(signToken({ sub: 'alice', spaces: [`${team}*`] }));
  const bobAuth = bearer(signToken({ sub: 'bob', spaces: [bobsSpace, `${space}x*`] }));

  const A = await env.replicache(server, space, { name: uniqueId('A-'), auth: aliceAuth, pullInterval: null });
  await A.mutate.set({ key: 'secret', value: 'alice-only' });
  await A.mutate.increment({ key: 'count', delta: 5 });
  await settle(A);
  const aliceData = { secret: 'alice-only', count: 5 };
  assert.deepEqual((await server.snapshot(space, { auth: aliceAuth })).data, aliceData);

  // Raw requests with Bob's token: 403 with a JSON error, nothing read, nothing written.
  const pull = await server.pullRaw(space, { auth: bobAuth });
  assert.equal(pull.status, 403);
  const pullBody = await errorBody(pull);
  assert.equal(pullBody.error, 'Forbidden');
  assert.ok(!JSON.stringify(pullBody).includes('alice-only'), 'the 403 leaked data');
  const push = await pushAs(server, space, bobAuth, [setMutation('secret', 'bob')]);
  assert.equal(push.status, 403, push.body);
  assert.equal(JSON.parse(push.body).error, 'Forbidden');
  // Control: Bob's token itself is fine, on his own space.
  assert.equal((await pushAs(server, bobsSpace, bobAuth, [setMutation('mine', 1)])).status, 200);

  // Bob's Replicache client on Alice's space.
  let bobRenewals = 0;
  const B = await env.replicache(server, space, {
    name: uniqueId('B-'),
    auth: bobAuth,
    getAuth: () => {
      bobRenewals++;
      return bobAuth;
    },
    pullInterval: null,
  });
  const groupB = await B.clientGroupID;
  const seenByB = [];
  B.subscribe((tx) => tx.scan().entries().toArray(), { onData: (entries) => seenByB.push(entries) });
  await B.mutate.set({ key: 'bob-was-here', value: 1 });
  await B.mutate.increment({ key: 'count', delta: 100 });
  await waitFor(
    () => requestsOf(groupB, 'pull').some((r) => r.status) && requestsOf(groupB, 'push').some((r) => r.status),
    { message: "Bob's client to have pulled and pushed" },
  );
  // No fixed window: a pull asked for now must be answered (403) too, then every answer so far
  // is checked.
  const answeredPulls = () => requestsOf(groupB, 'pull').filter((r) => r.status !== undefined).length;
  const pullsBefore = answeredPulls();
  B.pull({ now: true }).catch(() => {});
  await waitFor(() => answeredPulls() > pullsBefore, { message: "Bob's pull asked for now to be answered" });
  const statuses = requestsOf(groupB)
    .filter((r) => r.status !== undefined)
    .map((r) => `${r.kind} ${r.status}`);
  assert.ok(statuses.length >= 2, `Bob's requests: ${statuses}`);
  assert.ok(
    statuses.every((s) => s.endsWith(' 403')),
    `every request of Bob's client must be answered 403: ${statuses.join(', ')}`,
  );
  assert.equal(bobRenewals, 0, 'a 403 is not an authentication failure: getAuth must not be called');
  assert.ok(
    B.e2eLogs.some((l) => /non 200 response doing (push|pull): 403/.test(l.text)),
    "Replicache logged no 403 for Bob's client",
  );
  // Bob's client never saw Alice's keys: only his own optimistic writes.
  assert.equal(await readKey(B, 'secret'), undefined);
  assert.equal(await readKey(B, 'count'), 100, "Bob's optimistic increment, on nothing of Alice's");
  for (const entries of seenByB) {
    for (const [key, value] of entries) {
      assert.ok(key === 'bob-was-here' || (key === 'count' && value === 100), `Bob saw ${key}=${value}`);
    }
  }

  // Alice's space is untouched, from the server and from Alice's client: once Alice's next
  // increment has gone through and been pulled back, her client holds only her own data.
  assert.deepEqual((await server.snapshot(space, { auth: aliceAuth })).data, aliceData);
  await A.mutate.increment({ key: 'count', delta: 1 });
  await settle(A);
  assert.equal(await readKey(A, 'bob-was-here'), undefined);
  assert.equal(await readKey(A, 'count'), 6);
  assert.equal(await readKey(A, 'secret'), 'alice-only');
  assert.deepEqual((await server.snapshot(space, { auth: aliceAuth })).data, { ...aliceData, count: 6 });
});

test('9c. private poke channels through sockudo, authorized by /pusher/auth', { timeout: 120_000 }, async (t) => {
  const env = new E2E();
  t.after(() => env.cleanup());

  const sockudo = await env.startSockudo();
  const server = await env.startReplisync({ pusher: { port: sockudo.port }, jwtSecret: JWT_SECRET });
  const space = uniqueId('pc-');
  const privateChannel = `private-space-${space}`;
  // Alice may also read a sentinel space, whose pokes share her connection (see below).
  const sentinel = `${space}-sentinel`;
  const aliceToken = signToken({ sub: 'alice', spaces: [space, sentinel] });
  const bobToken = signToken({ sub: 'bob', spaces: [`${space}-elsewhere`] });

  // /pusher/auth itself: 401 without a token, 403 for Bob or for a channel that is not a
  // space's private channel, and for Alice a signature sockudo would check.
  const channelAuth = (token, channel, socketId = '1234.5678') =>
    realFetch(`${server.url}/pusher/auth`, {
      method: 'POST',
      headers: {
        'content-type': 'application/x-www-form-urlencoded',
        ...(token ? { authorization: bearer(token) } : {}),
      },
      body: new URLSearchParams({ socket_id: socketId, channel_name: channel }).toString(),
    });
  let res = await channelAuth(undefined, privateChannel);
  assert.equal(res.status, 401);
  assert.equal((await errorBody(res)).error, 'Unauthorized');
  res = await channelAuth(bobToken, privateChannel);
  assert.equal(res.status, 403);
  assert.equal((await errorBody(res)).error, 'Forbidden');
  res = await channelAuth(aliceToken, `space-${space}`);
  assert.equal(res.status, 403, 'a public channel name was signed');
  res = await channelAuth(aliceToken, privateChannel);
  assert.equal(res.status, 200);
  const signature = createHmac('sha256', PUSHER_APP.secret).update(`1234.5678:${privateChannel}`).digest('hex');
  assert.deepEqual(await res.json(), { auth: `${PUSHER_APP.key}:${signature}` });

  // pusher-js clients, authorizing through replisync's /pusher/auth with their tokens.
  const alice = await env.pusherClient(sockudo.port, { authServer: server, token: aliceToken });
  const bob = await env.pusherClient(sockudo.port, { authServer: server, token: bobToken });
  const publicWatcher = await env.pusherClient(sockudo.port);

  const aliceSub = await env.trySubscribe(alice, privateChannel);
  assert.ok(aliceSub.ok, `Alice's subscription failed: ${JSON.stringify(aliceSub.error)}`);
  const bobSub = await env.trySubscribe(bob, privateChannel);
  assert.equal(bobSub.ok, false, "Bob subscribed to a space he may not read");
  assert.equal(bobSub.error?.status, 403, `Bob's subscription error: ${JSON.stringify(bobSub.error)}`);
  const publicPokes = await env.subscribe(publicWatcher, `space-${space}`);
  const sentinelSub = await env.trySubscribe(alice, `private-space-${sentinel}`);
  assert.ok(sentinelSub.ok, `Alice's sentinel subscription failed: ${JSON.stringify(sentinelSub.error)}`);

  // A push to the space pokes Alice's private channel, and nothing else.
  const push = await pushAs(server, space, bearer(aliceToken), [setMutation('k', 1)]);
  assert.equal(push.status, 200, push.body);
  await waitFor(() => aliceSub.events.length >= 1, { timeout: 10_000, message: 'the poke on the private channel' });

  // A refused push pokes no one. No fixed window for "nothing else arrives": a push to the
  // sentinel space must poke Alice's connection, after every poke of the pushes before it
  // (replisync sends them one call after another, sockudo forwards them in order); once it is
  // in, the counts are exact.
  const refused = await pushAs(server, space, bearer(bobToken), [setMutation('k', 2)]);
  assert.equal(refused.status, 403);
  const toSentinel = await pushAs(server, sentinel, bearer(aliceToken), [setMutation('k', 1)]);
  assert.equal(toSentinel.status, 200, toSentinel.body);
  await waitFor(() => sentinelSub.events.length >= 1, { timeout: 10_000, message: "the sentinel's poke" });
  assert.equal(aliceSub.events.length, 1, 'one accepted push, one poke (the refused push poked?)');
  assert.equal(bobSub.events.length, 0, 'Bob received a poke');
  assert.equal(publicPokes.length, 0, 'a poke went to the public channel');
  assert.deepEqual((await server.snapshot(space, { auth: bearer(aliceToken) })).data, { k: 1 });
});

test('9d. the SSE poke stream takes its token as ?auth=', { timeout: 60_000 }, async (t) => {
  const env = new E2E();
  t.after(() => env.cleanup());

  const server = await env.startReplisync({ jwtSecret: JWT_SECRET });
  const space = uniqueId('sse-');
  const url = `${server.url}/spaces/${space}/poke`;
  const aliceToken = signToken({ sub: 'alice', spaces: [space] });
  const bobToken = signToken({ sub: 'bob', spaces: [`${space}-not`] });

  // No token: 401 (JSON); an expired one: 401; Bob's: 403.
  const bare = await realFetch(url, { headers: { accept: 'text/event-stream' } });
  assert.equal(bare.status, 401);
  assert.equal((await errorBody(bare)).error, 'Unauthorized');
  await assert.rejects(env.sse(server, space).connected, /answered 401/);
  await assert.rejects(
    env.sse(server, space, { auth: signToken({ sub: 'alice', spaces: [space] }, { ttl: -60 }) }).connected,
    /answered 401/,
  );
  await assert.rejects(env.sse(server, space, { auth: bobToken }).connected, /answered 403/);

  // Alice's token (bare, as EventSource would put it in the URL): a stream that pokes.
  const listener = env.sse(server, space, { auth: aliceToken });
  await listener.connected;
  assert.match(listener.contentType ?? '', /^text\/event-stream/);
  assert.equal(listener.pokes().length, 0);
  const push = await pushAs(server, space, bearer(aliceToken), [setMutation('k', 1)]);
  assert.equal(push.status, 200, push.body);
  await waitFor(() => listener.pokes().length >= 1, { timeout: 10_000, message: 'the SSE poke' });
  // A push to another space does not poke this stream.
  // No fixed window for "nothing else arrives": Bob listens to his space too, and pushes to it
  // twice; a push pokes its streams before it is answered, so once his stream has the second
  // poke, a stray poke of his first push on Alice's stream was sent long before.
  const bobsListener = env.sse(server, `${space}-not`, { auth: bobToken });
  await bobsListener.connected;
  for (const round of [1, 2]) {
    const other = await pushAs(server, `${space}-not`, bearer(bobToken), [setMutation('k', round)]);
    assert.equal(other.status, 200, other.body);
    await waitFor(() => bobsListener.pokes().length >= round, { timeout: 10_000, message: `Bob's poke ${round}` });
  }
  assert.equal(listener.pokes().length, 1, "a push to another space poked Alice's stream");
});

test('9e. a read-only grant pulls and listens but cannot push', { timeout: 60_000 }, async (t) => {
  const env = new E2E();
  t.after(() => env.cleanup());

  const server = await env.startReplisync({ jwtSecret: JWT_SECRET });
  const space = uniqueId('ro-');
  // The writer may also write a sentinel space (see below).
  const sentinel = `${space}-sentinel`;
  const writerToken = signToken({ sub: 'alice', spaces: [space, sentinel] });
  const writer = bearer(writerToken);
  const readerToken = signToken({ sub: 'carol', spaces_read: [space] });
  const reader = bearer(readerToken);

  assert.equal((await pushAs(server, space, writer, [setMutation('k', 1)])).status, 200);

  // Carol pulls (raw and with Replicache) and listens.
  const pulled = await server.pullRaw(space, { auth: reader });
  assert.equal(pulled.status, 200);
  assert.deepEqual(
    (await pulled.json()).patch.filter((op) => op.op === 'put').map((op) => [op.key, op.value]),
    [['k', 1]],
  );
  const listener = env.sse(server, space, { auth: readerToken });
  await listener.connected;

  // Carol's pushes are refused and change nothing.
  const push = await pushAs(server, space, reader, [setMutation('k', 2), setMutation('carol', 1)]);
  assert.equal(push.status, 403, push.body);
  assert.equal(JSON.parse(push.body).error, 'Forbidden');

  const C = await env.replicache(server, space, { name: uniqueId('C-'), auth: reader, pullInterval: null });
  const groupC = await C.clientGroupID;
  await waitFor(async () => (await readKey(C, 'k')) === 1, { message: 'Carol to pull k = 1' });
  await C.mutate.set({ key: 'carol', value: 2 });
  await waitFor(() => requestsOf(groupC, 'push').some((r) => r.status === 403), {
    message: "Carol's client's push to be refused",
  });
  assert.ok(requestsOf(groupC, 'pull').every((r) => r.status === undefined || r.status === 200));
  assert.ok(requestsOf(groupC, 'push').every((r) => r.status === undefined || r.status === 403));

  // A writer's push still pokes Carol's stream; the space holds only the writers' data.
  assert.equal((await pushAs(server, space, writer, [setMutation('k', 3)])).status, 200);
  await waitFor(() => listener.pokes().length >= 1, { timeout: 10_000, message: "the poke on Carol's stream" });
  // No fixed window for "nothing else arrives": the writer's push to a sentinel space must poke
  // its stream; a push pokes its streams before it is answered, so once the sentinel's poke is
  // in, any poke of the earlier pushes was sent long before, and the count is exact.
  const sentinelListener = env.sse(server, sentinel, { auth: writerToken });
  await sentinelListener.connected;
  assert.equal((await pushAs(server, sentinel, writer, [setMutation('k', 1)])).status, 200);
  await waitFor(() => sentinelListener.pokes().length >= 1, { timeout: 10_000, message: "the sentinel's poke" });
  assert.equal(listener.pokes().length, 1, "Carol's refused pushes poked");
  assert.deepEqual((await server.snapshot(space, { auth: reader })).data, { k: 3 });
});
