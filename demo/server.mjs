// A tiny static server for the replisync demo pages (the todo list at /, the counter at
// /counter.html). No dependencies beyond Node itself: the
// page loads the npm `replicache` package (and its four small dependencies) straight from
// node_modules as ES modules, through an import map this server writes into the page.
//
//   REPLISYNC_URL  where the page finds replisync (default http://127.0.0.1:8080)
//   HOST, PORT     where this server listens (default 127.0.0.1:3000; PORT=0 picks a free port)
//   DEMO_JWT_SECRET (or REPLISYNC_JWT_SECRET)  token mode: the secret replisync verifies
//                  tokens with. This server then hands out short-lived HS256 tokens at
//                  GET /dev-token?user=NAME&space=SPACE to anyone who asks: for local use only.
//   DEMO_TOKEN_TTL_SECS  lifetime of those tokens (default 300)

import http from 'node:http';
import { createHmac } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const publicDir = path.join(here, 'public');
const require = createRequire(import.meta.url);

const REPLISYNC_URL = (process.env.REPLISYNC_URL ?? 'http://127.0.0.1:8080').replace(/\/+$/, '');
const HOST = process.env.HOST ?? '127.0.0.1';
const PORT = Number(process.env.PORT ?? 3000);
const JWT_SECRET = process.env.DEMO_JWT_SECRET || process.env.REPLISYNC_JWT_SECRET || '';
const TOKEN_TTL_SECS = Number(process.env.DEMO_TOKEN_TTL_SECS ?? 300);
const AUTH_MODE = JWT_SECRET ? 'token' : 'none';

// Token mode. A real app signs tokens in its own backend, after its own login, granting only
// the spaces the user may use; this dev endpoint grants whatever it is asked for.
const NAME_RE = /^[A-Za-z0-9_.:-]{1,64}$/;

function signToken(claims) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${head}.${createHmac('sha256', JWT_SECRET).update(head).digest('base64url')}`;
}

function devToken(url, res) {
  const user = url.searchParams.get('user') ?? '';
  const space = url.searchParams.get('space') ?? '';
  if (!NAME_RE.test(user) || !NAME_RE.test(space)) {
    res.writeHead(400, { 'content-type': 'application/json' });
    return res.end(JSON.stringify({ error: 'user and space: 1 to 64 of A-Z a-z 0-9 _ . : -' }));
  }
  const now = Math.floor(Date.now() / 1000);
  const exp = now + TOKEN_TTL_SECS;
  const token = signToken({ sub: user, spaces: [space], iat: now, exp });
  res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  return res.end(JSON.stringify({ token, user, space, exp }));
}

// The browser-side packages: replicache and what its ES module build imports.
const PACKAGES = ['replicache', '@rocicorp/logger', '@rocicorp/lock', '@rocicorp/resolver', '@badrap/valita'];

function packageRoot(name) {
  // Works whether or not the package's "exports" expose package.json.
  let dir = path.dirname(require.resolve(name));
  for (let i = 0; i < 10; i++) {
    try {
      const pkg = require(path.join(dir, 'package.json'));
      if (pkg.name === name) return { dir, pkg };
    } catch {
      // keep walking up
    }
    dir = path.dirname(dir);
  }
  throw new Error(`cannot find the package root of ${name}`);
}

let vendor;
try {
  vendor = new Map(PACKAGES.map((name) => [name, packageRoot(name)]));
} catch (e) {
  console.error(`${e.message}\nRun \`npm install\` in ${here} first.`);
  process.exit(1);
}

const importMap = {
  imports: Object.fromEntries(
    [...vendor].map(([name, { pkg }]) => {
      const entry = (pkg.module ?? pkg.main).replace(/^\.\//, '');
      return [name, `/vendor/${name}/${entry}`];
    }),
  ),
};

const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.map': 'application/json',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
};

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** Resolves `rel` inside `root`, or returns null if it would escape it. */
function inside(root, rel) {
  const file = path.resolve(root, '.' + path.posix.normalize('/' + rel));
  return file === root || file.startsWith(root + path.sep) ? file : null;
}

async function sendFile(res, file) {
  try {
    if (!file || !(await stat(file)).isFile()) throw new Error('not a file');
    const body = await readFile(file);
    res.writeHead(200, {
      'content-type': TYPES[path.extname(file)] ?? 'application/octet-stream',
      'cache-control': 'no-cache',
    });
    res.end(body);
  } catch {
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('not found\n');
  }
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://localhost');
  const pathname = decodeURIComponent(url.pathname);
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    res.writeHead(405, { allow: 'GET, HEAD' });
    return res.end();
  }
  const page = pathname === '/' ? '/index.html' : pathname;
  const pageFile = page.endsWith('.html') ? inside(publicDir, page) : null;
  if (pageFile && (await stat(pageFile).catch(() => null))?.isFile()) {
    const html = (await readFile(pageFile, 'utf8'))
      .replace('%IMPORT_MAP%', JSON.stringify(importMap, null, 2))
      .replaceAll('%REPLISYNC_URL%', escapeHtml(REPLISYNC_URL))
      .replaceAll('%AUTH_MODE%', AUTH_MODE);
    res.writeHead(200, { 'content-type': TYPES['.html'], 'cache-control': 'no-cache' });
    return res.end(html);
  }
  if (pathname === '/dev-token' && AUTH_MODE === 'token') return devToken(url, res);
  const m = /^\/vendor\/((?:@[^/]+\/)?[^/]+)\/(.+)$/.exec(pathname);
  if (m) {
    const pkg = vendor.get(m[1]);
    return sendFile(res, pkg ? inside(pkg.dir, m[2]) : null);
  }
  return sendFile(res, inside(publicDir, pathname));
});

server.listen(PORT, HOST, () => {
  const { address, port } = server.address();
  const host = address.includes(':') ? `[${address}]` : address;
  console.log(`replisync demo: http://${host}:${port}/ (replisync at ${REPLISYNC_URL})`);
  if (AUTH_MODE === 'token') {
    console.log(
      `token mode: the page gets ${TOKEN_TTL_SECS} s tokens from /dev-token (dev only: anyone ` +
        'who can reach this server gets a token for any user and space)',
    );
  }
  console.log('Open it in two browsers (or a normal and a private window): the todo list at /, the counter at /counter.html.');
});

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    server.close();
    server.closeAllConnections?.();
    process.exit(0);
  });
}
