// Scenario 12: the app's own mutators, written once. replisync loads demo/public/mutators.js
// (REPLISYNC_MUTATORS) and the todo page imports the same file. Two Chromium pages add, toggle,
// rename and delete todos and converge; a client that changed its own copy of a mutator to skip
// the title rule sees its optimistic todo undone by the server.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { E2E, REPO_DIR, uniqueId, waitFor, pushedAndPulled, readKey, ensureArtifactsDir } from '../harness.mjs';
import { MAX_TITLE_LENGTH, mutators } from '../../../demo/public/mutators.js';

const MUTATORS_FILE = path.join(REPO_DIR, 'demo', 'public', 'mutators.js');

test('12. two pages of the todo demo converge; the server enforces the title rule', { timeout: 240_000 }, async (t) => {
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

  // A client whose createTodo skips the title rule: its todo shows up locally at once, then the
  // server's own createTodo refuses it and the client's next pull takes it away.
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
  assert.equal((await readKey(cheater, 'todo/zz-cheat'))?.title, longTitle, 'applied optimistically');
  await pushedAndPulled(cheater);
  await waitFor(async () => (await readKey(cheater, 'todo/zz-cheat')) === undefined, {
    timeout: 10_000,
    message: 'the server to undo the todo that broke its rule',
  });
  assert.equal((await server.snapshot(space)).data['todo/zz-cheat'], undefined);
  const refusal = server.lines.find((line) => line.includes('mutations failed') && line.includes('createTodo'));
  assert.ok(refusal, 'the log names the refused mutator');
  assert.match(refusal, /at most 100 characters/, 'and why');
  // The honest pages never showed it.
  for (const page of pages) assert.deepEqual(await titles(page), ['buy oat milk']);

  const dir = ensureArtifactsDir();
  const file = path.join(dir, 'todo-page.png');
  await p1.screenshot({ path: file });
  t.diagnostic(`screenshot: ${path.relative(process.cwd(), file)}`);
});
