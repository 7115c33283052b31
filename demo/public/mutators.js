// The todo list's mutators, in one file: the page imports it (todo.js) and replisync loads it
// (REPLISYNC_MUTATORS=demo/public/mutators.js), so the browser and the server run the same code.
// In the browser they run optimistically; on the server they are authoritative, so a rule here
// holds even for a client that changed its own copy of this file.

/** The longest title a todo may have. */
export const MAX_TITLE_LENGTH = 100;

function checkTitle(title) {
  if (typeof title !== 'string' || title.trim() === '') {
    throw new Error('a todo needs a title');
  }
  if (title.length > MAX_TITLE_LENGTH) {
    throw new Error(`a title has at most ${MAX_TITLE_LENGTH} characters, not ${title.length}`);
  }
}

const todoKey = (id) => `todo/${id}`;

export const mutators = {
  async createTodo(tx, { id, title }) {
    checkTitle(title);
    await tx.set(todoKey(id), { id, title: title.trim(), done: false });
  },

  async toggleTodo(tx, { id }) {
    const todo = await tx.get(todoKey(id));
    if (todo) await tx.set(todoKey(id), { ...todo, done: !todo.done });
  },

  async renameTodo(tx, { id, title }) {
    checkTitle(title);
    const todo = await tx.get(todoKey(id));
    if (todo) await tx.set(todoKey(id), { ...todo, title: title.trim() });
  },

  async deleteTodo(tx, { id }) {
    await tx.del(todoKey(id));
  },
};
