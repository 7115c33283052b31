// Scenario 14: behind a real load balancer. nginx, with deploy/nginx.conf (only its listen and
// upstream addresses rewritten), balances round-robin over three replisync instances sharing one
// Postgres database (always Postgres, whatever E2E_STORE says), pokes going through sockudo.
//  a) a pusher-js watcher is poked whichever instance took the push;
//  b) Replicache clients talking only to nginx converge to exact totals, and every instance
//     served pushes and pulls (its /metrics);
//  c) rolling restart: each instance in turn gets SIGTERM (it drains, then stops) and starts
//     again on its port while the clients keep pushing: no mutation lost or doubled, no failed
//     request seen by a client (nginx sends a failed attempt on to the next instance);
//  d) an instance killed (SIGKILL) while a push waits in it: the push is sent on to another
//     instance and the mutation is applied exactly once;
//  e) what nginx must not expose: an SSE poke stream's `?auth=` token never reaches its access
//     log, and /metrics is not served through it.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { E2E, uniqueId, waitFor, delay, readKey, pushedAndPulled, fetchLog } from '../harness.mjs';

const INSTANCES = 3;
const CLIENTS = 4;
const ROUND_B_INCREMENTS = 15; // per client, before the restarts
const MAX_LOAD_ROUNDS = 400; // per client, during the restarts (the loop ends when they do)

