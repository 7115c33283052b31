// Scenario 8: a real browser. The demo page (demo/, the npm `replicache` package loaded as ES
// modules through an import map) is served by its own static server beside replisync and
// reaches replisync cross-origin, with pokes over SSE (EventSource). Two headless Chromium
// contexts (two client groups) open it; a click in one shows up in the other without a reload.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { E2E, uniqueId, ensureArtifactsDir } from '../harness.mjs';

test("8. two Chromium pages of the demo see each other's clicks live", { timeout: 180_000 }, async (t) => {
  const env = new E2E();
  t.after(() => env.cleanup());

  const server = await env.startReplisync();
  const demo = await env.startDemo(server);
  const demoOrigin = new URL(demo.url).origin;
  assert.notEqual(demoOrigin, new URL(server.url).origin, 'the page reaches replisync cross-origin');

  const browser = await env.browser();
  const space = uniqueId('demo-');
  const pageUrl = `${demo.url}counter.html?space=${space}`;

  const problems = [];
  const pages = [];
  const pulls = [[], []];
  for (let i = 0; i < 2; i++) {
    const context = await browser.newContext({ viewport: { width: 640, height: 480 } });
    const page = await context.newPage();
    page.setDefaultTimeout(15_000);
    page.on('pageerror', (e) => problems.push(`page ${i + 1}: ${e.message}`));
    page.on('console', (m) => {
      if (m.type() === 'error') problems.push(`page ${i + 1} console: ${m.text()}`);
    });
    page.on('request', (r) => {
      if (r.url().endsWith('/pull') && r.method() === 'POST') pulls[i].push(Date.now());
    });
    await page.goto(pageUrl);
    pages.push(page);
  }
  const [p1, p2] = pages;
  try {
    await clickAndWatch();
  } catch (e) {
    e.message += `\npage problems: ${JSON.stringify(problems)}\nreplisync log tail:\n${server.lines.slice(-15).join('\n')}`;
    throw e;
  }
  assert.deepEqual(problems, [], 'no page errors');

  async function clickAndWatch() {
    // Both pages are live (EventSource open) and show the empty space's count, 0.
    for (const page of pages) {
      await page.locator('#status[data-sse="open"]').waitFor();
      await page.locator('#count', { hasText: /^0$/ }).waitFor();
      // A marker that a reload would erase.
      await page.evaluate(() => {
        window.__e2eNoReload = true;
      });
    }
    const groups = await Promise.all(pages.map((p) => p.evaluate(() => window.rep.clientGroupID)));
    assert.notEqual(groups[0], groups[1], 'two browser contexts, two client groups');

    // A click in page 1 appears in page 2.
    const page2PullsBefore = pulls[1].length;
    await p1.click('#increment');
    await p1.locator('#count', { hasText: /^1$/ }).waitFor({ timeout: 5_000 });
    await p2.locator('#count', { hasText: /^1$/ }).waitFor({ timeout: 10_000 });
    assert.ok(pulls[1].length > page2PullsBefore, 'page 2 pulled (on the poke) to see the click');

    // And the other way round, two clicks.
    await p2.click('#increment');
    await p2.click('#increment');
    await p1.locator('#count', { hasText: /^3$/ }).waitFor({ timeout: 10_000 });
    await p2.locator('#count', { hasText: /^3$/ }).waitFor({ timeout: 10_000 });

    for (const page of pages) {
      assert.equal(await page.evaluate(() => window.__e2eNoReload), true, 'the page was not reloaded');
    }
    assert.deepEqual((await server.snapshot(space)).data, { count: 3 });

    const dir = ensureArtifactsDir();
    for (let i = 0; i < 2; i++) {
      const file = path.join(dir, `demo-page-${i + 1}.png`);
      await pages[i].screenshot({ path: file });
      t.diagnostic(`screenshot: ${path.relative(process.cwd(), file)}`);
    }
  }
});
