// The todo list's mutators, in TypeScript. `npm run build` bundles this file and what it imports
// into public/mutators.js, the one ES module the page imports and replisync loads
// (REPLISYNC_MUTATORS=demo/public/mutators.js), so the browser and the server run the same code.
// In the browser they run optimistically; on the server they are authoritative, so a rule here
// holds even for a client that changed its own copy.

import type { WriteTransaction } from 'replicache';
import { checkTitle, MAX_TITLE_LENGTH } from './rules';

export { MAX_TITLE_LENGTH };

/** A todo, as stored under `todo/<id>` (a type, not an interface: it must stay JSON). */
export type Todo = {
  id: string;
  title: string;
  done: boolean;
};

const todoKey = (id: string) => `todo/${id}`;

async function readTodo(tx: WriteTransaction, id: string): Promise<Todo | undefined> {
  return (await tx.get(todoKey(id))) as Todo | undefined;
}

export const mutators = {
  async createTodo(tx: WriteTransaction, { id, title }: { id: string; title: string }) {
    checkTitle(title);
    const todo: Todo = { id, title: title.trim(), done: false };
    await tx.set(todoKey(id), todo);
  },

  async toggleTodo(tx: WriteTransaction, { id }: { id: string }) {
    const todo = await readTodo(tx, id);
    if (todo) await tx.set(todoKey(id), { ...todo, done: !todo.done });
  },

  async renameTodo(tx: WriteTransaction, { id, title }: { id: string; title: string }) {
    checkTitle(title);
    const todo = await readTodo(tx, id);
    if (todo) await tx.set(todoKey(id), { ...todo, title: title.trim() });
  },

  async deleteTodo(tx: WriteTransaction, { id }: { id: string }) {
    await tx.del(todoKey(id));
  },
};
