// Scenario 20: per-user visibility rules (REPLISYNC_RULES) end to end. Two real Replicache
// clients, alice and bob, share the space `team-1`; each pulls only when its pusher-js
// subscription to `private-space-team-1` (sockudo, authorized by replisync's /pusher/auth)
// is poked. The rules file lets a caller read and write `shared/*`, `user/{user}/*` and
// `team/{claims.teams}/*`. It proves:
//  1. a shared list syncs both ways through pokes;
//  2. alice's private list stays private: bob's client never holds a key of alice's under
//     `user/alice/` (its full scan after every sync point, everything its subscription ever
//     saw, and every pull answer it got), nor does a raw pull with bob's token, full or from an
//     old cookie across a put and a del;
//  3. both in team red see `team/red/...`, neither sees `team/blue/...`;
//  4. bob's optimistic write into `user/alice/x` shows locally, the server refuses it (the log
//     names the key), bob's next pull takes it away, and alice never sees it;
//  5. revocation converges: with a token for team blue, bob's next pull answers `clear` and
//     exactly what he may read now under a higher cookie, without a write to the space; alice's
//     later writes to `team/red/` do not reach him; red given back brings them back;
//  6. pokes stay zero-payload: bob is poked for alice's private write and his pull answers an
//     empty patch.
// A space no entry matches (`doc-1`) hides nothing and keeps number cookies (a control).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import {
  E2E,
  JWT_SECRET,
  bearer,
  readKey,
  recordPullAnswers,
  requestsOf,
  signToken,
  uniqueId,
  waitFor,
  waitNoPending,
} from '../harness.mjs';

const SPACE = 'team-1';
const RULES = {
  spaces: [
    {
      space: 'team-*',
      read: ['shared/*', 'user/{user}/*', 'team/{claims.teams}/*'],
      write: ['shared/*', 'user/{user}/*', 'team/{claims.teams}/*'],
    },
  ],
};
const ALICE_PRIVATE = 'user/alice/';
/** The value of bob's forbidden optimistic write (step 4): the only `user/alice/` value bob may hold. */
const BOBS_TRY = 'bob-was-here';

function token(sub, teams) {
  return signToken({ sub, teams, spaces: ['*'] });
}

/** The client's whole store: `{key: value}`. */
async function holdings(rep) {
  return Object.fromEntries(await rep.query((tx) => tx.scan().entries().toArray()));
}

/** Keys of a pull answer's patch, by op. */
function patchKeys(answer, op) {
  return answer.patch.filter((o) => o.op === op).map((o) => o.key);
}

function opsUnder(answer, prefix) {
  return answer.patch.filter((o) => o.key?.startsWith(prefix));
}

