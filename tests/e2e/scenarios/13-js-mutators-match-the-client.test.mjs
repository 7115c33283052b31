// Scenario 13: JavaScript mutators run by replisync answer exactly what the real replicache
// client answers. One module (tests/fixtures/mutators.js) is loaded by replisync and passed to
// a real Replicache client. Each probe mutation reads through `tx` (get, has, isEmpty, scan in
// every form, its own writes) and writes what it saw; the client's optimistic answer is
// compared with the server's authoritative one, over keys whose order differs between UTF-16
// and code points (U+E000 against U+1F600).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { E2E, REPO_DIR, uniqueId, waitFor, pushedAndPulled, readKey } from '../harness.mjs';
import { mutators } from '../../fixtures/mutators.js';

const FIXTURE = path.join(REPO_DIR, 'tests', 'fixtures', 'mutators.js');

// Data keys, including ones that sort differently by UTF-16 code units and by code points.
const DATA = {
  'd/a': 1,
  'd/Z': 'upper',
  'd/é': { accent: true },
  'd/日本': [1, 2, 3],
  'd/\uE000': 'private use',
  'd/\u{1F600}': 'emoji',
  'd/\u{10000}': 'linear b',
  'd/z': null,
  'w/a': 'to be deleted',
  'w/c': 'kept',
};

const SCANS = [
  [{ prefix: 'd/' }, 'values'],
  [{ prefix: 'd/' }, 'keys'],
  [{ prefix: 'd/' }, 'entries'],
  [{ prefix: 'd/' }, 'toArray'],
  [{ prefix: 'd/' }, 'forAwait'],
  [{ prefix: 'd/' }, 'keysToArray'],
  [{ prefix: 'd/' }, 'entriesToArray'],
  [{ prefix: 'd/', limit: 3 }, 'keys'],
  [{ prefix: 'd/', start: { key: 'd/\uE000' } }, 'entries'],
  [{ prefix: 'd/', start: { key: 'd/\uE000', exclusive: true } }, 'keys'],
  [{ start: { key: 'd/é' }, limit: 4 }, 'keys'],
  [{ prefix: 'd/日' }, 'keys'],
  [{ prefix: 'nothing/' }, 'toArray'],
  [{}, 'keys'],
];

test('13. JavaScript mutators on the server answer what the real client answers', { timeout: 120_000 }, async (t) => {
  const env = new E2E();
  t.after(() => env.cleanup());
  const server = await env.startReplisync({ env: { REPLISYNC_MUTATORS: FIXTURE } });
  const space = uniqueId('tx-');
  const rep = await env.replicache(server, space, { mutators });

  for (const [key, value] of Object.entries(DATA)) {
    await rep.mutate.setValue({ key, value });
  }
  await pushedAndPulled(rep);

  // Each probe: run it on the client, read its optimistic answer at once (nothing pulls until
  // we ask), and remember where the server's answer will be.
  const probes = [];
  async function probe(name, args) {
    const into = `out/${String(probes.length).padStart(2, '0')} ${name}`;
    await rep.mutate[name]({ ...args, into });
    probes.push({ name, args, into, client: await readKey(rep, into) });
  }
  await probe('probeIsEmpty', {});
  await probe('probeGet', { key: 'd/é' });
  await probe('probeGet', { key: 'd/\u{1F600}' });
  await probe('probeGet', { key: 'd/missing' });
  await probe('probeGet', { key: 'd/z' });
  for (const [options, how] of SCANS) await probe('probeScan', { options, how });
  await probe('probeOwnWrites', { prefix: 'w/' });
  await probe('probeScan', { options: { prefix: 'w/' }, how: 'entries' });
  await probe('probeTx', {});

  await pushedAndPulled(rep);
  const server_ = await server.snapshot(space);
  for (const { name, args, into, client } of probes) {
    const onServer = server_.data[into];
    assert.notEqual(onServer, undefined, `${into}: the server ran ${name}`);
    if (name === 'probeTx') {
      assert.equal(onServer.clientID, client.clientID);
      assert.equal(onServer.mutationID, client.mutationID);
      assert.equal(onServer.location, 'server');
      assert.equal(onServer.reason, 'authoritative');
      assert.equal(client.location, 'client');
      assert.equal(typeof onServer.auth.userID, 'string');
      continue;
    }
    assert.deepEqual(onServer, client, `${name} ${JSON.stringify(args)}: server and client differ`);
  }

  // The key order itself, spelled out: code points, so U+E000 before U+10000 and U+1F600.
  const keys = server_.data[probes.find((p) => p.args.how === 'keys').into];
  assert.deepEqual(keys, ['d/Z', 'd/a', 'd/z', 'd/é', 'd/日本', 'd/\uE000', 'd/\u{10000}', 'd/\u{1F600}']);

  // After a pull the client holds the server's answers and agrees with them.
  await rep.pull();
  await waitFor(async () => (await readKey(rep, probes[0].into)) !== undefined, { message: 'the pull' });
  for (const { into } of probes) {
    assert.deepEqual(await readKey(rep, into), server_.data[into], `${into} after the pull`);
  }
  t.diagnostic(`${probes.length} probes: client and server agree`);
});
