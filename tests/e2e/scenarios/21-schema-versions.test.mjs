// Scenario 21: rolling out a changed client with old tabs still open (REPLISYNC_SCHEMA_VERSIONS).
// Release 1's tab (schemaVersion '1') syncs while the server serves '1'; during the rollout the
// server serves '1,2' and release 2's tab ('2') syncs beside it; once the server serves only '2',
// the old tab's next pull and push are answered VersionNotSupported (schema), the real client
// calls `onUpdateNeeded` with `{type: 'VersionNotSupported', versionType: 'schema'}` (by default a
// reload, which would load release 2), and its last mutation stays pending, unapplied, while the
// new tab goes on syncing.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { E2E, readKey, uniqueId, waitFor, waitNoPending } from '../harness.mjs';

/** A Replicache tab of `release` that records every onUpdateNeeded reason. */
async function tab(env, server, space, release) {
  const rep = await env.replicache(server, space, {
    name: uniqueId(`release-${release}-`),
    schemaVersion: release,
    pullInterval: null,
    poke: 'sse',
  });
  rep.updateReasons = [];
  rep.onUpdateNeeded = (reason) => rep.updateReasons.push(reason);
  return rep;
}

test('21. an old schemaVersion is told to update; the new one syncs', { timeout: 120_000 }, async (t) => {
  const env = new E2E();
  t.after(() => env.cleanup());
  const space = uniqueId('schema-');
  const server = await env.startReplisync({ env: { REPLISYNC_SCHEMA_VERSIONS: '1' } });
  const snapshot = async (schemaVersion) => (await server.snapshot(space, { schemaVersion })).data;

  // Release 1 alone.
  const old = await tab(env, server, space, '1');
  await old.mutate.increment({ key: 'n', delta: 1 });
  await waitNoPending(old);
  assert.deepEqual(await snapshot('1'), { n: 1 });

  // The rollout: the server serves both while release 2 reaches the users.
  await server.restart({ env: { REPLISYNC_SCHEMA_VERSIONS: '1,2' } });
  const fresh = await tab(env, server, space, '2');
  await fresh.mutate.increment({ key: 'n', delta: 10 });
  await waitNoPending(fresh);
  await old.mutate.increment({ key: 'n', delta: 1 });
  await waitNoPending(old);
  await fresh.pull();
  await waitFor(async () => (await readKey(fresh, 'n')) === 12, { message: 'release 2 to read 12' });
  assert.deepEqual(old.updateReasons, [], 'release 1 is still served during the rollout');

  // Release 1 retired: its next pull and push are refused, and the client is told to update.
  await server.restart({ env: { REPLISYNC_SCHEMA_VERSIONS: '2' } });
  await old.pull();
  await waitFor(() => old.updateReasons.length > 0, { timeout: 15_000, message: 'onUpdateNeeded on the old tab' });
  assert.deepEqual(old.updateReasons[0], { type: 'VersionNotSupported', versionType: 'schema' });
  await old.mutate.increment({ key: 'n', delta: 100 });
  const beforePush = old.updateReasons.length;
  await waitFor(() => old.updateReasons.length > beforePush, {
    timeout: 15_000,
    message: "the old tab's push to be refused too",
  });
  assert.ok(
    old.updateReasons.every((r) => r.type === 'VersionNotSupported' && r.versionType === 'schema'),
    JSON.stringify(old.updateReasons),
  );
  assert.deepEqual(await snapshot('2'), { n: 12 }, "the old tab's last mutation was not applied");
  assert.ok(await old.experimentalPendingMutations().then((p) => p.length === 1), 'it stays pending');

  // Release 2 goes on.
  await fresh.mutate.increment({ key: 'n', delta: 5 });
  await waitNoPending(fresh);
  assert.deepEqual(await snapshot('2'), { n: 17 });
  assert.deepEqual(fresh.updateReasons, []);
  const refused = (await server.metrics())['replisync_schema_version_refused_total'];
  assert.ok(refused >= 2, `refusals counted in /metrics: ${refused}`);
});
