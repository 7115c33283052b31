// Scenario 15: browsers that stay away past REPLISYNC_CLIENT_TTL come back and converge by
// themselves. replisync runs with a 4 s client TTL, a 2 s tombstone TTL and a garbage collection
// pass every second. Two users of the todo demo in Chromium, each in a browser context of its own
// (its IndexedDB outlives its pages), add todos and are closed: A after adding one more todo while
// offline (pending when it leaves), C with nothing pending. Client B (Node, pulling every second,
// so it stays alive) adds a todo and deletes one of A's and C's. Garbage collection removes A's
// and C's client groups and B's deletions. A and C are opened again in their contexts: Replicache
// takes up the old client group from IndexedDB; its pull (C's only request, and A's, with A's push
// of the offline todo) is answered ClientStateNotFound, and Replicache's default
// onClientStateNotFound reloads the page. After the reload Replicache forks a new client group
// from the old group's snapshot (its old cookie, without A's pending todo), whose pull from that
// cookie, past the removed deletions, gets `clear` and the whole space. A and C then hold exactly
// the server's todos (the deleted ones do not come back, A's offline todo is lost), and their
// next todos reach B and each other.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { isDeepStrictEqual } from 'node:util';
import { E2E, REPO_DIR, uniqueId, waitFor, pushedAndPulled, readKey, realFetch, ensureArtifactsDir } from '../harness.mjs';

const MUTATORS_FILE = path.join(REPO_DIR, 'demo', 'public', 'mutators.js');
// The demo's bundle, built from its TypeScript source now, so that this scenario never runs a
// stale one (as scenario 12 does).
execFileSync('npm', ['run', '--silent', 'build'], { cwd: path.join(REPO_DIR, 'demo'), stdio: 'pipe' });
const { mutators } = await import(pathToFileURL(MUTATORS_FILE).href);
const CLIENT_STATE_NOT_FOUND = { error: 'ClientStateNotFound' };

// A tap in the page (installed before any of its scripts, on every load): every push and pull
// with its request body and its answer, read before Replicache sees it, so an answer that makes
// the page reload is recorded too; reported to the test through the `__e2eSync` binding. It also
// notes when Replicache last wrote its state to IndexedDB (Replicache announces each write on a
// BroadcastChannel, for its other tabs).
const PAGE_TAP = ({ repName }) => {
  window.__e2ePersistedAt = 0;
  new BroadcastChannel(`replicache-on-persist:${repName}`).onmessage = () => {
    window.__e2ePersistedAt = Date.now();
  };
  const realFetch = window.fetch;
  window.fetch = async (input, init) => {
    const url = typeof input === 'string' ? input : input instanceof URL ? input.href : input.url;
    const m = /\/spaces\/[^/]+\/(push|pull)$/.exec(url);
    if (!m) return realFetch(input, init);
    let request;
    try {
      const text = typeof init?.body === 'string' ? init.body : await input.clone().text();
      request = JSON.parse(text);
    } catch {
      request = null;
    }
    const entry = { kind: m[1], request, at: Date.now() };
    try {
      const res = await realFetch(input, init);
      entry.status = res.status;
      entry.response = await res.clone().text();
      window.__e2eSync(entry);
      return res;
    } catch (e) {
      entry.error = String(e?.message ?? e);
      window.__e2eSync(entry);
      throw e;
    }
  };
};

/** The value of counter `name` in a /metrics text (0 if absent). */
function counter(text, name) {
  const m = new RegExp(`^${name} (\\d+)`, 'm').exec(text);
  return m ? Number(m[1]) : 0;
}

const titlesOf = (todos) => Object.values(todos).map((todo) => todo.title).sort();

