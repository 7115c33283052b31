// Test harness for replisync's end-to-end tests.
//
// Starts sockudo, a private redis-server, Prometheus and the replisync binary as child processes on free
// loopback ports, with a temp SQLite file or a fresh Postgres database; makes Replicache clients, pusher-js clients
// and SSE readers; and tears all of it down at the end of a test, also when the test fails.
// replisync is stopped with SIGTERM and must exit by itself with status 0 within its grace
// period; anything else (a SIGKILL needed, another status, a crash) fails the test.
// Every wait is bounded by a timeout and every loop by a count.
//
// Environment:
//   REPLISYNC_BIN      replisync binary (default ../../target/debug/replisync from here)
//   SOCKUDO_BIN        sockudo binary (default: `sockudo` on PATH, else ~/.cargo/bin/sockudo)
//   E2E_STORE          sqlite (default) or postgres
//   E2E_POSTGRES_URL   server to make databases in (default postgres://postgres@127.0.0.1:5432)
//   NGINX_BIN          nginx binary (default: `nginx` on PATH; scenario 14)
//   PROMETHEUS_BIN     prometheus binary (default: `prometheus` on PATH; scenario 19), and
//   PROMTOOL_BIN       promtool (default: the one beside it, else `promtool` on PATH)
//   E2E_VERBOSE=1      echo child logs and Replicache logs to stderr as they arrive

import { spawn, execFileSync } from 'node:child_process';
import {
  mkdtempSync, rmSync, existsSync, mkdirSync, readFileSync, writeFileSync, chmodSync, openSync, closeSync,
} from 'node:fs';
import { tmpdir, homedir } from 'node:os';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomUUID, createHmac } from 'node:crypto';
import { setTimeout as delay } from 'node:timers/promises';
import { Replicache } from 'replicache';
import PusherPkg from 'pusher-js';

const Pusher = PusherPkg.default ?? PusherPkg;

export const E2E_DIR = path.dirname(fileURLToPath(import.meta.url));
export const REPO_DIR = path.resolve(E2E_DIR, '..', '..');
export const ARTIFACTS_DIR = path.join(E2E_DIR, 'artifacts');
export const VERBOSE = process.env.E2E_VERBOSE === '1';

export const REPLISYNC_BIN = path.resolve(
  E2E_DIR,
  process.env.REPLISYNC_BIN ?? '../../target/debug/replisync',
);

export function sockudoBin() {
  if (process.env.SOCKUDO_BIN) return process.env.SOCKUDO_BIN;
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (dir && existsSync(path.join(dir, 'sockudo'))) return path.join(dir, 'sockudo');
  }
  return path.join(homedir(), '.cargo', 'bin', 'sockudo');
}

export const PUSHER_APP = {
  appId: '12345',
  key: 'app-key-abc',
  secret: 'app-secret-xyz',
};

export const STORE = process.env.E2E_STORE ?? 'sqlite';
const POSTGRES_URL = process.env.E2E_POSTGRES_URL ?? 'postgres://postgres@127.0.0.1:5432';

// ---------------------------------------------------------------------------------------------
// Small utilities

export function log(...args) {
  if (VERBOSE) console.error('[e2e]', ...args);
}

