import { E2E, readKey, waitFor, waitNoPending, requestsOf, fetchLog } from '/work/main/tests/e2e/harness.mjs';
const env = new E2E('exp');
try {
  const s = await env.startReplisync();
  console.log('url', s.url);
  const a = await env.replicache(s, 'sp1', { poke: 'sse' });
  await a.mutate.increment({ key: 'c', delta: 2 });
  console.log('a local', await readKey(a, 'c'));
  await waitNoPending(a);
  console.log('server', await s.snapshot('sp1'));
  const cg = await a.clientGroupID;
  console.log('reqs', requestsOf(cg).map(e => [e.kind, e.status, e.cookie]));
  // same name in same process?
  const a2 = await env.replicache(s, 'sp1', { name: a.e2eName });
  console.log('same name cg equal?', (await a2.clientGroupID) === cg, 'clientID equal', a2.clientID === a.clientID);
  // CSN
  let csn = 0;
  a.onClientStateNotFound = () => { csn++; console.log('CSN called'); };
  await s.restart({ databaseUrl: env.newDatabaseUrl() });
  await a.pull().catch(e => console.log('pull err', e.message));
  await waitFor(() => csn > 0, { timeout: 5000 }).catch(e => console.log(e.message));
  console.log('logs', a.e2eLogs.slice(-5));
  const a3 = await env.replicache(s, 'sp1', { name: a.e2eName, poke: 'sse' });
  console.log('a3 cg same?', (await a3.clientGroupID) === cg);
  await a3.mutate.increment({ key: 'c', delta: 5 });
  await waitNoPending(a3).catch(e => console.log(e.message));
  console.log('a3 val', await readKey(a3, 'c'), 'server', await s.snapshot('sp1'));
  console.log('a3 logs', a3.e2eLogs.slice(-5));
} finally {
  await env.cleanup();
}
