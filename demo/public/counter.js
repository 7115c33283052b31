// The counter page: one counter in one replisync space, shared by everyone who opens the page.
// Replicache runs the `increment` mutator optimistically; replisync applies its built-in
// `increment` authoritatively on push (see connect.js for tokens and pokes).

import { startReplicache } from './connect.js';

const rep = startReplicache('counter', {
  // The same mutator replisync runs on the server (its built-in `increment`).
  async increment(tx, { key, delta }) {
    const current = (await tx.get(key)) ?? 0;
    await tx.set(key, current + delta);
  },
});

rep.subscribe((tx) => tx.get('count'), {
  onData(count) {
    document.getElementById('count').textContent = String(count ?? 0);
  },
});

document.getElementById('increment').addEventListener('click', () => {
  rep.mutate.increment({ key: 'count', delta: 1 });
});
