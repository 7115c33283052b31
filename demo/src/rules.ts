// The todo list's rules for a title, in a module of their own: mutators.ts imports them, and
// the bundle (npm run build) carries them into the one file the page and replisync load.

/** The longest title a todo may have. */
export const MAX_TITLE_LENGTH = 100;

/** Throws, saying what is wrong, unless `title` is a todo's title: one line of 1 to 100 characters. */
export function checkTitle(title: unknown): asserts title is string {
  if (typeof title !== 'string' || title.trim() === '') {
    throw new Error('a todo needs a title');
  }
  if (title.length > MAX_TITLE_LENGTH) {
    throw new Error(`a title has at most ${MAX_TITLE_LENGTH} characters, not ${title.length}`);
  }
  if (/[\r\n]/.test(title)) {
    throw new Error('a title is one line: no line breaks');
  }
}
