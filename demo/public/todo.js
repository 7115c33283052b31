// The todo page: a shared todo list whose mutators are in mutators.js (bundled from
// src/mutators.ts; replisync loads the same file). Add, toggle, rename (double-click) and delete.

import { startReplicache } from './connect.js';
import { MAX_TITLE_LENGTH, mutators } from './mutators.js';

const rep = startReplicache('todo', mutators);
const $ = (id) => document.getElementById(id);
$('title').maxLength = MAX_TITLE_LENGTH;

/** Ids that sort by creation time, so the list (ordered by key) shows the oldest first. */
function newId() {
  const time = Date.now().toString(36).padStart(9, '0');
  return `${time}-${Math.random().toString(36).slice(2, 8)}`;
}

$('add').addEventListener('submit', (event) => {
  event.preventDefault();
  const title = $('title').value.trim();
  if (!title) return;
  rep.mutate.createTodo({ id: newId(), title });
  $('title').value = '';
});

function todoItem(todo) {
  const item = document.createElement('li');
  item.dataset.id = todo.id;
  item.classList.toggle('done', todo.done);
  const box = document.createElement('input');
  box.type = 'checkbox';
  box.checked = todo.done;
  box.addEventListener('change', () => rep.mutate.toggleTodo({ id: todo.id }));
  const title = document.createElement('span');
  title.className = 'title';
  title.textContent = todo.title;
  title.title = 'double-click to rename';
  title.addEventListener('dblclick', () => {
    const renamed = prompt('Rename', todo.title);
    if (renamed && renamed.trim()) rep.mutate.renameTodo({ id: todo.id, title: renamed });
  });
  const remove = document.createElement('button');
  remove.type = 'button';
  remove.className = 'delete';
  remove.textContent = '×';
  remove.setAttribute('aria-label', `delete ${todo.title}`);
  remove.addEventListener('click', () => rep.mutate.deleteTodo({ id: todo.id }));
  item.append(box, title, remove);
  return item;
}

rep.subscribe((tx) => tx.scan({ prefix: 'todo/' }).values().toArray(), {
  onData(todos) {
    $('todos').replaceChildren(...todos.map(todoItem));
    const left = todos.filter((todo) => !todo.done).length;
    $('left').textContent = `${left} of ${todos.length} left`;
  },
});
