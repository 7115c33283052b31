// Scenario 19: a real Prometheus scrapes replisync. Prometheus (the Debian package's binary) runs
// deploy/prometheus/prometheus.yml, only its intervals (1 s) and targets rewritten, with
// deploy/prometheus/alerts.yml; replisync runs on Postgres (whatever E2E_STORE says), checks
// RS256 tokens against a JWKS this test serves, and has Pusher (on a port where nothing listens,
// so its pokes are given up), socket.io (a private Redis) and SSE all on, so that every metric
// family the deploy/ files name is exported.
//  a) under a short push and pull load of plain fetches (one mutation per push, a few client
//     groups), the push p99 Prometheus computes with histogram_quantile lies within the range
//     of latencies the client measured, and its request counters equal the requests sent;
//     promtool accepts both files; Prometheus loads and evaluates every alert rule, and the one
//     the dead Pusher should fire fires; every metric name in the dashboard and in the alert rules
//     is in the live /metrics, and every dashboard query is one Prometheus accepts;
//  b) hostile requests (random paths carrying tokens in the query, made-up methods, long
//     headers) add no series: the route and method labels stay a fixed, small set.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { generateKeyPairSync, sign } from 'node:crypto';
import path from 'node:path';
import {
  E2E, REPO_DIR, uniqueId, waitFor, withTimeout, freePort, realFetch, promtoolBin, bearer,
} from '../harness.mjs';

const PUSH_ROUTE = '/spaces/{space}/push';
const PULL_ROUTE = '/spaces/{space}/pull';
const GROUPS = 4; // client groups pushing and pulling concurrently, over two spaces
const ROUNDS = 60; // per group: one push of one mutation, then one pull, each round
const LOAD_TIMEOUT_MS = 120_000;

const PROMETHEUS_DIR = path.join(REPO_DIR, 'deploy', 'prometheus');
const DASHBOARD = path.join(REPO_DIR, 'deploy', 'grafana', 'replisync.json');

// histogram_quantile finds the bucket holding the quantile and interpolates linearly inside it;
// the buckets double (50 us, 100 us, ... 26 s), so its answer is within a factor 2 of the true
// quantile of what the server observed. Upper bound, 2 x the client's slowest push: the server's
// clock for a request starts after the client sent it and stops before the client has the answer,
// so each duration it observed is below the client's for that request. Lower bound, a quarter of
// the client's fastest push: the server's p99 is among its three slowest of 240 durations, so
// the answer falls below the bound only if the server's share of all but two pushes is under half
// of the client's fastest round trip; here it is about half of the mean (the test prints both
// means) and the answer lands 5 to 40 times above the bound. Both bounds are loose on purpose:
// what they must catch is a unit error (a histogram in milliseconds answers 26.2 s, its last
// bucket; one divided by 1000 answers 0.16 ms) and an empty histogram (NaN).
const QUANTILE_LOW_FACTOR = 1 / 4;
const QUANTILE_HIGH_FACTOR = 2;