test(
  '15. browsers offline past the client TTL are reset by the server and converge by themselves',
  { timeout: 120_000 },
  async (t) => {
    const env = new E2E();
    t.after(() => env.cleanup());
    const server = await env.startReplisync({
      env: {
        REPLISYNC_MUTATORS: MUTATORS_FILE,
        REPLISYNC_CLIENT_TTL: '4s',
        // Shorter than the client TTL, so that B's deletions are compacted before A's and C's
        // groups are collected, and they come back while the server still remembers their
        // groups (one more client TTL after collecting them).
        REPLISYNC_TOMBSTONE_TTL: '2s',
        REPLISYNC_GC_INTERVAL: '1s',
      },
    });
    const metrics = async () => {
      const text = await (await realFetch(`${server.url}/metrics`)).text();
      return {
        groupsRemoved: counter(text, 'replisync_gc_client_groups_removed_total'),
        tombstonesRemoved: counter(text, 'replisync_gc_tombstones_removed_total'),
        pullResets: counter(text, 'replisync_pull_resets_total'),
      };
    };
    const demo = await env.startDemo(server);
    const browser = await env.browser();
    const space = uniqueId('todos-');
    const pageUrl = `${demo.url}?space=${space}`;
    const serverTodos = async () => (await server.snapshot(space)).data;
    const problems = [];
    const consoleLines = [];

    /** A user of the todo page: a browser context of its own, whose IndexedDB outlives its pages. */
    const browserUser = async (label) => {
      const context = await browser.newContext({ viewport: { width: 640, height: 640 } });
      const user = { label, context, syncs: [], page: undefined };
      await context.exposeBinding('__e2eSync', (_source, entry) => user.syncs.push(entry));
      await context.addInitScript(PAGE_TAP, { repName: `replisync-demo/todo/${space}` });
      user.open = async () => {
        const page = await context.newPage();
        page.e2eLoads = 0;
        page.setDefaultTimeout(15_000);
        page.on('load', () => page.e2eLoads++);
        page.on('pageerror', (e) => problems.push(`${label}: ${e.message}`));
        // Replicache's own errors and warnings, for the report when the scenario fails.
        page.on('console', (m) => {
          if (m.type() === 'error' || m.type() === 'warning') consoleLines.push(`${label}: ${m.text()}`);
        });
        user.page = page;
        await page.goto(pageUrl);
        return page;
      };
      return user;
    };
    const live = (user) => user.page.locator('#status[data-sse="open"]').waitFor();
    const titles = (user) => user.page.locator('#todos .title').allTextContents();
    const groupOf = (user) => user.page.evaluate(() => window.rep?.clientGroupID);
    // The todos as the page's Replicache has them (what it shows), by key.
    const todosOf = (user) =>
      user.page.evaluate(async () =>
        Object.fromEntries(await window.rep.query((tx) => tx.scan({ prefix: 'todo/' }).entries().toArray())),
      );
    const pendingOf = (user) =>
      user.page.evaluate(async () => (await window.rep.experimentalPendingMutations()).length);
    const addTodo = async (user, title) => {
      await user.page.fill('#title', title);
      await user.page.press('#title', 'Enter');
      await user.page.locator('#todos .title', { hasText: title }).waitFor();
    };
    const noPending = (user) =>
      waitFor(async () => (await pendingOf(user)) === 0, {
        timeout: 15_000,
        interval: 100,
        message: `${user.label} to have no pending mutations`,
      });
    /** Waits until the page's Replicache has written its state to IndexedDB after `since`. */
    const persisted = (user, since) =>
      waitFor(async () => (await user.page.evaluate(() => window.__e2ePersistedAt)) > since, {
        timeout: 10_000,
        interval: 50,
        message: `${user.label} to write its state to IndexedDB`,
      });

    const a = await browserUser('A');
    const c = await browserUser('C');
    const users = [a, c];
    try {
      // --- A and C work online. -----------------------------------------------------------------
      for (const user of users) {
        await user.open();
        await live(user);
      }
      for (const title of ['buy milk', 'call the plumber', 'water the plants']) await addTodo(a, title);
      await addTodo(c, 'book the train');
      await waitFor(async () => Object.keys(await serverTodos()).length === 4, {
        timeout: 15_000,
        message: "A's and C's four todos on the server",
      });
      const before = await serverTodos();
      const serverCookie = (await server.snapshot(space)).cookie;
      const keyOf = (title) => Object.keys(before).find((key) => before[key].title === title);
      for (const user of users) {
        await noPending(user);
        // Pull once more: the page has everything, at the space's cookie ...
        await user.page.evaluate(() => window.rep.pull());
        const lastPull = await waitFor(
          () => user.syncs.find((s) => s.kind === 'pull' && JSON.parse(s.response ?? '{}').cookie === serverCookie),
          { message: `${user.label} to pull cookie ${serverCookie}` },
        );
        assert.deepEqual(await todosOf(user), before, `${user.label} has the four todos`);
        // ... and has written it to IndexedDB (Replicache does so a second or so after a change),
        // so that what it finds when it comes back does not depend on timing.
        await persisted(user, lastPull.at);
        user.oldGroup = await groupOf(user);
      }
      assert.notEqual(a.oldGroup, c.oldGroup);

      // B stays alive by pulling every second (the TTL is 4 s).
      const b = await env.replicache(server, space, { name: uniqueId('b-'), mutators, pullInterval: 1_000 });
      let bStateNotFound = 0;
      b.onClientStateNotFound = () => bStateNotFound++;
      await pushedAndPulled(b);
      assert.equal((await readKey(b, keyOf('book the train')))?.title, 'book the train', 'B sees the todos');

      // --- A goes offline and makes a todo that stays local; A and C go away. ------------------
      await a.context.setOffline(true);
      const offlineFrom = a.syncs.length;
      await addTodo(a, 'made while offline');
      await persisted(a, await a.page.evaluate(() => Date.now()));
      assert.equal(await pendingOf(a), 1, 'the offline todo is pending');
      await a.page.close();
      await c.page.close();
      assert.deepEqual(
        a.syncs.slice(offlineFrom).filter((s) => !s.error),
        [],
        'nothing reached replisync from the offline page',
      );

      // --- B changes the space while they are away. --------------------------------------------
      await b.mutate.createTodo({ id: '0-from-b', title: 'from B' });
      await b.mutate.deleteTodo({ id: before[keyOf('call the plumber')].id });
      await b.mutate.deleteTodo({ id: before[keyOf('book the train')].id });
      await pushedAndPulled(b);
      const expected = await serverTodos();
      assert.deepEqual(titlesOf(expected), ['buy milk', 'from B', 'water the plants'], "the server has B's changes");

      // --- Garbage collection takes A's and C's groups (not B's) and B's deletions. -----------
      const collected = await waitFor(
        async () => {
          const m = await metrics();
          return m.groupsRemoved >= 2 && m.tombstonesRemoved >= 2 ? m : null;
        },
        { timeout: 30_000, interval: 100, message: "A's and C's client groups and B's deletions to be collected" },
      );
      assert.equal(collected.groupsRemoved, 2, 'only the idle client groups, A and C, were collected');
      assert.equal(collected.tombstonesRemoved, 2, "B's two deletions were compacted");
      assert.ok(
        server.lines.some((l) => /garbage collection: removed idle client groups/.test(l)),
        'the collection is logged',
      );
      assert.equal(bStateNotFound, 0, 'B, pulling every second, was not collected');

      // --- A and C come back, online, in their browser contexts. -------------------------------
      await a.context.setOffline(false);
      for (const user of users) user.comeback = user.syncs.length;
      await Promise.all(users.map((user) => user.open()));

      for (const user of users) {
        // The old client group is answered ClientStateNotFound; Replicache reloads the page.
        await waitFor(() => user.page.e2eLoads >= 2, {
          timeout: 15_000,
          message: `Replicache to reload ${user.label}'s page (its default onClientStateNotFound)`,
        });
        user.newGroup = await waitFor(
          async () => {
            const id = await groupOf(user);
            return id && id !== user.oldGroup ? id : null;
          },
          { timeout: 15_000, interval: 100, message: `${user.label}'s page to run on a new client group` },
        );
        await live(user);

        const back = () => user.syncs.slice(user.comeback);
        // The cookie the page wrote to IndexedDB before it went away: the first pull after it
        // came back says which (the old group's, or, when the answer to its push reloaded the
        // page before that pull went out, the new group's, which forks from the same snapshot).
        // It is the space's cookie before B's changes (an older one only if Replicache wrote its
        // state while taking in its last pull).
        const firstPull = await waitFor(() => back().find((s) => s.kind === 'pull'), {
          message: `${user.label}: a pull after coming back`,
        });
        user.storedCookie = firstPull.request.cookie;
        assert.ok(
          Number.isInteger(user.storedCookie) && user.storedCookie <= serverCookie,
          `${user.label} came back with a cookie from before B's changes (${user.storedCookie})`,
        );
        // Every answer the old group got is ClientStateNotFound. A's page pushes its offline todo
        // and pulls at once; the first answer reloads the page, which may cut the other short.
        // C had nothing to push: its pull alone is answered ClientStateNotFound.
        const old = back().filter((s) => s.request?.clientGroupID === user.oldGroup && s.status !== undefined);
        assert.ok(old.length >= 1, `${user.label}: the old group was answered`);
        for (const s of old) {
          assert.equal(s.status, 200, `${user.label}: ${s.kind} of the old group`);
          assert.deepEqual(JSON.parse(s.response), CLIENT_STATE_NOT_FOUND, `${user.label}: ${s.kind} of the old group`);
          if (s.kind === 'pull') assert.equal(s.request.cookie, user.storedCookie, `${user.label}: pulled from its cookie`);
          if (s.kind === 'push') assert.equal(s.request.mutations.length, 1, `${user.label}: pushed the offline todo`);
        }
        if (user === c) {
          assert.ok(
            old.every((s) => s.kind === 'pull'),
            'C: nothing to push; its pull alone was answered ClientStateNotFound',
          );
        }

        // The forked group starts from the old snapshot's cookie; B's deletions after it were
        // compacted, so the server answers `clear` and the whole space.
        const forkedPull = await waitFor(
          () => back().find((s) => s.kind === 'pull' && s.request?.clientGroupID === user.newGroup),
          { message: `${user.label}: the new client group to pull` },
        );
        assert.equal(forkedPull.request.cookie, user.storedCookie, `${user.label}: the new group forked from the old cookie`);
        assert.equal(forkedPull.status, 200);
        const answer = JSON.parse(forkedPull.response);
        assert.deepEqual(answer.patch[0], { op: 'clear' }, `${user.label}: a reset, clear and the whole space`);

        // Converged: exactly the server's todos. The deleted ones did not come back; A's
        // offline todo is gone on both sides.
        await waitFor(async () => isDeepStrictEqual(await todosOf(user), expected), {
          timeout: 15_000,
          interval: 100,
          message: `${user.label} to hold the server's todos ${JSON.stringify(expected)}`,
        });
        assert.deepEqual(await titles(user), ['from B', 'buy milk', 'water the plants'], `${user.label} shows them`);
        assert.equal(await pendingOf(user), 0, `${user.label}: nothing pending in the new group`);
      }
      assert.notEqual(a.newGroup, c.newGroup);
      assert.ok(
        server.lines.some(
          (l) => l.includes(space) && l.includes('client group removed by garbage collection: ClientStateNotFound'),
        ),
        'replisync logged its ClientStateNotFound answers',
      );
      assert.ok(
        (await metrics()).pullResets >= collected.pullResets + 2,
        'replisync counted the two resets',
      );

      // And they work again: their next todos land on the server and reach B and each other.
      await addTodo(a, 'A is back');
      await addTodo(c, 'C is back');
      for (const user of users) await noPending(user);
      const after = await serverTodos();
      assert.deepEqual(
        titlesOf(after),
        ['A is back', 'C is back', 'buy milk', 'from B', 'water the plants'],
        'the server has the new todos; not the offline one, not the deleted ones',
      );
      for (const title of ['A is back', 'C is back']) {
        const key = Object.keys(after).find((k) => after[k].title === title);
        await waitFor(async () => (await readKey(b, key))?.title === title, {
          timeout: 10_000,
          message: `B to pull "${title}"`,
        });
      }
      for (const user of users) {
        await waitFor(async () => isDeepStrictEqual(await todosOf(user), after), {
          timeout: 10_000,
          interval: 100,
          message: `${user.label} to hold both new todos`,
        });
        const pushes = user.syncs.filter((s) => s.kind === 'push' && s.request?.clientGroupID === user.newGroup);
        assert.ok(pushes.length >= 1, `${user.label}: the new group pushed`);
        for (const s of pushes) assert.deepEqual([s.status, s.response], [200, '{}'], `${user.label}: push answered`);
        assert.equal(user.page.e2eLoads, 2, `${user.label}: one reload, no more`);
      }
      assert.equal(await readKey(b, keyOf('call the plumber')), undefined, 'B: deleted stays deleted');
      assert.equal(bStateNotFound, 0);
    } catch (e) {
      const syncs = (user) =>
        JSON.stringify(
          user.syncs.map((s) => [
            s.kind,
            s.request?.clientGroupID,
            s.request?.cookie,
            s.status ?? s.error,
            s.response?.slice(0, 80),
          ]),
        );
      const details =
        `\npage problems: ${JSON.stringify(problems)}` +
        users.map((user) => `\n${user.label}'s pushes and pulls: ${syncs(user)}`).join('') +
        `\npage console errors and warnings:\n${consoleLines.slice(-30).join('\n')}` +
        // Every line but garbage collection's passes and B's pulls (one each a second).
        `\nreplisync log, the last 60 lines but GC passes and pulls:\n${server.lines
          .filter((l) => !/replisync::gc: garbage collection: removed|route="\/spaces\/\{space\}\/pull" status=200/.test(l))
          .slice(-60)
          .join('\n')}` +
        `\nreplisync log tail:\n${server.lines.slice(-10).join('\n')}`;
      // The report prints the stack, which may have been made with the first message.
      const stack = e.stack;
      e.message += details;
      e.stack = stack + details;
      throw e;
    }
    assert.deepEqual(problems, [], 'no page errors');

    const dir = ensureArtifactsDir();
    for (const user of users) {
      const file = path.join(dir, `offline-past-the-ttl-${user.label}.png`);
      await user.page.screenshot({ path: file });
      t.diagnostic(`screenshot: ${path.relative(process.cwd(), file)}`);
    }
  },
);
