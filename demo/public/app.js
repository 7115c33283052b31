// The demo app: one counter in one replisync space, shared by everyone who opens the page.
//
// Replicache keeps a local copy (IndexedDB) and runs the `increment` mutator optimistically;
// replisync applies the same mutation authoritatively on push. The page listens to
// replisync's Server-Sent Events poke stream and pulls whenever the space changes.
//
// Query parameters: ?space=NAME (default "demo"), ?server=URL (default: what the demo
// server was started with, REPLISYNC_URL).

import { Replicache } from 'replicache';

const params = new URLSearchParams(location.search);
const server = (params.get('server') ?? document.querySelector('meta[name="replisync-url"]').content).replace(
  /\/+$/,
  '',
);
const space = params.get('space') ?? 'demo';
const spaceURL = `${server}/spaces/${encodeURIComponent(space)}`;

const $ = (id) => document.getElementById(id);
$('space').textContent = space;
$('server').textContent = server;

const rep = new Replicache({
  name: `replisync-demo/${space}`,
  pushURL: `${spaceURL}/push`,
  pullURL: `${spaceURL}/pull`,
  // The same mutator replisync runs on the server (its built-in `increment`).
  mutators: {
    async increment(tx, { key, delta }) {
      const current = (await tx.get(key)) ?? 0;
      await tx.set(key, current + delta);
    },
  },
});

rep.subscribe((tx) => tx.get('count'), {
  onData(count) {
    $('count').textContent = String(count ?? 0);
  },
});

$('increment').addEventListener('click', () => {
  rep.mutate.increment({ key: 'count', delta: 1 });
});

// Pokes: replisync sends `event: poke` on this stream after every push that changed the space.
// On each (re)connection we also pull, to catch up with pokes sent while we were away.
const status = $('status');
function setStatus(state, text) {
  status.dataset.sse = state;
  status.textContent = text;
}
const events = new EventSource(`${spaceURL}/poke`);
events.addEventListener('open', () => {
  setStatus('open', 'live: changes from others appear as they happen');
  rep.pull();
});
events.addEventListener('poke', () => rep.pull());
events.addEventListener('error', () => {
  setStatus('connecting', 'reconnecting to replisync…');
});

// For tests and the curious: the Replicache instance.
window.rep = rep;
