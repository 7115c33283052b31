// The `tx` a JavaScript mutator gets on the server (Replicache's WriteTransaction), built on the
// engine's synchronous host functions, and the rule that finds a module's mutators. Each `tx`
// carries its mutation's token, which the host checks: a `tx` kept past its mutation throws.
(function (host) {
  'use strict';
  const parse = JSON.parse;
  const stringify = JSON.stringify;
  const freeze = Object.freeze;
  const keysOf = Object.keys;
  const isFinite = Number.isFinite;
  const floor = Math.floor;
  const min = Math.min;
  // Entries asked of the server per read while a scan is iterated.
  const PAGE = 100;

  function checkKey(key, method) {
    if (typeof key !== 'string') {
      throw new TypeError(`tx.${method}: the key must be a string, not ${typeof key}`);
    }
    return key;
  }

  // JSON text of `value`, refusing what JSON cannot hold (instead of dropping it silently).
  function jsonText(method, key, value) {
    return stringify(value, function (name, v) {
      const type = typeof v;
      if (type === 'undefined' || type === 'function' || type === 'symbol' || type === 'bigint' ||
          (type === 'number' && !isFinite(v))) {
        const what = name === '' ? 'the value' : `property ${stringify(String(name))}`;
        const found = type === 'number' ? String(v) : type;
        throw new TypeError(`tx.${method}(${stringify(key)}): ${what} is ${found}, which is not JSON`);
      }
      return v;
    });
  }

  function scanResult(token, options) {
    if (options !== undefined && (options === null || typeof options !== 'object')) {
      throw new TypeError('tx.scan: options must be an object');
    }
    const opts = options || {};
    if (opts.indexName !== undefined) {
      throw new TypeError('tx.scan: indexName is not supported by replisync');
    }
    const prefix = opts.prefix === undefined ? '' : opts.prefix;
    if (typeof prefix !== 'string') throw new TypeError('tx.scan: prefix must be a string');
    let startKey = '';
    let startExclusive = false;
    if (opts.start !== undefined) {
      if (opts.start === null || typeof opts.start.key !== 'string') {
        throw new TypeError('tx.scan: start.key must be a string');
      }
      startKey = opts.start.key;
      startExclusive = opts.start.exclusive === true;
    }
    const limit = opts.limit === undefined ? Infinity : opts.limit;
    if (typeof limit !== 'number' || !(limit >= 0)) {
      throw new TypeError('tx.scan: limit must be a number, 0 or more');
    }

    // [key, value] pairs, read a page at a time from where the last page ended.
    async function* entries() {
      let from = startKey;
      let exclusive = startExclusive;
      let remaining = floor(limit);
      while (remaining > 0) {
        const want = min(remaining, PAGE);
        const page = parse(host.scan(token, prefix, from, exclusive, want));
        for (const entry of page) yield entry;
        if (page.length < want) return;
        remaining -= page.length;
        from = page[page.length - 1][0];
        exclusive = true;
      }
    }

    function iterate(pick) {
      const iterator = (async function* () {
        for await (const entry of entries()) yield pick(entry);
      })();
      iterator.toArray = async function () {
        const all = [];
        for await (const item of iterator) all.push(item);
        return all;
      };
      return iterator;
    }

    return freeze({
      values: () => iterate((entry) => entry[1]),
      keys: () => iterate((entry) => entry[0]),
      entries: () => iterate((entry) => entry),
      toArray: () => iterate((entry) => entry[1]).toArray(),
      [Symbol.asyncIterator]: () => iterate((entry) => entry[1]),
    });
  }

  function makeTx(token, clientID, mutationID, userID, spaceID) {
    async function set(key, value) {
      host.put(token, checkKey(key, 'set'), jsonText('set', key, value));
    }
    return freeze({
      clientID,
      mutationID,
      reason: 'authoritative',
      location: 'server',
      environment: 'server',
      // Who pushed, and to which space: for rules only the server can enforce.
      auth: freeze({ userID, spaceID }),
      async get(key) {
        const text = host.get(token, checkKey(key, 'get'));
        return text === undefined ? undefined : parse(text);
      },
      async has(key) {
        return host.has(token, checkKey(key, 'has'));
      },
      async isEmpty() {
        return parse(host.scan(token, '', '', false, 1)).length === 0;
      },
      scan: (options) => scanResult(token, options),
      set,
      put: set,
      async del(key) {
        return host.del(token, checkKey(key, 'del'));
      },
    });
  }

  function isObject(value) {
    return value !== null && typeof value === 'object';
  }

  // The module's `mutators` export if it is an object, else its default export if that is an
  // object, else its exported functions.
  function pickMutators(namespace) {
    let source = namespace;
    if (isObject(namespace.mutators)) source = namespace.mutators;
    else if (isObject(namespace.default)) source = namespace.default;
    const found = Object.create(null);
    for (const name of keysOf(source)) {
      if (source === namespace && name === 'default') continue;
      if (typeof source[name] === 'function') found[name] = source[name];
    }
    return found;
  }

  return freeze({ makeTx, pickMutators });
})