test(
  '19a. a real Prometheus scrapes replisync under load: push p99 within the client-measured range, exact request counts, deploy/ files valid and naming only live metrics',
  { timeout: 240_000 },
  async (t) => {
    const env = new E2E();
    t.after(() => env.cleanup());

    // The deploy/ files as an operator would check them.
    const promtool = promtoolBin();
    execFileSync(promtool, ['check', 'config', path.join(PROMETHEUS_DIR, 'prometheus.yml')], { stdio: 'pipe' });
    execFileSync(promtool, ['check', 'rules', path.join(PROMETHEUS_DIR, 'alerts.yml')], { stdio: 'pipe' });

    const spaces = [uniqueId('prom-a-'), uniqueId('prom-b-')];
    const provider = await identityProvider(env);
    const auth = bearer(provider.token({ sub: 'loader', spaces }));
    const redis = await env.startRedis();
    const server = await env.startReplisync({
      databaseUrl: env.newDatabaseUrl({ store: 'postgres' }),
      pusher: { port: await freePort() }, // nothing listens there: pokes are given up
      socketio: { redisUrl: redis.url, key: uniqueId('sio-') },
      env: { REPLISYNC_SSE: 'true', REPLISYNC_JWT_JWKS_URL: provider.jwksUrl },
    });
    const prometheus = await env.startPrometheus([server]);
    await prometheus.scrapedAfter(Date.now());

    const watcher = env.sse(server, spaces[0], { auth: provider.token({ sub: 'watcher', spaces }) });
    await watcher.connected;

    // The load: each group pushes one increment and pulls from its last cookie, ROUNDS times.
    const latencies = { push: [], pull: [] };
    const sent = { push: 0, pull: 0 };
    const loadStarted = performance.now();
    await withTimeout(
      Promise.all(
        Array.from({ length: GROUPS }, async (_, g) => {
          const space = spaces[g % spaces.length];
          const clientGroupID = uniqueId('cg-');
          const clientID = uniqueId('c-');
          let cookie = null;
          for (let k = 0; k < ROUNDS; k++) {
            sent.push++;
            const push = await server.push(space, {
              auth,
              clientGroupID,
              clientID,
              firstID: k + 1,
              mutations: [{ name: 'increment', args: { key: 'n', delta: 1 } }],
            });
            assert.equal(push.status, 200, `push ${k + 1} of ${clientGroupID}: ${push.body}`);
            latencies.push.push(push.ms / 1000);

            sent.pull++;
            const t0 = performance.now();
            const res = await server.pullRaw(space, { clientGroupID, cookie, auth });
            const body = await res.json();
            latencies.pull.push((performance.now() - t0) / 1000);
            assert.equal(res.status, 200, `pull ${k + 1} of ${clientGroupID}`);
            cookie = body.cookie;
          }
        }),
      ),
      LOAD_TIMEOUT_MS,
      `${GROUPS} groups x ${ROUNDS} pushes and pulls`,
    );
    const loadSeconds = (performance.now() - loadStarted) / 1000;
    const loadEnded = Date.now();
    const snapshot = await server.snapshot(spaces[0], { auth });
    assert.equal(snapshot.data.n, ROUNDS * Math.ceil(GROUPS / spaces.length), 'every increment applied once');
    // The snapshot's pull and the SSE stream are requests too, but not on the push route; the
    // pull route's count is read before that pull could matter: it is compared below with
    // `sent.pull + 1`.
    await prometheus.scrapedAfter(Date.now());

    const pushStats = stats(latencies.push);
    const pullStats = stats(latencies.pull);
    t.diagnostic(
      `load: ${sent.push} pushes, ${sent.pull} pulls in ${loadSeconds.toFixed(1)} s; client-measured ` +
        `push ${fmt(pushStats)}; pull ${fmt(pullStats)}`,
    );

    const serverMean = await prometheus.scalar(
      'sum(replisync_push_duration_seconds_sum) / sum(replisync_push_duration_seconds_count)',
    );
    t.diagnostic(`push mean: client ${ms(pushStats.mean)}, push service ${ms(serverMean)} (Prometheus)`);

    // The push p99, from the push service's histogram and from the request histogram.
    const low = pushStats.min * QUANTILE_LOW_FACTOR;
    const high = pushStats.max * QUANTILE_HIGH_FACTOR;
    for (const [what, expr] of [
      ['push service', 'histogram_quantile(0.99, sum by (le) (replisync_push_duration_seconds_bucket))'],
      [
        'push requests',
        `histogram_quantile(0.99, sum by (le) (replisync_http_request_duration_seconds_bucket{route="${PUSH_ROUTE}"}))`,
      ],
    ]) {
      const p99 = await prometheus.scalar(expr);
      t.diagnostic(`${what} p99 from Prometheus: ${ms(p99)} (accepted ${ms(low)} .. ${ms(high)})`);
      assert.ok(
        Number.isFinite(p99) && p99 >= low && p99 <= high,
        `${what}: ${expr} = ${p99}, outside ${low} .. ${high} s (client min ${pushStats.min} s, max ${pushStats.max} s)`,
      );
    }

    // The request counters: exactly the requests sent, by route.
    assert.equal(
      await prometheus.scalar(`sum(replisync_http_requests_total{route="${PUSH_ROUTE}"})`),
      sent.push,
      'pushes counted by Prometheus',
    );
    assert.equal(
      await prometheus.scalar(`sum(replisync_http_requests_total{route="${PULL_ROUTE}"})`),
      sent.pull + 1, // and the snapshot's pull
      'pulls counted by Prometheus',
    );
    assert.equal(
      await prometheus.scalar(`sum(replisync_http_request_duration_seconds_count{route="${PUSH_ROUTE}"})`),
      sent.push,
      'pushes observed by the request histogram',
    );
    assert.equal(
      await prometheus.scalar('sum(replisync_push_duration_seconds_count)'),
      sent.push,
      'pushes observed by the push histogram',
    );

    // Alert rules: all of alerts.yml loaded, each evaluated without error since the load ended,
    // and the dead Pusher's given-up pokes fire ReplisyncPokesGivenUp{service="pusher"} (no `for`).
    const alertCount = (readFileSync(path.join(PROMETHEUS_DIR, 'alerts.yml'), 'utf8').match(/^\s*- alert: /gm) ?? []).length;
    const rules = await waitFor(
      async () => {
        const { groups } = await prometheus.api('rules');
        const all = groups.flatMap((group) => group.rules);
        return all.length === alertCount && all.every((r) => Date.parse(r.lastEvaluation) > loadEnded) && all;
      },
      { timeout: 30_000, interval: 250, message: `Prometheus to load and evaluate the ${alertCount} alert rules` },
    );
    for (const rule of rules) {
      assert.equal(rule.health, 'ok', `alert ${rule.name}: ${rule.lastError}`);
      assert.ok(rule.annotations?.summary && rule.annotations?.description?.length > 80, `alert ${rule.name} says what to do`);
    }
    const firing = await waitFor(
      async () => {
        const { alerts } = await prometheus.api('alerts');
        const live = alerts.filter((a) => a.state === 'firing');
        return live.some((a) => a.labels.alertname === 'ReplisyncPokesGivenUp' && a.labels.service === 'pusher') && live;
      },
      { timeout: 30_000, interval: 250, message: 'ReplisyncPokesGivenUp to fire for the unreachable Pusher' },
    );
    assert.deepEqual(
      [...new Set(firing.map((a) => a.labels.alertname))],
      ['ReplisyncPokesGivenUp'],
      'no other alert fires under a healthy load',
    );

    // Every metric the dashboard and the alert rules name is in the live /metrics.
    const metricsText = await (await realFetch(`${server.url}/metrics`)).text();
    const live = exportedNames(metricsText);
    const dashboard = JSON.parse(readFileSync(DASHBOARD, 'utf8'));
    const queries = dashboardQueries(dashboard);
    const named = new Map(); // metric name -> where it is used
    for (const { where, expr } of [
      ...queries,
      ...rules.map((r) => ({ where: `alert ${r.name}`, expr: r.query })),
    ]) {
      for (const name of metricNames(expr)) {
        if (!named.has(name)) named.set(name, where);
      }
    }
    assert.ok(named.size > 30, `the deploy/ files name ${named.size} metrics`);
    const missing = [...named].filter(([name]) => !live.has(name)).map(([name, where]) => `${name} (${where})`);
    assert.deepEqual(missing, [], 'metrics named in deploy/ but not in the live /metrics');

    // Every dashboard query is one Prometheus accepts (Grafana's variables filled in), and the
    // panels this load feeds show data.
    const mustShowData = new Set([
      'Pushes and pulls per second',
      'Push latency',
      'Pull latency',
      'Request latency by route (p99)',
      'Pushes per group',
      'Poke delay by service',
      'Database pool',
      'Process memory',
      'Process CPU',
    ]);
    const empty = [];
    for (const { where, panel, expr } of queries) {
      const result = await prometheus.query(grafanaToPromQL(expr)).catch((e) => {
        throw new Error(`${where}: Prometheus refuses ${expr}: ${e.message}`);
      });
      if (mustShowData.has(panel) && result.length === 0) empty.push(`${where}: ${expr}`);
    }
    assert.deepEqual(empty, [], 'panels with no data after the load');
    for (const panel of mustShowData) {
      assert.ok(queries.some((q) => q.panel === panel), `the dashboard has a panel "${panel}"`);
    }
  },
);