/** Polls `fn` until it returns a truthy value (which is returned), at most `timeout` ms. */
export async function waitFor(fn, { timeout = 10_000, interval = 25, message = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  const maxRounds = Math.ceil(timeout / interval) + 2;
  let lastError;
  for (let round = 0; round < maxRounds; round++) {
    try {
      const v = await fn();
      if (v) return v;
      lastError = undefined;
    } catch (e) {
      if (e?.fatal) throw e; // e.g. the process being waited on has exited
      lastError = e;
    }
    if (Date.now() >= deadline) break;
    await delay(interval);
  }
  const detail = lastError ? ` (last error: ${lastError.message ?? lastError})` : '';
  throw new Error(`timed out after ${timeout} ms waiting for ${message}${detail}`);
}

/** An error that makes waitFor stop at once instead of polling until its timeout. */
export function fatal(message) {
  const e = new Error(message);
  e.fatal = true;
  return e;
}

/** Rejects with a clear message if `promise` does not settle within `ms`. */
export async function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** A free TCP port on 127.0.0.1 (bound and released; a tiny race is possible). */
export async function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

export function uniqueId(prefix = 's') {
  return `${prefix}${randomUUID().replaceAll('-', '').slice(0, 12)}`;
}

// ---------------------------------------------------------------------------------------------
// Tokens: HS256 JWTs made with node's crypto, for replisync started with REPLISYNC_JWT_SECRET.

/** The secret the token scenarios give replisync (REPLISYNC_JWT_SECRET) and sign with. */
export const JWT_SECRET = 'e2e-jwt-secret-not-for-production';

function base64url(value) {
  return Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');
}

/**
 * An HS256 (or HS384/HS512) JWT. `claims` are copied as they are (sub, spaces, spaces_read,
 * nbf, ...); `exp` defaults to now + `ttl` seconds (default 300). Pass `exp: null` for a
 * token without expiry.
 */
export function signToken(claims, { secret = JWT_SECRET, alg = 'HS256', ttl = 300 } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const payload = { iat: now, exp: now + ttl, ...claims };
  if (payload.exp === null) delete payload.exp;
  const head = `${base64url({ alg, typ: 'JWT' })}.${base64url(payload)}`;
  const hash = { HS256: 'sha256', HS384: 'sha384', HS512: 'sha512' }[alg];
  if (!hash) throw new Error(`signToken: unsupported alg ${alg}`);
  return `${head}.${createHmac(hash, secret).update(head).digest('base64url')}`;
}

/** `Bearer <token>`: what Replicache's `auth` option and raw requests send. */
export function bearer(token) {
  return `Bearer ${token}`;
}

// ---------------------------------------------------------------------------------------------
// Fetch tap: every fetch this process makes (Replicache's pushes and pulls included) is
// recorded, so tests can tell which client group pushed or pulled, when, and how it went.

export const fetchLog = [];
const realFetch = globalThis.fetch;
if (!globalThis.__e2eFetchTapped) {
  globalThis.__e2eFetchTapped = true;
  globalThis.fetch = async function tappedFetch(input, init) {
    const url = typeof input === 'string' ? input : input instanceof URL ? input.href : input.url;
    const entry = { url, start: performance.now(), kind: undefined, clientGroupID: undefined };
    const m = /\/spaces\/([^/]+)\/(push|pull)(?:\?|$)/.exec(url);
    if (m) {
      entry.space = decodeURIComponent(m[1]);
      entry.kind = m[2];
      try {
        // Replicache 15 passes a Request object; raw helpers pass (url, init).
        const text =
          typeof init?.body === 'string'
            ? init.body
            : typeof input === 'object' && 'clone' in input
              ? await input.clone().text()
              : '{}';
        const body = JSON.parse(text);
        entry.clientGroupID = body.clientGroupID;
        entry.cookie = body.cookie;
        entry.mutationIDs = body.mutations?.map((x) => x.id);
      } catch {
        // not JSON: leave undefined
      }
    }
    if (fetchLog.length < 100_000) fetchLog.push(entry);
    try {
      const res = await realFetch(input, init);
      entry.status = res.status;
      entry.end = performance.now();
      return res;
    } catch (e) {
      entry.error = String(e?.cause?.code ?? e?.message ?? e);
      entry.end = performance.now();
      throw e;
    }
  };
}

/** Replicache requests of one client group (kind: 'push' | 'pull' | undefined for both). */
export function requestsOf(clientGroupID, kind) {
  return fetchLog.filter((e) => e.clientGroupID === clientGroupID && (!kind || e.kind === kind));
}

/**
 * Records every pull answer (status 200) Replicache gets in this process: the client group,
 * the Authorization it sent, the cookie it sent, when it started and the parsed answer.
 */
export function recordPullAnswers(t) {
  const answers = [];
  const inner = globalThis.fetch;
  globalThis.fetch = async (input, init) => {
    const isRequest = typeof input === 'object' && 'clone' in input;
    const url = new URL(isRequest ? input.url : String(input));
    if (!url.pathname.endsWith('/pull')) return inner(input, init);
    const sent = isRequest ? input.clone() : undefined;
    const start = performance.now();
    const res = await inner(input, init);
    if (res.status === 200) {
      const body = JSON.parse(sent ? await sent.text() : init.body);
      const headers = sent ? sent.headers : new Headers(init?.headers);
      answers.push({
        clientGroupID: body.clientGroupID,
        auth: headers.get('authorization'),
        cookie: body.cookie,
        start,
        answer: await res.clone().json(),
      });
    }
    return res;
  };
  t.after(() => {
    globalThis.fetch = inner;
  });
  return answers;
}

// ---------------------------------------------------------------------------------------------
// Child processes

const liveChildren = new Set();
function killAllChildrenSync() {
  for (const child of liveChildren) {
    try {
      child.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
}
process.on('exit', killAllChildrenSync);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.once(sig, () => {
    killAllChildrenSync();
    process.exit(130);
  });
}

class ChildProcess {
  /** `stdout`: a file descriptor to write standard output to instead of `lines`. */
  constructor(name, cmd, args, { env, cwd, stdout = 'pipe' }) {
    this.name = name;
    this.lines = [];
    this.exited = false;
    this.exitCode = undefined;
    this.signal = undefined;
    this.child = spawn(cmd, args, {
      cwd,
      env,
      stdio: ['ignore', stdout, 'pipe'],
    });
    liveChildren.add(this.child);
    this.exitPromise = new Promise((resolve) => {
      this.child.on('exit', (code, signal) => {
        this.exited = true;
        this.exitCode = code;
        this.signal = signal;
        liveChildren.delete(this.child);
        resolve();
      });
      this.child.on('error', (err) => {
        this.lines.push(`[spawn error] ${err.message}`);
        this.exited = true;
        liveChildren.delete(this.child);
        resolve();
      });
    });
    for (const stream of [this.child.stdout, this.child.stderr].filter(Boolean)) {
      let buf = '';
      stream.setEncoding('utf8');
      stream.on('data', (chunk) => {
        buf += chunk;
        let i;
        while ((i = buf.indexOf('\n')) >= 0) {
          this.pushLine(buf.slice(0, i));
          buf = buf.slice(i + 1);
        }
      });
      stream.on('end', () => {
        if (buf) this.pushLine(buf);
        buf = '';
      });
    }
  }

  pushLine(line) {
    if (this.lines.length < 200_000) this.lines.push(line);
    if (VERBOSE) console.error(`[${this.name}] ${line}`);
  }

  get pid() {
    return this.child.pid;
  }

  get output() {
    return this.lines.join('\n');
  }

  /** Waits for a log line matching `re`, looking at lines from index `from` on. */
  async waitForLine(re, { timeout = 10_000, from = 0, message } = {}) {
    return waitFor(
      () => {
        for (let i = from; i < this.lines.length; i++) {
          const m = re.exec(this.lines[i]);
          if (m) return m;
        }
        if (this.exited) {
          throw fatal(`${this.name} exited (code ${this.exitCode}, signal ${this.signal})`);
        }
        return null;
      },
      { timeout, message: message ?? `${this.name} log line ${re}` },
    ).catch((e) => {
      throw new Error(`${e.message}\n--- ${this.name} output (last 40 lines) ---\n${this.tail(40)}`);
    });
  }

  tail(n = 40) {
    return this.lines.slice(-n).join('\n');
  }

  /** Stops the process: `signal` first, SIGKILL if it is still running after `graceMs`. */
  async stop({ signal = 'SIGTERM', graceMs = 5_000 } = {}) {
    this.stopRequested = true;
    if (this.exited) return;
    try {
      this.child.kill(signal);
    } catch {
      // gone already
    }
    const done = await withTimeout(this.exitPromise, graceMs, 'exit').then(
      () => true,
      () => false,
    );
    if (!done) {
      log(`${this.name} did not stop within ${graceMs} ms of ${signal}; killing`);
      this.stoppedByKill = true;
      try {
        this.child.kill('SIGKILL');
      } catch {
        // gone
      }
      await withTimeout(this.exitPromise, 5_000, `${this.name} exit after SIGKILL`);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The scope of one test: everything it starts is registered here and cleaned up in reverse.

export class E2E {
  constructor(label = 'test') {
    this.label = label;
    this.cleanups = [];
    this.tmp = mkdtempSync(path.join(tmpdir(), 'replisync-e2e-'));
    this.defer(() => rmSync(this.tmp, { recursive: true, force: true }));
  }

  /** Registers a cleanup function (run last-in, first-out; each bounded to `timeoutMs`). */
  defer(fn, { timeoutMs = 15_000 } = {}) {
    this.cleanups.push({ fn, timeoutMs });
  }

  /**
   * Runs every cleanup step. Errors are logged, except those that fail the test (a replisync
   * that did not exit cleanly, see `exitFailure`): once every step has run, they are thrown.
   */
  async cleanup() {
    const errors = [];
    while (this.cleanups.length) {
      const { fn, timeoutMs } = this.cleanups.pop();
      try {
        await withTimeout(Promise.resolve().then(fn), timeoutMs, 'cleanup step');
      } catch (e) {
        errors.push(e);
      }
    }
    killAllChildrenSync();
    if (errors.length) log('cleanup errors:', errors.map((e) => e.message).join('; '));
    const failures = errors.filter((e) => e.failsTest);
    if (failures.length) throw new Error(failures.map((e) => e.message).join('\n\n'));
  }

  // --- Databases -----------------------------------------------------------------------

  /**
   * A fresh, empty database URL for replisync: a new SQLite file or a new Postgres database
   * (`store` overrides E2E_STORE, for scenarios that need Postgres whatever the run).
   */
  newDatabaseUrl({ store = STORE } = {}) {
    if (store === 'postgres') {
      const name = uniqueId('e2e_').toLowerCase();
      execFileSync('psql', [`${POSTGRES_URL}/postgres`, '-qAtc', `CREATE DATABASE ${name}`], {
        stdio: ['ignore', 'ignore', 'inherit'],
        timeout: 20_000,
      });
      this.defer(() => {
        try {
          execFileSync(
            'psql',
            [`${POSTGRES_URL}/postgres`, '-qAtc', `DROP DATABASE IF EXISTS ${name} WITH (FORCE)`],
            { stdio: ['ignore', 'ignore', 'ignore'], timeout: 20_000 },
          );
        } catch {
          // best effort
        }
      });
      return `${POSTGRES_URL}/${name}`;
    }
    const file = path.join(this.tmp, `${uniqueId('db')}.db`);
    return `sqlite://${file}`;
  }

  // --- sockudo ---------------------------------------------------------------------------

  /** Starts sockudo on a free port (tries up to 3 ports, in case another process took one). */
  async startSockudo({ port } = {}) {
    let lastError;
    for (let attempt = 0; attempt < (port ? 1 : 3); attempt++) {
      try {
        return await this.startSockudoOnce({ port });
      } catch (e) {
        lastError = e;
        log(`sockudo did not start: ${e.message}`);
      }
    }
    throw lastError;
  }

  async startSockudoOnce({ port } = {}) {
    const bin = sockudoBin();
    if (!existsSync(bin)) {
      throw new Error(
        `sockudo not found at ${bin}: run \`cargo install sockudo --version 5.2.0 --locked\` ` +
          `(needs protobuf-compiler) or set SOCKUDO_BIN`,
      );
    }
    port ??= await freePort();
    const metricsPort = await freePort();
    const cwd = mkdtempSync(path.join(this.tmp, 'sockudo-'));
    const env = {
      PATH: process.env.PATH,
      HOME: process.env.HOME,
      HOST: '127.0.0.1',
      PORT: String(port),
      METRICS_HOST: '127.0.0.1',
      METRICS_PORT: String(metricsPort),
      SOCKUDO_DEFAULT_APP_ID: PUSHER_APP.appId,
      SOCKUDO_DEFAULT_APP_KEY: PUSHER_APP.key,
      SOCKUDO_DEFAULT_APP_SECRET: PUSHER_APP.secret,
      RATE_LIMITER_ENABLED: 'false',
      NO_COLOR: '1',
    };
    const proc = new ChildProcess('sockudo', bin, [], { env, cwd });
    // sockudo 5.2.0 takes about 10 s to exit on SIGTERM or SIGINT, even when idle; the tests
    // have no use for its graceful shutdown, so it is always killed outright.
    const stop = () => proc.stop({ signal: 'SIGKILL' });
    this.defer(stop);
    const url = `http://127.0.0.1:${port}`;
    await waitFor(
      async () => {
        if (proc.exited) throw fatal(`sockudo exited:\n${proc.tail(30)}`);
        const res = await realFetch(`${url}/up`, { signal: AbortSignal.timeout(1_000) });
        return res.status === 200;
      },
      { timeout: 20_000, interval: 50, message: `sockudo /up on ${url}` },
    );
    return { proc, port, url, stop };
  }

  // --- A private Redis ---------------------------------------------------------------------

  /**
   * Starts a private `redis-server` (from the PATH) on a free loopback port: no persistence,
   * not daemonized, a child of this process, stopped at cleanup. Resolves to a `PrivateRedis`
   * ({ url, port, stop(), restart() }); `restart()` brings it back, empty, on the SAME port.
   * Tries up to 3 ports, in case another process took the free one first.
   */
  async startRedis() {
    let lastError;
    for (let attempt = 0; attempt < 3; attempt++) {
      const redis = new PrivateRedis(this, await freePort());
      this.defer(() => redis.stop());
      try {
        return await redis.start();
      } catch (e) {
        lastError = e;
        await redis.stop();
        if (!/address already in use/i.test(e.message)) throw e;
      }
    }
    throw lastError;
  }

  // --- nginx ---------------------------------------------------------------------------------

  /**
   * Starts nginx (NGINX_BIN, default `nginx` on the PATH) with deploy/nginx.conf, only its
   * `listen` line and its upstream `server` lines rewritten: a free loopback port, and one
   * server line per replisync in `servers` (same parameters as the file's). Returns
   * {proc, port, url, conf, accessLines()}.
   */
  async startNginx(servers) {
    const bin = process.env.NGINX_BIN ?? (existsSync('/usr/sbin/nginx') ? '/usr/sbin/nginx' : 'nginx');
    const port = await freePort();
    const conf = nginxConf(readFileSync(path.join(REPO_DIR, 'deploy', 'nginx.conf'), 'utf8'), {
      listen: `127.0.0.1:${port}`,
      upstreams: servers.map((s) => `127.0.0.1:${s.port}`),
    });
    // nginx's workers run as `nobody` when started by root: they must reach the temp files.
    const prefix = mkdtempSync(path.join(this.tmp, 'nginx-'));
    chmodSync(this.tmp, 0o755);
    chmodSync(prefix, 0o755);
    const confPath = path.join(prefix, 'nginx.conf');
    writeFileSync(confPath, conf);
    // The access log goes to /dev/stdout, which nginx opens by name: a file here, not a socket.
    const accessLog = path.join(prefix, 'access.log');
    const stdout = openSync(accessLog, 'a');
    const proc = new ChildProcess('nginx', bin, ['-c', confPath, '-p', `${prefix}/`], {
      env: { PATH: process.env.PATH },
      cwd: prefix,
      stdout,
    });
    closeSync(stdout);
    this.defer(() => proc.stop({ signal: 'SIGQUIT', graceMs: 5_000 }));
    const url = `http://127.0.0.1:${port}`;
    await waitFor(
      async () => {
        if (proc.exited) throw fatal(`nginx exited:\n${proc.tail(30)}`);
        const res = await realFetch(`${url}/healthz`, { signal: AbortSignal.timeout(1_000) }).catch(() => null);
        return res?.status === 200;
      },
      { timeout: 10_000, interval: 50, message: `nginx on ${url}` },
    );
    const accessLines = () => readFileSync(accessLog, 'utf8').split('\n').filter((l) => / upstream=/.test(l));
    return { proc, port, url, conf, accessLines };
  }

  // --- Prometheus ----------------------------------------------------------------------------

  /**
   * Starts Prometheus (PROMETHEUS_BIN, default `prometheus` on the PATH) with
   * deploy/prometheus/prometheus.yml, only its intervals (1 s) and its targets (the `servers`,
   * replisync handles) rewritten, its rule file (deploy/prometheus/alerts.yml) named by its full
   * path, on a free loopback port with its own data directory; tries up to 3 ports. Resolves to
   * a `PrivatePrometheus` once it is ready.
   */
  async startPrometheus(servers) {
    const bin = prometheusBin();
    const source = readFileSync(path.join(REPO_DIR, 'deploy', 'prometheus', 'prometheus.yml'), 'utf8');
    const conf = prometheusConf(source, {
      interval: '1s',
      targets: servers.map((s) => `127.0.0.1:${s.port}`),
      ruleFiles: [path.join(REPO_DIR, 'deploy', 'prometheus', 'alerts.yml')],
    });
    let lastError;
    for (let attempt = 0; attempt < 3; attempt++) {
      const dir = mkdtempSync(path.join(this.tmp, 'prometheus-'));
      const confPath = path.join(dir, 'prometheus.yml');
      writeFileSync(confPath, conf);
      const port = await freePort();
      const args = [
        `--config.file=${confPath}`,
        `--storage.tsdb.path=${path.join(dir, 'data')}`,
        `--web.listen-address=127.0.0.1:${port}`,
        '--log.level=warn',
      ];
      const proc = new ChildProcess('prometheus', bin, args, { env: { PATH: process.env.PATH }, cwd: dir });
      this.defer(() => proc.stop({ signal: 'SIGTERM', graceMs: 10_000 }));
      const prometheus = new PrivatePrometheus(proc, port, conf);
      try {
        await waitFor(
          async () => {
            if (proc.exited) throw fatal(`prometheus exited:\n${proc.tail(30)}`);
            const res = await realFetch(`${prometheus.url}/-/ready`, { signal: AbortSignal.timeout(1_000) });
            return res.status === 200;
          },
          { timeout: 30_000, interval: 100, message: `prometheus /-/ready on ${prometheus.url}` },
        );
        return prometheus;
      } catch (e) {
        lastError = e;
        await proc.stop({ signal: 'SIGKILL' });
        if (!/address already in use/i.test(e.message)) throw e;
      }
    }
    throw lastError;
  }

  // --- replisync ---------------------------------------------------------------------------

  /**
   * Starts replisync. Options: databaseUrl (default: a fresh one), port (default: any free),
   * pusher ({port, secret?}) to configure Pusher pokes, socketio ({redisUrl, key?, namespace?,
   * roomPrefix?, event?, timeoutMs?, maxAttempts?}) for socket.io pokes through Redis (the
   * REPLISYNC_SOCKETIO_* variables), jwtSecret, env (extra variables).
   * Returns a handle with url, port, logs, stop() and restart(overrides).
   */
  async startReplisync(opts = {}) {
    if (!existsSync(REPLISYNC_BIN)) {
      throw new Error(
        `replisync binary not found at ${REPLISYNC_BIN}: run \`cargo build --bin replisync\` ` +
          `in ${REPO_DIR} or set REPLISYNC_BIN`,
      );
    }
    const server = new ReplisyncServer(this, opts);
    // Registered before it starts, so that one that fails to start is stopped and reported too.
    // The step's own bound is generous: `stop` is bounded by the grace period and a SIGKILL.
    this.defer(() => server.stop(), { timeoutMs: 120_000 });
    await server.start();
    return server;
  }

  /**
   * Runs the replisync binary with `args` (a command such as `export` or `import`) to its end,
   * configured like `startReplisync`'s servers for `databaseUrl` (DATABASE_URL, text logs), with
   * `env` added, in a temp directory of its own. Resolves to {code, signal, stdout, stderr};
   * killed (SIGKILL) and rejected after `timeoutMs`.
   */
  async runReplisync(args, { databaseUrl, env = {}, timeoutMs = 60_000 } = {}) {
    if (!existsSync(REPLISYNC_BIN)) {
      throw new Error(`replisync binary not found at ${REPLISYNC_BIN}: run \`cargo build --bin replisync\``);
    }
    const cwd = mkdtempSync(path.join(this.tmp, 'replisync-cmd-'));
    const child = spawn(REPLISYNC_BIN, args, {
      cwd,
      env: {
        PATH: process.env.PATH,
        HOME: process.env.HOME,
        ...(databaseUrl === undefined ? {} : { DATABASE_URL: databaseUrl }),
        RUST_LOG: 'info',
        NO_COLOR: '1',
        REPLISYNC_LOG_FORMAT: 'text',
        ...env,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    liveChildren.add(child);
    const out = { stdout: '', stderr: '' };
    child.stdout.setEncoding('utf8').on('data', (chunk) => (out.stdout += chunk));
    child.stderr.setEncoding('utf8').on('data', (chunk) => (out.stderr += chunk));
    const exit = new Promise((resolve, reject) => {
      child.on('error', reject);
      child.on('close', (code, signal) => resolve({ code, signal }));
    });
    try {
      const { code, signal } = await withTimeout(exit, timeoutMs, `replisync ${args.join(' ')}`);
      log(`replisync ${args.join(' ')} exited ${code}:\n${out.stderr}`);
      return { code, signal, ...out };
    } catch (e) {
      child.kill('SIGKILL');
      throw new Error(`${e.message}\n--- stderr ---\n${out.stderr}`);
    } finally {
      liveChildren.delete(child);
    }
  }

  // --- Replicache ----------------------------------------------------------------------------

  /**
   * A Replicache client of `server` on space `space`. Options are passed to Replicache,
   * except: name (default unique), mutators (default: the server's built-ins),
   * poke ('sse' to pull on SSE pokes; default none), getAuth (set as `rep.getAuth`, an
   * instance property: Replicache 15's constructor ignores a `getAuth` option).
   */
  async replicache(server, space, { name, mutators, poke, getAuth, ...options } = {}) {
    const logs = [];
    const sink = {
      log(level, context, ...args) {
        const text = args
          .map((a) =>
            a instanceof Error ? `${a.name}: ${a.message}` : typeof a === 'string' ? a : safeJson(a),
          )
          .join(' ');
        if (logs.length < 10_000) logs.push({ level, text, at: performance.now() });
        if (VERBOSE) console.error(`[replicache ${name}] ${level} ${text}`);
      },
    };
    name ??= uniqueId('rep-');
    const rep = new Replicache({
      name,
      pushURL: `${server.url}/spaces/${encodeURIComponent(space)}/push`,
      pullURL: `${server.url}/spaces/${encodeURIComponent(space)}/pull`,
      kvStore: 'mem',
      logLevel: 'info',
      logSinks: [sink],
      mutators: mutators ?? serverMutators(),
      ...options,
    });
    if (getAuth) rep.getAuth = getAuth;
    rep.e2eLogs = logs;
    rep.e2eName = name;
    let closed = false;
    const close = async () => {
      if (closed) return;
      closed = true;
      await withTimeout(rep.close(), 10_000, `closing Replicache ${name}`);
    };
    rep.e2eClose = close;
    this.defer(close);
    if (poke === 'sse') {
      // Like a browser app with EventSource: pull on every poke, and on every (re)connection
      // to catch up with pokes sent while the stream was down.
      const pull = () => {
        if (!closed) rep.pull().catch(() => {});
      };
      const reader = this.sse(server, space, { onPoke: pull, onConnect: pull, reconnect: true });
      rep.e2eSse = reader;
      await reader.connected;
    }
    return rep;
  }

  // --- pusher-js ------------------------------------------------------------------------------

  /**
   * A pusher-js client connected to sockudo on `port`; resolves once connected. With
   * `authServer` and `token`, private channels are authorized by `authServer`'s
   * `POST /pusher/auth` (pusher-js's own ajax transport, the token in `Authorization`).
   */
  async pusherClient(port, { authServer, token } = {}) {
    const options = {
      cluster: '',
      wsHost: '127.0.0.1',
      wsPort: port,
      wssPort: port,
      forceTLS: false,
      enabledTransports: ['ws', 'wss'],
      disableStats: true,
    };
    if (authServer) {
      options.channelAuthorization = {
        endpoint: `${authServer.url}/pusher/auth`,
        transport: 'ajax',
        headers: token ? { Authorization: bearer(token) } : {},
      };
    }
    const client = new Pusher(PUSHER_APP.key, options);
    this.defer(() => client.disconnect());
    await withTimeout(
      new Promise((resolve, reject) => {
        client.connection.bind('connected', resolve);
        client.connection.bind('failed', () => reject(new Error('pusher-js connection failed')));
        client.connection.bind('unavailable', () => reject(new Error('pusher-js connection unavailable')));
      }),
      10_000,
      `pusher-js connecting to 127.0.0.1:${port}`,
    );
    return client;
  }

  /**
   * Subscribes `client` to `channel` and records every `eventName` event (with arrival
   * time) in the returned array; resolves once the subscription succeeded.
   */
  async subscribe(client, channel, eventName = 'poke', onEvent) {
    const events = [];
    const ch = client.subscribe(channel);
    ch.bind(eventName, (data) => {
      events.push({ at: performance.now(), data });
      onEvent?.(data);
    });
    await withTimeout(
      new Promise((resolve, reject) => {
        ch.bind('pusher:subscription_succeeded', resolve);
        ch.bind('pusher:subscription_error', (e) =>
          reject(new Error(`subscription to ${channel} failed: ${safeJson(e)}`)),
        );
      }),
      10_000,
      `subscribing to ${channel}`,
    );
    return events;
  }

  /**
   * Like `subscribe`, but never throws on a refused subscription: resolves to
   * `{ok: true, events}` or `{ok: false, error, events}` (`error` is pusher-js's
   * `pusher:subscription_error` payload, e.g. `{type: 'AuthError', status: 403, error}`).
   */
  async trySubscribe(client, channel, eventName = 'poke') {
    const events = [];
    const ch = client.subscribe(channel);
    ch.bind(eventName, (data) => events.push({ at: performance.now(), data }));
    return withTimeout(
      new Promise((resolve) => {
        ch.bind('pusher:subscription_succeeded', () => resolve({ ok: true, events }));
        ch.bind('pusher:subscription_error', (error) => resolve({ ok: false, error, events }));
      }),
      10_000,
      `the outcome of subscribing to ${channel}`,
    );
  }

  // --- The demo page and a browser ------------------------------------------------------------

  /**
   * Starts demo/server.mjs (on a free port) pointed at `server`; resolves to its URL.
   * `env` adds variables (e.g. REPLISYNC_JWT_SECRET for the demo's token mode).
   */
  async startDemo(server, { env = {} } = {}) {
    const demoDir = path.join(REPO_DIR, 'demo');
    if (!existsSync(path.join(demoDir, 'node_modules', 'replicache', 'package.json'))) {
      throw new Error(`the demo's dependencies are missing: run \`npm ci\` in ${demoDir}`);
    }
    return this.startNodeServer('demo', path.join(demoDir, 'server.mjs'), server, env, /replisync demo: (http:\/\/\S+)/);
  }

  /**
   * Starts one process of the socket.io server in tests/e2e/socketio-server.mjs, asking
   * `server` (replisync) about joins; processes given the same `redisKey` form one cluster
   * through the Redis at `redisUrl` (default: the server's own, the shared 127.0.0.1:6379).
   * Resolves to `{ url, proc }`.
   */
  async startSocketIo(server, { redisKey, redisUrl }) {
    const script = path.join(E2E_DIR, 'socketio-server.mjs');
    const env = { REDIS_KEY: redisKey };
    if (redisUrl) env.REDIS_URL = redisUrl;
    return this.startNodeServer('socket.io', script, server, env, /socket\.io server: (http:\/\/\S+)/);
  }

  /**
   * Runs the Node program `script` on a free loopback port (HOST, PORT=0) pointed at `server`
   * (REPLISYNC_URL), with `env` added; resolves to `{ url, proc }` once it prints a line that
   * `urlLine` matches, its URL the first group. Stopped at cleanup.
   */
  async startNodeServer(name, script, server, env, urlLine) {
    const proc = new ChildProcess(name, process.execPath, [script], {
      cwd: path.dirname(script),
      env: {
        PATH: process.env.PATH,
        HOME: process.env.HOME,
        HOST: '127.0.0.1',
        PORT: '0',
        REPLISYNC_URL: server.url,
        ...env,
      },
    });
    this.defer(() => proc.stop({ graceMs: 2_000 }));
    const m = await proc.waitForLine(urlLine, {
      timeout: 10_000,
      message: `the ${name} server to print its URL`,
    });
    return { url: m[1], proc };
  }

  /** Launches headless Chromium (CHROMIUM_PATH, default /usr/bin/chromium) via playwright-core. */
  async browser() {
    const { chromium } = await import('playwright-core');
    const executablePath = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
    if (!existsSync(executablePath)) {
      throw new Error(
        `Chromium not found at ${executablePath}: apt-get install -y chromium, or set CHROMIUM_PATH`,
      );
    }
    const browser = await chromium.launch({
      executablePath,
      headless: true,
      timeout: 60_000,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
    });
    this.defer(() => browser.close());
    return browser;
  }

  // --- SSE ------------------------------------------------------------------------------------

  /** Reads GET /spaces/{space}/poke (with `auth`: `?auth=<token>`); see SseReader. */
  sse(server, space, { auth, ...opts } = {}) {
    const query = auth === undefined ? '' : `?auth=${encodeURIComponent(auth)}`;
    const reader = new SseReader(`${server.url}/spaces/${encodeURIComponent(space)}/poke${query}`, opts);
    this.defer(() => reader.close());
    return reader;
  }
}

/**
 * deploy/nginx.conf with its `listen 8080;` line on `listen` and its upstream `server name:port
 * params;` lines replaced by one line per address in `upstreams`; throws if either is missing,
 * so the test cannot drift from the deployed file unnoticed.
 */
export function nginxConf(text, { listen, upstreams }) {
  const listenLine = /^(\s*)listen 8080;$/m;
  const serverLines = /^(\s*)server replisync-\d+:8080((?: [^;\n]+)?);\n/gm;
  const servers = [...text.matchAll(serverLines)];
  if (!listenLine.test(text) || servers.length === 0) {
    throw new Error('deploy/nginx.conf has no `listen 8080;` line or no `server replisync-N:8080` lines');
  }
  const [, indent, params] = servers[0];
  const ours = upstreams.map((address) => `${indent}server ${address}${params};\n`).join('');
  let replaced = false;
  return text
    .replace(listenLine, (_, i) => `${i}listen ${listen};`)
    .replace(serverLines, () => (replaced ? '' : ((replaced = true), ours)));
}

/** The prometheus binary: PROMETHEUS_BIN, else `prometheus` on the PATH (scripts/setup installs it). */
export function prometheusBin() {
  const bin = process.env.PROMETHEUS_BIN ?? onPath('prometheus');
  if (!bin || !existsSync(bin)) {
    throw new Error(
      `prometheus not found (${bin ?? 'not on the PATH'}): apt-get install -y prometheus ` +
        '(scripts/setup does, keeping its service off) or set PROMETHEUS_BIN',
    );
  }
  return bin;
}

/** promtool: PROMTOOL_BIN, else the one beside the prometheus binary, else `promtool` on the PATH. */
export function promtoolBin() {
  if (process.env.PROMTOOL_BIN) return process.env.PROMTOOL_BIN;
  const beside = path.join(path.dirname(prometheusBin()), 'promtool');
  return existsSync(beside) ? beside : (onPath('promtool') ?? 'promtool');
}

function onPath(name) {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (dir && existsSync(path.join(dir, name))) return path.join(dir, name);
  }
  return undefined;
}

/**
 * deploy/prometheus/prometheus.yml with its `scrape_interval`, `evaluation_interval` and
 * `scrape_timeout` set to `interval`, its target lines (`- replisync-N:9090`) replaced by one
 * per address in `targets`, and its rule file lines by `ruleFiles`; throws if any of them is
 * missing, so the test cannot drift from the deployed file unnoticed.
 */
export function prometheusConf(text, { interval, targets, ruleFiles }) {
  const patterns = {
    scrape_interval: /^(\s*)scrape_interval: \S+$/m,
    evaluation_interval: /^(\s*)evaluation_interval: \S+$/m,
    scrape_timeout: /^(\s*)scrape_timeout: \S+$/m,
    rule_files: /^rule_files:\n(?:\s*- \S+\n)+/m,
    targets: /^(\s*)- targets:\n(?:\s*- replisync-\d+:\d+\n)+/m,
  };
  for (const [name, re] of Object.entries(patterns)) {
    if (!re.test(text)) throw new Error(`deploy/prometheus/prometheus.yml has no ${name} in the expected form`);
  }
  return text
    .replace(patterns.scrape_interval, (_, i) => `${i}scrape_interval: ${interval}`)
    .replace(patterns.evaluation_interval, (_, i) => `${i}evaluation_interval: ${interval}`)
    .replace(patterns.scrape_timeout, (_, i) => `${i}scrape_timeout: ${interval}`)
    .replace(patterns.rule_files, () => `rule_files:\n${ruleFiles.map((f) => `  - ${JSON.stringify(f)}\n`).join('')}`)
    .replace(
      patterns.targets,
      (_, i) => `${i}- targets:\n${targets.map((t) => `${i}    - ${JSON.stringify(t)}\n`).join('')}`,
    );
}

/**
 * A Prometheus started by `E2E.startPrometheus`: its HTTP API at `url`, the config it runs
 * (`conf`), and helpers over /api/v1.
 */
export class PrivatePrometheus {
  constructor(proc, port, conf) {
    this.proc = proc;
    this.port = port;
    this.conf = conf;
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** GET /api/v1/`endpoint` with `params`; resolves to `data`, throws with Prometheus's error. */
  async api(endpoint, params = {}) {
    const query = new URLSearchParams(params).toString();
    const res = await realFetch(`${this.url}/api/v1/${endpoint}${query ? `?${query}` : ''}`, {
      signal: AbortSignal.timeout(10_000),
    });
    const body = await res.json().catch(() => ({}));
    if (res.status !== 200 || body.status !== 'success') {
      throw new Error(`prometheus ${endpoint} ${safeJson(params)} answered ${res.status}: ${body.error ?? safeJson(body)}`);
    }
    return body.data;
  }

  /** An instant query: the `result` of /api/v1/query (a vector: [{metric, value: [t, "v"]}]). */
  async query(expr) {
    const data = await this.api('query', { query: expr });
    return data.result;
  }

  /** An instant query expected to give one series: its value as a number (NaN if none). */
  async scalar(expr) {
    const result = await this.query(expr);
    if (result.length > 1) throw new Error(`${expr} gave ${result.length} series, not one: ${safeJson(result)}`);
    return result.length ? Number(result[0].value[1]) : NaN;
  }

  /**
   * Waits (at most `timeout` ms) until every target's latest scrape started after `epochMs`
   * (Date.now() time) and succeeded: its samples are then queryable (`up` is written in the
   * same append as the scraped samples).
   */
  async scrapedAfter(epochMs, { timeout = 30_000 } = {}) {
    return waitFor(
      async () => {
        if (this.proc.exited) throw fatal(`prometheus exited:\n${this.proc.tail(30)}`);
        const ups = await this.query('timestamp(up) * 1000 and up == 1');
        const all = await this.query('up');
        return all.length > 0 && ups.length === all.length && ups.every((s) => Number(s.value[1]) > epochMs);
      },
      { timeout, interval: 200, message: `prometheus to scrape every target after ${new Date(epochMs).toISOString()}` },
    );
  }
}

/** JSON request headers, with `Authorization: auth` when given. */
function authHeaders(auth) {
  const headers = { 'content-type': 'application/json' };
  if (auth !== undefined) headers.authorization = auth;
  return headers;
}

function safeJson(v) {
  try {
    return JSON.stringify(v);
  } catch {
    return String(v);
  }
}

/** An error that fails the test even from a cleanup step: `proc` did not exit as it should. */
function exitFailure(proc, what) {
  const e = new Error(`${proc.name} ${what}\n--- ${proc.name} output (last 40 lines) ---\n${proc.tail(40)}`);
  e.failsTest = true;
  return e;
}

// ---------------------------------------------------------------------------------------------

export class ReplisyncServer {
  constructor(scope, { databaseUrl, port, pusher, socketio, jwtSecret, env = {} } = {}) {
    this.scope = scope;
    this.jwtSecret = jwtSecret;
    this.databaseUrl = databaseUrl ?? scope.newDatabaseUrl();
    this.port = port ?? 0;
    this.pusher = pusher;
    this.socketio = socketio;
    this.extraEnv = env;
    this.proc = undefined;
    this.generations = []; // every process started, oldest first (for log assertions)
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** All log lines of every run of this server, oldest first. */
  get lines() {
    return this.generations.flatMap((p) => p.lines);
  }

  get output() {
    return this.lines.join('\n');
  }

  buildEnv() {
    const env = {
      PATH: process.env.PATH,
      HOME: process.env.HOME,
      REPLISYNC_LISTEN: `127.0.0.1:${this.port}`,
      DATABASE_URL: this.databaseUrl,
      RUST_LOG: 'info',
      NO_COLOR: '1',
      REPLISYNC_LOG_FORMAT: 'text',
      REPLISYNC_SHUTDOWN_TIMEOUT_SECS: '3',
      // Stop accepting at once on SIGTERM; scenario 14 sets a drain delay for its balancer.
      REPLISYNC_DRAIN_DELAY_SECS: '0',
    };
    if (this.pusher) {
      Object.assign(env, {
        PUSHER_APP_ID: PUSHER_APP.appId,
        PUSHER_KEY: PUSHER_APP.key,
        PUSHER_SECRET: this.pusher.secret ?? PUSHER_APP.secret,
        PUSHER_HOST: '127.0.0.1',
        PUSHER_PORT: String(this.pusher.port),
        PUSHER_SCHEME: 'http',
      });
    }
    if (this.socketio) Object.assign(env, socketioEnv(this.socketio));
    if (this.jwtSecret) env.REPLISYNC_JWT_SECRET = this.jwtSecret;
    return { ...env, ...this.extraEnv };
  }

  async start() {
    const cwd = mkdtempSync(path.join(this.scope.tmp, 'replisync-'));
    const proc = new ChildProcess(`replisync#${this.generations.length + 1}`, REPLISYNC_BIN, [], {
      env: this.buildEnv(),
      cwd,
    });
    this.proc = proc;
    this.generations.push(proc);
    const m = await proc.waitForLine(/replisync listening address=(\S+)/, {
      timeout: 20_000,
      message: 'replisync to listen',
    });
    const port = Number(/:(\d+)$/.exec(m[1])[1]);
    if (this.port && port !== this.port) {
      throw new Error(`replisync listens on ${m[1]}, wanted port ${this.port}`);
    }
    this.port = port;
    await waitFor(async () => (await realFetch(`${this.url}/healthz`)).status === 200, {
      timeout: 10_000,
      message: 'replisync /healthz',
    });
    return this;
  }

  /**
   * Time replisync may take to exit after SIGTERM: its drain delay and shutdown timeout (as
   * its environment sets them; it bounds its own shutdown by them, plus 1 s to close the
   * database), and 5 s more for a loaded machine.
   */
  stopGraceMs() {
    const env = this.buildEnv();
    const seconds = (name) => Number(env[name] ?? 0) || 0;
    const waits = seconds('REPLISYNC_DRAIN_DELAY_SECS') + seconds('REPLISYNC_SHUTDOWN_TIMEOUT_SECS');
    return waits * 1000 + 5_000;
  }

  /**
   * Stops the running process. After SIGTERM (the default) it must exit by itself, with status
   * 0, within `graceMs` (default `stopGraceMs()`): otherwise (killed once the grace period is
   * over, another status, a signal, or an exit before anyone asked it to stop) this throws
   * with its last log lines, which fails the test. `signal: 'SIGKILL'` kills it on purpose and
   * checks nothing.
   */
  async stop({ signal = 'SIGTERM', graceMs = this.stopGraceMs() } = {}) {
    const proc = this.proc;
    if (!proc || proc.exitChecked) return;
    proc.exitChecked = true;
    if (proc.exited && !proc.stopRequested) {
      throw exitFailure(proc, `exited before it was asked to stop (code ${proc.exitCode}, signal ${proc.signal})`);
    }
    await proc.stop({ signal, graceMs });
    if (signal === 'SIGKILL') return;
    if (proc.stoppedByKill) {
      throw exitFailure(proc, `did not exit within ${graceMs} ms of ${signal}: it was killed (SIGKILL)`);
    }
    if (proc.exitCode !== 0) {
      throw exitFailure(proc, `exited with code ${proc.exitCode}, signal ${proc.signal} after ${signal}, not 0`);
    }
  }

  /**
   * Stops and starts again on the same port; `changes` may replace databaseUrl, pusher,
   * socketio, env.
   */
  async restart(changes = {}, stopOpts) {
    await this.stop(stopOpts);
    if ('databaseUrl' in changes) this.databaseUrl = changes.databaseUrl;
    if ('pusher' in changes) this.pusher = changes.pusher;
    if ('socketio' in changes) this.socketio = changes.socketio;
    if ('env' in changes) this.extraEnv = changes.env;
    // The port was just released; retry a few times in case the kernel is slow to free it.
    return startOnFreedPort(() => this.start(), /address already in use|AddrInUse|exited/i);
  }

  /** Raw protocol push (pushVersion 1). Returns {status, body, ms}. */
  async push(space, { clientGroupID, clientID, mutations, firstID = 1, auth }) {
    const body = {
      pushVersion: 1,
      schemaVersion: '',
      profileID: 'e2e-profile',
      clientGroupID,
      mutations: mutations.map((m, i) => ({
        id: m.id ?? firstID + i,
        name: m.name,
        args: m.args,
        timestamp: performance.now(),
        clientID,
      })),
    };
    const t0 = performance.now();
    const res = await realFetch(`${this.url}/spaces/${encodeURIComponent(space)}/push`, {
      method: 'POST',
      headers: authHeaders(auth),
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(15_000),
    });
    const text = await res.text();
    return { status: res.status, body: text, ms: performance.now() - t0, respondedAt: performance.now() };
  }

  /** Raw protocol pull (pullVersion 1). Returns the parsed response (throws unless 200). */
  async pull(space, opts = {}) {
    const res = await this.pullRaw(space, opts);
    if (res.status !== 200) throw new Error(`pull answered ${res.status}: ${await res.text()}`);
    return res.json();
  }

  /** Raw protocol pull; resolves to the fetch Response whatever its status. */
  async pullRaw(space, { clientGroupID = uniqueId('cg-'), cookie = null, auth, schemaVersion = '' } = {}) {
    return realFetch(`${this.url}/spaces/${encodeURIComponent(space)}/pull`, {
      method: 'POST',
      headers: authHeaders(auth),
      body: JSON.stringify({
        pullVersion: 1,
        schemaVersion,
        profileID: 'e2e-profile',
        clientGroupID,
        cookie,
      }),
      signal: AbortSignal.timeout(15_000),
    });
  }

  /**
   * The space's entries as the server has them now (a fresh client group's full pull);
   * `auth` is the Authorization header, needed when tokens are on; `schemaVersion` the one
   * sent (default '').
   */
  async snapshot(space, { auth, schemaVersion } = {}) {
    const res = await this.pull(space, { auth, schemaVersion });
    const data = {};
    for (const op of res.patch) {
      if (op.op === 'put') data[op.key] = op.value;
      if (op.op === 'del') delete data[op.key];
    }
    return { cookie: res.cookie, data };
  }

  async healthz() {
    const res = await realFetch(`${this.url}/healthz`, { signal: AbortSignal.timeout(5_000) });
    return { status: res.status, body: await res.json().catch(() => null) };
  }

  /**
   * GET /metrics, parsed: `{ 'name' or 'name{labels}': value }` for every sample line. A
   * counter that is missing is `undefined`, so `=== 0` also proves that it is exported.
   */
  async metrics() {
    const res = await realFetch(`${this.url}/metrics`, { signal: AbortSignal.timeout(5_000) });
    if (res.status !== 200) throw new Error(`GET /metrics answered ${res.status}`);
    return parseMetrics(await res.text());
  }
}

/** Prometheus text format: `{ series: value }` for each sample line (comments skipped). */
export function parseMetrics(text) {
  const values = {};
  for (const line of text.split('\n')) {
    const m = /^([A-Za-z_:][A-Za-z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)/.exec(line);
    if (m) values[m[1]] = Number(m[2]);
  }
  return values;
}

/** The REPLISYNC_SOCKETIO_* variables for `startReplisync`'s `socketio` option. */
function socketioEnv({ redisUrl, key, namespace, roomPrefix, event, timeoutMs, maxAttempts }) {
  if (!redisUrl) throw new Error('startReplisync: socketio needs redisUrl (e.g. a startRedis() url)');
  const env = { REPLISYNC_SOCKETIO_REDIS_URL: redisUrl };
  const optional = {
    REPLISYNC_SOCKETIO_KEY: key,
    REPLISYNC_SOCKETIO_NAMESPACE: namespace,
    REPLISYNC_SOCKETIO_ROOM_PREFIX: roomPrefix,
    REPLISYNC_SOCKETIO_EVENT: event,
    REPLISYNC_SOCKETIO_TIMEOUT_MS: timeoutMs,
    REPLISYNC_SOCKETIO_MAX_ATTEMPTS: maxAttempts,
  };
  for (const [name, value] of Object.entries(optional)) {
    if (value !== undefined) env[name] = String(value);
  }
  return env;
}

// ---------------------------------------------------------------------------------------------

/**
 * A private redis-server on `port` (see `E2E.startRedis`): `start()` resolves once it answers
 * PING; `stop()` ends it (SIGTERM, SIGKILL after 5 s) and waits for its exit, so the port is
 * free; `restart()` does both, on the same port. Every run is in `generations`.
 */
export class PrivateRedis {
  constructor(scope, port) {
    this.scope = scope;
    this.port = port;
    this.proc = undefined;
    this.generations = [];
  }

  get url() {
    return `redis://127.0.0.1:${this.port}`;
  }

  async start() {
    const cwd = mkdtempSync(path.join(this.scope.tmp, 'redis-'));
    const args = ['--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
      '--daemonize', 'no', '--dir', cwd];
    const proc = new ChildProcess(`redis#${this.generations.length + 1}`, 'redis-server', args, {
      env: { PATH: process.env.PATH },
      cwd,
    });
    this.proc = proc;
    this.generations.push(proc);
    await waitFor(
      async () => {
        if (proc.exited) {
          const hint = /ENOENT/.test(proc.output) ? ' (apt-get install -y redis-server puts it on the PATH)' : '';
          throw fatal(`redis-server on port ${this.port} exited${hint}:\n${proc.tail(20)}`);
        }
        return redisAnswersPing(this.port);
      },
      { timeout: 10_000, interval: 25, message: `redis-server to answer PING on 127.0.0.1:${this.port}` },
    );
    return this;
  }

  async stop() {
    await this.proc?.stop({ signal: 'SIGTERM', graceMs: 5_000 });
  }

  /** Stops it and starts it again on the same port (retried briefly if the port is not free yet). */
  async restart() {
    await this.stop();
    return startOnFreedPort(() => this.start(), /address already in use/i);
  }
}

/**
 * `start()`, tried up to 5 times while it fails with an error whose message `portBusy` matches
 * (a port just released that the kernel has not freed yet), waiting a little longer each time.
 */
async function startOnFreedPort(start, portBusy) {
  let lastError;
  for (let attempt = 0; attempt < 5; attempt++) {
    try {
      return await start();
    } catch (e) {
      lastError = e;
      if (!portBusy.test(e.message)) throw e;
      await delay(200 * (attempt + 1));
    }
  }
  throw lastError;
}

/** Whether a Redis on 127.0.0.1:`port` answers `PING` with `+PONG` within 1 s. */
export function redisAnswersPing(port) {
  return new Promise((resolve) => {
    const socket = net.connect({ host: '127.0.0.1', port });
    let answer = '';
    const done = (ok) => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(1_000, () => done(false));
    socket.on('error', () => done(false));
    socket.on('connect', () => socket.write('PING\r\n'));
    socket.on('data', (chunk) => {
      answer += chunk;
      if (answer.includes('\r\n')) done(answer.startsWith('+PONG'));
    });
  });
}

// ---------------------------------------------------------------------------------------------

/**
 * A small Server-Sent Events reader over fetch. `events` collects {event, data, at};
 * `comments` collects comment lines; `connected` resolves when the first comment or event
 * arrives (replisync sends `: connected` once the stream is subscribed). With
 * `reconnect: true` it reconnects like a browser's EventSource (every `retryMs`, at most
 * `maxAttempts` times) and calls `onConnect` after each (re)connection.
 */
export class SseReader {
  constructor(url, { onPoke, onEvent, onConnect, reconnect = false, retryMs = 250, maxAttempts = 400 } = {}) {
    this.url = url;
    this.events = [];
    this.comments = [];
    this.connections = 0;
    this.closed = false;
    this.controller = undefined;
    let resolveConnected, rejectConnected;
    this.connected = new Promise((res, rej) => {
      resolveConnected = res;
      rejectConnected = rej;
    });
    this.connected.catch(() => {});
    const timer = setTimeout(() => rejectConnected(new Error(`SSE ${url}: not connected in 10 s`)), 10_000);
    const readOnce = async () => {
      this.controller = new AbortController();
      const res = await realFetch(url, {
        headers: { accept: 'text/event-stream' },
        signal: this.controller.signal,
      });
      if (res.status !== 200) throw new Error(`SSE ${url} answered ${res.status}`);
      this.contentType = res.headers.get('content-type');
      const decoder = new TextDecoder();
      let buf = '';
      let event = { event: 'message', data: [] };
      let open = false;
      const opened = () => {
        if (open) return;
        open = true;
        this.connections++;
        resolveConnected();
        onConnect?.(this.connections);
      };
      for await (const chunk of res.body) {
        buf += decoder.decode(chunk, { stream: true });
        let i;
        while ((i = buf.search(/\r\n|\n|\r/)) >= 0) {
          const line = buf.slice(0, i);
          buf = buf.slice(i + (buf.startsWith('\r\n', i) ? 2 : 1));
          if (line === '') {
            if (event.data.length || event.event !== 'message') {
              const ev = { event: event.event, data: event.data.join('\n'), at: performance.now() };
              this.events.push(ev);
              opened();
              onEvent?.(ev);
              if (ev.event === 'poke') onPoke?.(ev);
            }
            event = { event: 'message', data: [] };
          } else if (line.startsWith(':')) {
            this.comments.push(line.slice(1).trim());
            opened();
          } else {
            const c = line.indexOf(':');
            const field = c < 0 ? line : line.slice(0, c);
            let value = c < 0 ? '' : line.slice(c + 1);
            if (value.startsWith(' ')) value = value.slice(1);
            if (field === 'event') event.event = value;
            else if (field === 'data') event.data.push(value);
          }
        }
      }
    };
    this.done = (async () => {
      try {
        for (let attempt = 0; attempt < (reconnect ? maxAttempts : 1) && !this.closed; attempt++) {
          try {
            await readOnce();
          } catch (e) {
            if (this.closed) break;
            this.error = e;
            // Until the first connection, an HTTP error answer is final (e.g. SSE turned off).
            if (!reconnect || (this.connections === 0 && /answered/.test(e.message))) {
              rejectConnected(e);
              break;
            }
          }
          if (reconnect && !this.closed) await delay(retryMs);
        }
      } finally {
        clearTimeout(timer);
      }
    })();
  }

  pokes() {
    return this.events.filter((e) => e.event === 'poke');
  }

  async close() {
    this.closed = true;
    this.controller?.abort();
    await withTimeout(this.done, 5_000, 'closing SSE reader').catch(() => {});
  }
}

// ---------------------------------------------------------------------------------------------
// Mutators matching replisync's built-ins.

export function serverMutators({ incrementFactor = 1 } = {}) {
  return {
    async set(tx, { key, value }) {
      await tx.set(key, value);
    },
    async delete(tx, { key }) {
      await tx.del(key);
    },
    async increment(tx, { key, delta }) {
      const current = (await tx.get(key)) ?? 0;
      await tx.set(key, current + delta * incrementFactor);
    },
  };
}

/** Reads one key of a Replicache client. */
export async function readKey(rep, key) {
  return rep.query((tx) => tx.get(key));
}

/**
 * Waits until the server has applied every pending mutation of `rep` and `rep` has pulled the
 * result, pulling as it waits (for clients with no poke stream, which pull only when asked).
 */
export async function pushedAndPulled(rep, { timeout = 20_000 } = {}) {
  await waitFor(
    async () => {
      await rep.pull();
      return (await rep.experimentalPendingMutations()).length === 0;
    },
    { timeout, interval: 100, message: `${rep.e2eName} to have every mutation applied and pulled` },
  );
}

/** Waits until `rep` has no pending (unacknowledged) mutations. */
export async function waitNoPending(rep, { timeout = 20_000 } = {}) {
  return waitFor(async () => (await rep.experimentalPendingMutations()).length === 0, {
    timeout,
    interval: 50,
    message: `${rep.e2eName} to have no pending mutations`,
  });
}

export function ensureArtifactsDir() {
  mkdirSync(ARTIFACTS_DIR, { recursive: true });
  return ARTIFACTS_DIR;
}

export { realFetch, delay, Replicache, Pusher };