test(
  '14. behind nginx: round-robin over three instances, pokes through sockudo, rolling restart and a killed instance lose or double nothing',
  { timeout: 150_000 },
  async (t) => {
    const env = new E2E();
    t.after(() => env.cleanup());
    const startedAt = performance.now();

    const databaseUrl = env.newDatabaseUrl({ store: 'postgres' });
    const sockudo = await env.startSockudo();
    const servers = [];
    for (let i = 1; i <= INSTANCES; i++) {
      // Each instance names itself to Postgres, so a waiting push can be traced to it (d).
      servers.push(
        await env.startReplisync({
          databaseUrl: `${databaseUrl}?application_name=replisync-${i}`,
          pusher: { port: sockudo.port },
          // SSE on beside Pusher, for (e): a stream with `?auth=` through nginx.
          env: { REPLISYNC_DRAIN_DELAY_SECS: '1', REPLISYNC_SSE: 'true' },
        }),
      );
    }
    const nginx = await env.startNginx(servers);
    const balancer = { url: nginx.url };
    const space = uniqueId('lb-');

    // a) Pokes reach the watcher whichever instance committed the push.
    const watcher = await env.pusherClient(sockudo.port);
    const reps = [];
    const pullAll = () => reps.forEach((rep) => rep.pull().catch(() => {}));
    const pokes = await env.subscribe(watcher, `space-${space}`, 'poke', pullAll);
    for (const [i, server] of servers.entries()) {
      const before = pokes.length;
      const res = await server.push(space, {
        clientGroupID: uniqueId('cg-'),
        clientID: uniqueId('c-'),
        mutations: [{ name: 'increment', args: { key: 'direct', delta: 1 } }],
      });
      assert.equal(res.status, 200, `direct push to instance ${i + 1}: ${res.body}`);
      await waitFor(() => pokes.length > before, {
        timeout: 10_000,
        message: `the poke after a push to instance ${i + 1}`,
      });
    }

    // e) No token in nginx's access log, no /metrics through nginx.
    const streamToken = uniqueId('token-in-query-');
    const stream = env.sse(balancer, space, { auth: streamToken });
    await stream.connected;
    stream.close();
    await waitFor(() => nginx.accessLines().some((l) => /\/poke[ ?]/.test(l)), {
      timeout: 10_000,
      message: "nginx's access log line for the SSE stream",
    });
    const metricsThroughNginx = await fetch(`${nginx.url}/metrics`);
    assert.equal(metricsThroughNginx.status, 404, '/metrics is refused through nginx');
    assert.doesNotMatch(await metricsThroughNginx.text(), /replisync_/, 'no counters through nginx');
    const leaks = nginx.accessLines().filter((l) => l.includes('auth=') || l.includes(streamToken));
    assert.deepEqual(leaks, [], "nginx's access log holds the SSE stream's token");

    // b) Clients talking only to nginx converge to exact totals.
    const made = []; // mutations each client made: its last mutation id once all are pushed
    for (let k = 0; k < CLIENTS; k++) {
      reps.push(await env.replicache(balancer, space, { name: uniqueId(`lb${k}-`) }));
      made.push(0);
    }
    const increment = async (k) => {
      await reps[k].mutate.increment({ key: 'count', delta: 1 });
      await reps[k].mutate.increment({ key: `c${k}`, delta: 1 });
      made[k] += 2;
    };
    await Promise.all(
      reps.map(async (_, k) => {
        for (let i = 0; i < ROUND_B_INCREMENTS; i++) {
          await increment(k);
          await delay(20);
        }
      }),
    );
    await Promise.all(reps.map((rep) => pushedAndPulled(rep)));
    for (const rep of reps) await converges(rep, CLIENTS * ROUND_B_INCREMENTS);
    for (const [i, server] of servers.entries()) {
      const metrics = await (await fetch(`${server.url}/metrics`)).text();
      assert.ok(counter(metrics, 'replisync_pushes_total') > 0, `instance ${i + 1} served no push`);
      assert.ok(counter(metrics, 'replisync_pulls_total') > 0, `instance ${i + 1} served no pull`);
    }

    // c) Rolling restart while every client keeps pushing.
    const restartFrom = performance.now();
    let loadOn = true;
    const load = Promise.all(
      reps.map(async (_, k) => {
        for (let i = 0; i < MAX_LOAD_ROUNDS && loadOn; i++) {
          await increment(k);
          await delay(40);
        }
      }),
    );
    await delay(1_000);
    let restarts = 0;
    for (const server of servers) {
      // The harness fails the test unless the instance exits by itself with status 0 after
      // SIGTERM, within its drain delay and shutdown timeout.
      await server.restart();
      restarts++;
      await delay(1_500);
    }
    loadOn = false;
    await load;
    const restartUntil = performance.now();
    await Promise.all(reps.map((rep) => pushedAndPulled(rep, { timeout: 30_000 })));
    await checkExact(servers[0], reps, made, space);
    const seen = requestsThrough(nginx.url, restartFrom, restartUntil);
    const failed = seen.filter((r) => r.status !== 200);
    assert.deepEqual(
      failed.map((r) => `${r.kind} ${r.status ?? r.error}`),
      [],
      'requests that failed as the clients saw them during the rolling restart',
    );

    // d) SIGKILL while a push waits in an instance (for the space's row lock, held here).
    const lock = await holdSpaceLock(databaseUrl, space);
    const rep = await env.replicache(balancer, space, { name: uniqueId('killed-') });
    reps.push(rep);
    made.push(0);
    const pushesBefore = nginx.accessLines().length;
    await rep.mutate.increment({ key: 'count', delta: 1 });
    await rep.mutate.increment({ key: `c${CLIENTS}`, delta: 1 });
    made[CLIENTS] += 2;
    const first = await waitFor(() => waitingInstances(databaseUrl)[0], {
      timeout: 10_000,
      message: 'the push to wait for the space lock in an instance',
    });
    const victim = servers[first - 1];
    await victim.stop({ signal: 'SIGKILL' });
    const second = await waitFor(
      () => waitingInstances(databaseUrl).find((i) => i !== first),
      { timeout: 10_000, message: 'the push sent on to another instance' },
    );
    lock.release();
    await pushedAndPulled(rep, { timeout: 30_000 });
    await Promise.all(reps.map((r) => pushedAndPulled(r)));
    await checkExact(servers[second - 1], reps, made, space);
    const retried = nginx
      .accessLines()
      .slice(pushesBefore)
      .find((l) => /\/push /.test(l) && /upstream=\S+, /.test(l));
    assert.ok(retried, `nginx's log shows the push tried twice:\n${nginx.accessLines().slice(pushesBefore).join('\n')}`);
    assert.match(retried, /" 200 /, 'the client got 200 from the second instance');
    await victim.restart();

    // Figures.
    const served = servedPerInstance(nginx.accessLines(), servers);
    const groups = await Promise.all(reps.slice(0, CLIENTS).map((r) => r.clientGroupID));
    const gaps = groups.map((group) => longestGap(group, nginx.url, restartFrom, restartUntil));
    t.diagnostic(
      `${CLIENTS + 1} clients, ${INSTANCES} instances, ${made.reduce((a, b) => a + b, 0)} mutations ` +
        `through nginx (+${INSTANCES} direct), ${restarts} rolling restarts + 1 SIGKILL; ` +
        `lost 0, doubled 0; pokes seen ${pokes.length}`,
    );
    t.diagnostic(`requests served per instance (nginx log): ${JSON.stringify(served)}`);
    const resent = nginx.accessLines().filter((l) => /upstream=\S+, /.test(l)).length;
    t.diagnostic(`requests nginx sent on to another instance after a failed attempt: ${resent}`);
    t.diagnostic(
      `during the rolling restart: ${seen.length} requests, ${failed.length} failed as seen by clients; ` +
        `longest push ${Math.max(...gaps.map((g) => g.longestPush)).toFixed(0)} ms, ` +
        `longest gap between a client's successful pushes ${Math.max(...gaps.map((g) => g.longestGap)).toFixed(0)} ms`,
    );
    t.diagnostic(`SIGKILL: push waited in instance ${first}, was sent on to instance ${second}: ${retried.trim()}`);
    t.diagnostic(`scenario time ${((performance.now() - startedAt) / 1000).toFixed(1)} s`);
  },
);

/** The value of an unlabelled counter in Prometheus text. */
function counter(text, name) {
  const m = new RegExp(`^${name} (\\d+)`, 'm').exec(text);
  return m ? Number(m[1]) : 0;
}

/**
 * Exact totals on the server: `count` is every client's increments, `c<k>` client k's, and
 * each client's last mutation id on the server is the number of mutations it made.
 */
async function checkExact(server, reps, made, space) {
  const { data } = await server.snapshot(space);
  const total = made.reduce((a, b) => a + b, 0) / 2;
  assert.equal(data.count, total, 'count: no increment lost or doubled');
  for (const [k, rep] of reps.entries()) {
    assert.equal(data[`c${k}`], made[k] / 2, `c${k}: client ${k}'s increments exactly once`);
    const pulled = await server.pull(space, { clientGroupID: await rep.clientGroupID });
    assert.equal(
      pulled.lastMutationIDChanges[rep.clientID],
      made[k],
      `client ${k}'s last mutation id on the server`,
    );
    await converges(rep, total);
  }
}

/**
 * Waits until `rep` shows `count` = `expected`, pulling as it waits: each client's own
 * mutations are acknowledged by then, but others' may have landed after its last pull.
 */
async function converges(rep, expected) {
  let seen;
  await waitFor(
    async () => {
      await rep.pull();
      seen = await readKey(rep, 'count');
      return seen === expected;
    },
    { timeout: 15_000, interval: 100, message: `${rep.e2eName} to converge on count ${expected} (it shows ${seen})` },
  );
}

/** Replicache's requests to `url` that started between `from` and `until`. */
function requestsThrough(url, from, until) {
  return fetchLog.filter((e) => e.url.startsWith(url) && e.kind && e.start >= from && e.start <= until);
}

/** A client's longest push and longest time between two successful pushes, in a window. */
function longestGap(clientGroupID, url, from, until) {
  const mine = fetchLog.filter(
    (e) =>
      e.url.startsWith(url) &&
      e.kind === 'push' &&
      e.clientGroupID === clientGroupID &&
      e.start >= from &&
      e.start <= until &&
      e.end,
  );
  let longestPush = 0;
  let longestGap = 0;
  let lastOk;
  for (const e of mine) {
    longestPush = Math.max(longestPush, e.end - e.start);
    if (e.status === 200) {
      if (lastOk !== undefined) longestGap = Math.max(longestGap, e.end - lastOk);
      lastOk = e.end;
    }
  }
  return { longestPush, longestGap };
}

/** From nginx's access log: pushes and pulls each instance answered (the last one tried). */
function servedPerInstance(lines, servers) {
  const served = Object.fromEntries(servers.map((_, i) => [`instance ${i + 1}`, { push: 0, pull: 0 }]));
  for (const line of lines) {
    const kind = /\/(push|pull) /.exec(line)?.[1];
    const last = /upstream=(?:\S+, )*(\S+) /.exec(line)?.[1];
    const i = servers.findIndex((s) => last === `127.0.0.1:${s.port}`);
    if (kind && i >= 0) served[`instance ${i + 1}`][kind]++;
  }
  return served;
}

/** Holds the space's row lock in a psql session until `release()`; pushes to it wait. */
async function holdSpaceLock(databaseUrl, space) {
  const psql = spawn('psql', [databaseUrl, '-qAt', '-v', 'ON_ERROR_STOP=1'], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  let out = '';
  psql.stdout.on('data', (chunk) => (out += chunk));
  psql.stdin.write(`BEGIN;\nSELECT 'locked:' || id FROM replisync_spaces WHERE id = '${space}' FOR UPDATE;\n`);
  await waitFor(() => out.includes(`locked:${space}`), { timeout: 10_000, message: 'the space lock' });
  return {
    release() {
      psql.stdin.end('COMMIT;\n');
    },
  };
}

/** The instances (1, 2, ...) with a database session waiting for a lock now. */
function waitingInstances(databaseUrl) {
  const out = execFileSync(
    'psql',
    [
      databaseUrl,
      '-qAtc',
      "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND application_name LIKE 'replisync-%'",
    ],
    { encoding: 'utf8', timeout: 10_000 },
  );
  return out
    .split('\n')
    .filter(Boolean)
    .map((name) => Number(name.split('-')[1]));
}