test('20. visibility rules: private stays private, shared and team keys sync, revocation converges', { timeout: 180_000 }, async (t) => {
  const env = new E2E();
  t.after(() => env.cleanup());
  const pullAnswers = recordPullAnswers(t);

  const rulesFile = path.join(env.tmp, 'rules.json');
  writeFileSync(rulesFile, JSON.stringify(RULES));
  const sockudo = await env.startSockudo();
  const server = await env.startReplisync({
    pusher: { port: sockudo.port },
    jwtSecret: JWT_SECRET,
    env: { REPLISYNC_RULES: rulesFile },
  });

  const aliceToken = token('alice', ['red']);
  let bobToken = token('bob', ['red']);
  const carolToken = token('carol', ['blue']);

  // Team blue's list, written by carol (raw push) before alice and bob arrive.
  const seeded = await server.push(SPACE, {
    clientGroupID: uniqueId('cg-'),
    clientID: uniqueId('c-'),
    auth: bearer(carolToken),
    mutations: [{ name: 'set', args: { key: 'team/blue/list/1', value: 'blue plan' } }],
  });
  assert.equal(seeded.status, 200, seeded.body);
  // Control: a space no rules entry matches behaves as without rules (number cookies, every key).
  const unruled = await server.push('doc-1', {
    clientGroupID: uniqueId('cg-'),
    clientID: uniqueId('c-'),
    auth: bearer(aliceToken),
    mutations: [{ name: 'set', args: { key: 'user/alice/note', value: 'not ruled here' } }],
  });
  assert.equal(unruled.status, 200, unruled.body);
  const bobOnDoc = await server.pull('doc-1', { auth: bearer(bobToken) });
  assert.equal(typeof bobOnDoc.cookie, 'number', 'an unruled space answers a number cookie');
  assert.deepEqual(patchKeys(bobOnDoc, 'put'), ['user/alice/note'], 'an unruled space hides nothing');

  /** A raw full pull as `tok`: the keys it gets, and its cookie. */
  const rawPull = async (tok, cookie = null) => server.pull(SPACE, { auth: bearer(tok), cookie });
  const rawFull = async (tok) => {
    const answer = await rawPull(tok);
    return { cookie: answer.cookie, keys: patchKeys(answer, 'put').sort(), answer };
  };

  // Alice and bob: Replicache clients that pull when poked (and when the test says so).
  const pullTriggers = new Map(); // client group -> rep.pull() calls made here
  const pull = (rep, group) => {
    pullTriggers.set(group, (pullTriggers.get(group) ?? 0) + 1);
    rep.pull().catch(() => {});
  };
  const client = async (name, tok) => {
    const rep = await env.replicache(server, SPACE, {
      name: uniqueId(`${name}-`),
      auth: bearer(tok),
      pullInterval: 3_600_000, // an hour: pokes drive every pull
    });
    const group = await rep.clientGroupID;
    const seen = []; // every state its subscription saw
    rep.subscribe((tx) => tx.scan().entries().toArray(), { onData: (entries) => seen.push(Object.fromEntries(entries)) });
    const pusher = await env.pusherClient(sockudo.port, { authServer: server, token: tok });
    const pokes = await env.subscribe(pusher, `private-space-${SPACE}`, 'poke', () => pull(rep, group));
    await waitFor(() => requestsOf(group, 'pull').some((r) => r.status === 200), { message: `${name}'s start-up pull` });
    return { rep, group, seen, pokes, name };
  };
  const alice = await client('alice', aliceToken);
  const bob = await client('bob', bobToken);

  const answersOf = (who) => pullAnswers.filter((a) => a.clientGroupID === who.group);
  /** The answer of `who`'s first pull that started after `at` (waits for it). */
  const answerAfter = (who, at, what) =>
    waitFor(() => answersOf(who).find((a) => a.start >= at), { timeout: 15_000, message: `${who.name}'s pull answer after ${what}` });
  /** Waits for `who`'s store to satisfy `ok(store)`. */
  const until = (who, ok, what) =>
    waitFor(async () => ok(await holdings(who.rep)), { timeout: 15_000, message: `${who.name} ${what}` }).catch(async (e) => {
      e.message += `\n${who.name} holds ${JSON.stringify(await holdings(who.rep))}`;
      throw e;
    });
  const write = async (who, key, value) => {
    await who.rep.mutate.set({ key, value });
    await waitNoPending(who.rep, { timeout: 15_000 });
  };

  /**
   * Privacy, checked at every sync point: bob's store, everything his subscription saw, every
   * pull answer he got and a raw pull with his token hold no key of alice's under user/alice/
   * (bob's own forbidden try, BOBS_TRY, may show in his store until the server refuses it).
   */
  const privacyHolds = async (where) => {
    const leaks = (store) => Object.entries(store).filter(([k, v]) => k.startsWith(ALICE_PRIVATE) && v !== BOBS_TRY);
    assert.deepEqual(leaks(await holdings(bob.rep)), [], `${where}: bob's store holds alice's private keys`);
    for (const state of bob.seen) {
      assert.deepEqual(leaks(state), [], `${where}: bob's subscription saw alice's private keys`);
    }
    for (const { answer } of answersOf(bob)) {
      assert.deepEqual(opsUnder(answer, ALICE_PRIVATE), [], `${where}: a pull answer to bob's client has alice's private keys`);
    }
    const raw = await rawPull(bobToken);
    assert.deepEqual(opsUnder(raw, ALICE_PRIVATE), [], `${where}: a raw pull with bob's token has alice's private keys`);
  };

  // 1. The shared list syncs both ways through pokes.
  await alice.rep.mutate.set({ key: 'shared/list/milk', value: 'from alice' });
  await until(bob, (s) => s['shared/list/milk'] === 'from alice', 'to see alice\'s shared item');
  await bob.rep.mutate.set({ key: 'shared/list/eggs', value: 'from bob' });
  await until(alice, (s) => s['shared/list/eggs'] === 'from bob', 'to see bob\'s shared item');
  await privacyHolds('after the shared list');

  // 2 and 6. Alice's private write pokes bob (zero payload); his pull answers nothing.
  await waitNoPending(bob.rep);
  const bobBefore = await holdings(bob.rep);
  const bobPokes = bob.pokes.length;
  await write(alice, 'user/alice/list/draft', 'draft');
  await waitFor(() => bob.pokes.length > bobPokes, { timeout: 15_000, message: "bob's poke for alice's private write" });
  const quiet = await answerAfter(bob, bob.pokes[bobPokes].at, "the poke for alice's private write");
  assert.deepEqual(quiet.answer.patch, [], "bob's pull after alice's private write changed something");
  assert.deepEqual(quiet.answer.lastMutationIDChanges, {}, "bob's pull after alice's private write");
  assert.deepEqual(await holdings(bob.rep), bobBefore, "bob's store changed after alice's private write");
  await until(alice, (s) => s['user/alice/list/draft'] === 'draft', 'to hold her draft');
  // Puts and a del under user/alice/: none reaches a pull from a cookie of bob's before them.
  const bobsCookie = (await rawPull(bobToken)).cookie;
  const alicesCookie = (await rawPull(aliceToken)).cookie;
  await write(alice, 'user/alice/list/diary', 'dear diary');
  await write(alice, 'user/alice/x', 'alice-x');
  await alice.rep.mutate.delete({ key: 'user/alice/list/draft' });
  await waitNoPending(alice.rep, { timeout: 15_000 });
  const fromOld = await rawPull(bobToken, bobsCookie);
  assert.deepEqual(opsUnder(fromOld, ALICE_PRIVATE), [], "bob's raw pull from an older cookie has alice's private puts or dels");
  const asAlice = await rawPull(aliceToken, alicesCookie);
  assert.deepEqual(
    opsUnder(asAlice, ALICE_PRIVATE).map((o) => `${o.op} ${o.key}`).sort(),
    ['del user/alice/list/draft', 'put user/alice/list/diary', 'put user/alice/x'],
    'control: alice herself pulls her private changes from her cookie of the same moment',
  );
  await privacyHolds('after alice\'s private list');

  // 3. Team red: both see it, both write it; neither sees team blue.
  await alice.rep.mutate.set({ key: 'team/red/list/1', value: 'red from alice' });
  await until(bob, (s) => s['team/red/list/1'] === 'red from alice', 'to see team red\'s item from alice');
  await bob.rep.mutate.set({ key: 'team/red/list/2', value: 'red from bob' });
  await until(alice, (s) => s['team/red/list/2'] === 'red from bob', 'to see team red\'s item from bob');
  for (const who of [alice, bob]) {
    const keys = Object.keys(await holdings(who.rep));
    assert.deepEqual(keys.filter((k) => k.startsWith('team/blue/')), [], `${who.name} (team red) holds team blue's keys`);
  }
  await privacyHolds('after team red');

  // 4. Bob's forbidden write into alice's private list: shown at once, refused by the server,
  // gone after bob's next pull; alice never sees it.
  const bobPushes = requestsOf(bob.group, 'push').length;
  const logFrom = server.lines.length;
  await bob.rep.mutate.set({ key: 'user/alice/x', value: BOBS_TRY });
  assert.equal(await readKey(bob.rep, 'user/alice/x'), BOBS_TRY, "bob's optimistic write does not show");
  const bobsPush = await waitFor(() => requestsOf(bob.group, 'push').slice(bobPushes).find((r) => r.status === 200), {
    timeout: 15_000,
    message: "bob's push of the forbidden write to be answered 200",
  });
  const refusedID = Math.max(...bobsPush.mutationIDs);
  await waitFor(() => server.lines.slice(logFrom).some((l) => /may not write \\?"user\/alice\/x\\?"/.test(l)), {
    timeout: 10_000,
    message: 'the server to log its refusal of user/alice/x',
  });
  // The refused mutation counts as processed: its push pokes, and bob's next pull acknowledges
  // it with nothing under user/alice/, so Replicache drops the optimistic write.
  const ack = await waitFor(
    () => answersOf(bob).find((a) => Object.values(a.answer.lastMutationIDChanges).some((id) => id >= refusedID)),
    { timeout: 15_000, message: `a pull answer to bob acknowledging his mutation ${refusedID}` },
  );
  assert.deepEqual(opsUnder(ack.answer, ALICE_PRIVATE), [], "the answer acknowledging bob's refused write");
  await until(bob, (s) => !('user/alice/x' in s), 'to drop his refused write');
  await waitNoPending(bob.rep, { timeout: 15_000 });
  assert.ok(bob.seen.some((s) => s['user/alice/x'] === BOBS_TRY), "bob's subscription never showed his optimistic write");
  // Alice's value is untouched on the server and in her client, and her client never saw bob's.
  await write(alice, 'shared/list/bread', 'from alice'); // a round trip after bob's push
  await until(bob, (s) => s['shared/list/bread'] === 'from alice', 'to see the bread');
  assert.equal(await readKey(alice.rep, 'user/alice/x'), 'alice-x');
  assert.ok(alice.seen.every((s) => s['user/alice/x'] !== BOBS_TRY), "alice's client saw bob's refused write");
  const aliceRaw = await rawFull(aliceToken);
  assert.equal(aliceRaw.answer.patch.find((o) => o.key === 'user/alice/x')?.value, 'alice-x', "the server took bob's write");
  await privacyHolds('after bob\'s refused write');
  assert.deepEqual(
    Object.keys(await holdings(bob.rep)).filter((k) => k.startsWith(ALICE_PRIVATE)),
    [],
    'bob still holds a user/alice/ key',
  );

  // 5. Revocation: bob's token now says team blue.
  /** Switches bob to a token for `teams` and checks his next pull: clear + exactly his keys, cookie up. */
  const switchBob = async (teams, expected, what) => {
    const lastCookie = answersOf(bob).at(-1).answer.cookie;
    const spaceCookie = (await rawFull(aliceToken)).cookie;
    bobToken = token('bob', teams);
    assert.deepEqual((await rawFull(bobToken)).keys, expected, `${what}: a raw pull with the new token`);
    bob.rep.auth = bearer(bobToken);
    const at = performance.now();
    pull(bob.rep, bob.group);
    const reset = await answerAfter(bob, at, what);
    assert.equal(reset.auth, bearer(bobToken), `${what}: the pull did not carry the new token`);
    const { patch, cookie } = reset.answer;
    assert.deepEqual(patch[0], { op: 'clear' }, `${what}: the answer does not start with clear`);
    assert.deepEqual(patch.slice(1).map((o) => o.op).filter((op) => op !== 'put'), [], `${what}: only puts after clear`);
    assert.deepEqual(patchKeys(reset.answer, 'put').sort(), expected, `${what}: not exactly what bob may read now`);
    assert.equal(typeof cookie, 'object', `${what}: a ruled space answers an object cookie`);
    assert.ok(cookie.order > lastCookie.order, `${what}: cookie ${JSON.stringify(cookie)} not above ${JSON.stringify(lastCookie)}`);
    assert.notEqual(cookie.rules, lastCookie.rules, `${what}: the fingerprint did not change`);
    assert.deepEqual((await rawFull(aliceToken)).cookie, spaceCookie, `${what}: the space was written`);
    await until(bob, (s) => JSON.stringify(Object.keys(s).sort()) === JSON.stringify(expected), `to hold exactly ${expected}`);
    return expected;
  };
  const shared = ['shared/list/bread', 'shared/list/eggs', 'shared/list/milk'];
  await switchBob(['blue'], [...shared, 'team/blue/list/1'], 'bob moved to team blue');

  // Alice's later team red write pokes bob, but does not reach him.
  const pokesBeforeRed3 = bob.pokes.length;
  await write(alice, 'team/red/list/3', 'red while bob is away');
  await waitFor(() => bob.pokes.length > pokesBeforeRed3, { timeout: 15_000, message: "bob's poke for team/red/list/3" });
  const away = await answerAfter(bob, bob.pokes[pokesBeforeRed3].at, 'the poke for team/red/list/3');
  assert.deepEqual(away.answer.patch, [], 'team/red/ reached bob after his team changed');
  assert.deepEqual(Object.keys(await holdings(bob.rep)).filter((k) => k.startsWith('team/red/')), [], 'bob holds team/red/');
  assert.deepEqual(opsUnder(await rawPull(bobToken), 'team/red/'), [], "a raw pull with bob's blue token has team/red/");
  await privacyHolds('while bob is in team blue');

  // Red given back: the red list returns, alice's write made meanwhile included; blue goes.
  const red = ['team/red/list/1', 'team/red/list/2', 'team/red/list/3'];
  await switchBob(['red'], [...shared, ...red], 'bob back in team red');
  await until(bob, (s) => s['team/red/list/3'] === 'red while bob is away', "to see alice's red item again");
  await privacyHolds('with red given back');

  // Pokes carry nothing, and every pull was asked for (by a poke or the test): none on its own.
  for (const who of [alice, bob]) {
    assert.ok(who.pokes.length > 0, `${who.name} was never poked`);
    assert.deepEqual(who.pokes.filter((p) => p.data !== ''), [], `${who.name} got a poke with a payload`);
    const pulls = requestsOf(who.group, 'pull').length - 1; // the start-up pull
    assert.ok(pulls <= (pullTriggers.get(who.group) ?? 0), `${who.name} made ${pulls} pulls for ${pullTriggers.get(who.group)} asked`);
  }
  t.diagnostic(`pokes: alice ${alice.pokes.length}, bob ${bob.pokes.length}; pulls answered: ${pullAnswers.length}`);
});