test(
  '19b. hostile requests add no series to /metrics: random paths, tokens in query strings, made-up methods, long headers',
  { timeout: 60_000 },
  async (t) => {
    const env = new E2E();
    t.after(() => env.cleanup());
    const server = await env.startReplisync();
    const secret = uniqueId('tok');

    const routes = new Set([...knownRoutes(), 'unmatched']);
    const hostileRound = async (round) => {
      const requests = [];
      for (let i = 0; i < 60; i++) {
        const junk = uniqueId(`r${round}-`);
        requests.push(
          [`/${junk}/${i}?auth=${secret}&token=${secret}`, { method: 'GET' }],
          [`/spaces/${junk}/nothing-here?auth=${secret}`, { method: 'POST', body: 'x' }],
          [`/spaces/${junk}/push`, { method: 'GET' }], // a known path, the wrong method
          [`/healthz`, { method: `M${junk.toUpperCase()}` }], // a made-up method (a valid token)
          [`/${junk}`, { method: 'GET', headers: { 'x-replicache-requestid': junk.repeat(500) } }],
        );
      }
      for (const [pathAndQuery, init] of requests) {
        const res = await realFetch(`${server.url}${pathAndQuery}`, { ...init, signal: AbortSignal.timeout(5_000) });
        await res.arrayBuffer();
        assert.ok(res.status >= 400 && res.status < 500, `${init.method} ${pathAndQuery} answered ${res.status}`);
      }
    };

    const seriesOf = async () => {
      const text = await (await realFetch(`${server.url}/metrics`)).text();
      const lines = text.split('\n').filter((l) => /^replisync_http_request/.test(l));
      return { text, lines };
    };
    await seriesOf(); // GET /metrics has its own series from its first answer on
    await hostileRound(1);
    const first = await seriesOf();
    await hostileRound(2);
    const second = await seriesOf();

    assert.ok(first.lines.length > 0, 'replisync_http_request* series in /metrics');
    assert.ok(!second.text.includes(secret), 'a token from a query string reached /metrics');
    assert.ok(!/r[12]-/i.test(second.text), 'a random path or method reached /metrics');
    const labelValues = (name) =>
      new Set(second.lines.flatMap((l) => [...l.matchAll(new RegExp(`[{,]${name}="([^"]*)"`, 'g'))].map((m) => m[1])));
    const unknownRoutes = [...labelValues('route')].filter((r) => !routes.has(r));
    assert.deepEqual(unknownRoutes, [], 'route label values beyond the routes and "unmatched"');
    const methods = [...labelValues('method')];
    assert.ok(methods.length <= 10, `method label values: ${methods.join(', ')}`);
    assert.equal(
      second.lines.length,
      first.lines.length,
      `a second round of 300 new hostile requests added series:\n${second.lines
        .filter((l) => !first.lines.some((f) => f.split(' ')[0] === l.split(' ')[0]))
        .join('\n')}`,
    );
    t.diagnostic(`request series after 600 hostile requests: ${second.lines.length}; methods: ${methods.join(', ')}`);
  },
);

