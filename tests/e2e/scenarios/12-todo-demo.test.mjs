// Scenario 12: the app's own mutators, written once, in TypeScript. The scenario bundles
// demo/src/mutators.ts (and the rules it imports) into demo/public/mutators.js with the demo's
// `npm run build`; replisync loads that file (REPLISYNC_MUTATORS) and the todo page imports it.
// Two Chromium pages add, toggle, rename and delete todos and converge; a client that changed
// its own copy of a mutator to skip the title rules sees its optimistic todos undone by the
// server, which enforces a rule only the TypeScript source has.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { E2E, REPO_DIR, uniqueId, waitFor, pushedAndPulled, readKey, ensureArtifactsDir } from '../harness.mjs';

const DEMO_DIR = path.join(REPO_DIR, 'demo');
const MUTATORS_FILE = path.join(DEMO_DIR, 'public', 'mutators.js');
/** The rule of demo/src/rules.ts that no earlier, hand-written mutators.js had. */
const ONE_LINE_RULE = 'a title is one line: no line breaks';

// Bundled now, as `npm ci` and `npm start` do: never a bundle left over from older sources.
execFileSync('npm', ['run', '--silent', 'build'], { cwd: DEMO_DIR, stdio: 'pipe' });
const BUNDLE = readFileSync(MUTATORS_FILE, 'utf8');
const { MAX_TITLE_LENGTH, mutators } = await import(pathToFileURL(MUTATORS_FILE).href);

test('12. two pages of the todo demo converge; the server enforces the title rules of the TypeScript source', { timeout: 240_000 }, async (t) => {
  const env = new E2E();
  t.after(() => env.cleanup());
  const server = await env.startReplisync({ env: { REPLISYNC_MUTATORS: MUTATORS_FILE } });
  const demo = await env.startDemo(server);
  const browser = await env.browser();
  const space = uniqueId('todos-');

  const problems = [];
  const pages = [];
  for (let i = 0; i < 2; i++) {
    const context = await browser.newContext({ viewport: { width: 640, height: 640 } });
    const page = await context.newPage();
    page.setDefaultTimeout(15_000);
    page.on('pageerror', (e) => problems.push(`page ${i + 1}: ${e.message}`));
    page.on('console', (m) => {
      if (m.type() === 'error') problems.push(`page ${i + 1} console: ${m.text()}`);
    });
    await page.goto(`${demo.url}?space=${space}`);
    await page.locator('#status[data-sse="open"]').waitFor();
    pages.push(page);
  }
  const [p1, p2] = pages;
  const titles = (page) => page.locator('#todos .title').allTextContents();
  const sameOnBoth = async (expected, what) => {
    for (const page of pages) {
      await waitFor(async () => JSON.stringify(await titles(page)) === JSON.stringify(expected), {
        timeout: 10_000,
        message: `${what}: ${JSON.stringify(expected)} on both pages`,
      });
    }
  };

  try {
    // Add on page 1, then on page 2: both lists show both, oldest first.
    await p1.fill('#title', 'buy milk');
    await p1.press('#title', 'Enter');
    await sameOnBoth(['buy milk'], 'an added todo');
    await p2.fill('#title', 'write the report');
    await p2.click('#add button');
    await sameOnBoth(['buy milk', 'write the report'], 'a second todo');

    // Toggle on page 2: page 1 shows it done.
    await p2.locator('li', { hasText: 'buy milk' }).locator('input[type=checkbox]').check();
    await p1.locator('li.done', { hasText: 'buy milk' }).waitFor();

    // Rename on page 1 (double-click opens a prompt).
    p1.once('dialog', (dialog) => dialog.accept('buy oat milk'));
    await p1.locator('li .title', { hasText: 'buy milk' }).dblclick();
    await sameOnBoth(['buy oat milk', 'write the report'], 'a renamed todo');
    await p2.locator('li.done', { hasText: 'buy oat milk' }).waitFor();

    // Delete on page 2.
    await p2.locator('li', { hasText: 'write the report' }).locator('button.delete').click();
    await sameOnBoth(['buy oat milk'], 'a deleted todo');

    // The server ran the same mutators: its data is what the pages show.
    const { data } = await server.snapshot(space);
    const todos = Object.values(data);
    assert.equal(todos.length, 1);
    assert.equal(todos[0].title, 'buy oat milk');
    assert.equal(todos[0].done, true);
  } catch (e) {
    e.message += `\npage problems: ${JSON.stringify(problems)}\nreplisync log tail:\n${server.lines.slice(-15).join('\n')}`;
    throw e;
  }
  assert.deepEqual(problems, [], 'no page errors');

  // What the page imported is the bundle replisync loaded, one self-contained module, and it
  // holds the rule of src/rules.ts.
  assert.equal(await (await fetch(new URL('/mutators.js', demo.url))).text(), BUNDLE, 'the page is served the bundle');
  assert.doesNotMatch(BUNDLE, /^\s*import\b/m, 'the bundle imports nothing');
  const pageSays = await p1.evaluate(async (title) => {
    const imported = await import('/mutators.js'); // the module todo.js imported
    const tx = { get: async () => undefined, set: async () => {} };
    return imported.mutators.createTodo(tx, { id: 'x', title }).then(() => 'accepted', (e) => e.message);
  }, 'two\nlines');
  assert.equal(pageSays, ONE_LINE_RULE, "the page's createTodo refuses a title of two lines");

  // A client whose createTodo skips the title rules: its todos show up locally at once, then the
  // server's own createTodo refuses them and the client's next pull takes them away.
  const cheater = await env.replicache(server, space, {
    mutators: {
      ...mutators,
      async createTodo(tx, { id, title }) {
        await tx.set(`todo/${id}`, { id, title, done: false });
      },
    },
  });
  const longTitle = 'x'.repeat(MAX_TITLE_LENGTH + 50);
  await cheater.mutate.createTodo({ id: 'zz-cheat', title: longTitle });
  await cheater.mutate.createTodo({ id: 'zz-lines', title: 'two\nlines' });
  assert.equal((await readKey(cheater, 'todo/zz-cheat'))?.title, longTitle, 'applied optimistically');
  assert.equal((await readKey(cheater, 'todo/zz-lines'))?.title, 'two\nlines', 'applied optimistically');
  await pushedAndPulled(cheater);
  for (const id of ['zz-cheat', 'zz-lines']) {
    await waitFor(async () => (await readKey(cheater, `todo/${id}`)) === undefined, {
      timeout: 10_000,
      message: `the server to undo the todo ${id} that broke its rule`,
    });
    assert.equal((await server.snapshot(space)).data[`todo/${id}`], undefined);
  }
  const refusals = server.lines.filter((line) => line.includes('mutations failed') && line.includes('createTodo'));
  assert.ok(refusals.length > 0, 'the log names the refused mutator');
  assert.ok(refusals.some((line) => /at most 100 characters/.test(line)), `and why: ${refusals}`);
  assert.ok(refusals.some((line) => line.includes(ONE_LINE_RULE)), `the rule of the TypeScript source: ${refusals}`);
  // The honest pages never showed it.
  for (const page of pages) assert.deepEqual(await titles(page), ['buy oat milk']);

  const dir = ensureArtifactsDir();
  const file = path.join(dir, 'todo-page.png');
  await p1.screenshot({ path: file });
  t.diagnostic(`screenshot: ${path.relative(process.cwd(), file)}`);
});