// ---------------------------------------------------------------------------------------------

/**
 * An identity provider for REPLISYNC_JWT_JWKS_URL: an RSA key pair, its public half served as a
 * JWKS on a loopback port (plain http is allowed on loopback), and `token(claims)` signing RS256
 * tokens with it (valid for an hour).
 */
async function identityProvider(env) {
  const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const kid = uniqueId('key-');
  const jwks = JSON.stringify({ keys: [{ ...publicKey.export({ format: 'jwk' }), kid, alg: 'RS256', use: 'sig' }] });
  const http = createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' }).end(jwks);
  });
  await new Promise((resolve) => http.listen(0, '127.0.0.1', resolve));
  env.defer(() => new Promise((resolve) => http.close(resolve).closeAllConnections()));
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  return {
    jwksUrl: `http://127.0.0.1:${http.address().port}/jwks.json`,
    token(claims) {
      const now = Math.floor(Date.now() / 1000);
      const signed = `${b64({ alg: 'RS256', typ: 'JWT', kid })}.${b64({ iat: now, exp: now + 3600, ...claims })}`;
      return `${signed}.${sign('sha256', Buffer.from(signed), privateKey).toString('base64url')}`;
    },
  };
}

/** min, p50, p99, max and mean of `values` (seconds). */
function stats(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const at = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  const mean = values.reduce((a, b) => a + b, 0) / values.length;
  return { min: sorted[0], p50: at(0.5), p99: at(0.99), max: sorted[sorted.length - 1], mean };
}

function ms(seconds) {
  return `${(seconds * 1000).toFixed(2)} ms`;
}

function fmt({ min, p50, p99, max }) {
  return `min ${ms(min)}, p50 ${ms(p50)}, p99 ${ms(p99)}, max ${ms(max)}`;
}

/**
 * The sample names a /metrics page exports: every sample line's name, and the names each
 * declared family stands for even before it has a sample (a labelled family with no label set
 * yet): in OpenMetrics a counter `x` is sampled as `x_total`, a histogram as `x_bucket`, `x_sum`
 * and `x_count`, an info as `x_info`.
 */
function exportedNames(text) {
  const names = new Set();
  for (const line of text.split('\n')) {
    const declared = /^# TYPE (\S+) (\S+)/.exec(line);
    if (declared) {
      const [, family, type] = declared;
      const base = family.replace(/_total$/, '');
      const byType = {
        counter: [`${base}_total`],
        gauge: [family],
        histogram: [`${family}_bucket`, `${family}_sum`, `${family}_count`],
        info: [`${base.replace(/_info$/, '')}_info`],
        summary: [family, `${family}_sum`, `${family}_count`],
        unknown: [family],
        stateset: [family],
        gaugehistogram: [`${family}_bucket`, `${family}_gsum`, `${family}_gcount`],
      }[type] ?? [family];
      for (const name of byType) names.add(name);
      continue;
    }
    const sample = /^([A-Za-z_:][A-Za-z0-9_:]*)[{ ]/.exec(line);
    if (sample) names.add(sample[1]);
  }
  return names;
}

/** Every PromQL expression of the dashboard: panels' targets and query variables. */
function dashboardQueries(dashboard) {
  const out = [];
  const walk = (panels) => {
    for (const panel of panels ?? []) {
      for (const target of panel.targets ?? []) {
        if (target.expr) out.push({ where: `panel "${panel.title}" ${target.refId}`, panel: panel.title, expr: target.expr });
      }
      walk(panel.panels);
    }
  };
  walk(dashboard.panels);
  for (const variable of dashboard.templating?.list ?? []) {
    const query = typeof variable.query === 'string' ? variable.query : variable.query?.query;
    if (variable.type === 'query' && query) {
      const m = /^label_values\((.+),\s*\w+\)$/.exec(query);
      out.push({ where: `variable $${variable.name}`, panel: undefined, expr: m ? m[1] : query });
    }
  }
  return out;
}

/** The metric names (replisync_* and process_*) an expression uses. */
function metricNames(expr) {
  return new Set([...expr.matchAll(/\b(?:replisync|process)_[a-zA-Z0-9_]+/g)].map((m) => m[0]));
}

/** A dashboard expression with Grafana's variables replaced as Grafana would for "All". */
function grafanaToPromQL(expr) {
  return expr
    .replaceAll('$__rate_interval', '30s')
    .replaceAll('$__interval', '5s')
    .replaceAll('$instance', '.*')
    .replaceAll('$job', '.*');
}

/** Every route pattern the routes table of docs/code-map or the router knows, read from src/http/mod.rs. */
function knownRoutes() {
  const source = readFileSync(path.join(REPO_DIR, 'src', 'http', 'mod.rs'), 'utf8');
  return [...source.matchAll(/"(\/[a-z{}/_-]*)"/g)].map((m) => m[1]);
}
