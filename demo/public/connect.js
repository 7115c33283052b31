// What both demo pages share: where replisync is, tokens (token mode), a Replicache instance
// for one space, and replisync's Server-Sent Events pokes, which make every open page pull.
//
// Token mode (the demo server was started with DEMO_JWT_SECRET or REPLISYNC_JWT_SECRET):
// the page fetches a short-lived token for its user and space from the demo server's
// /dev-token, sends it with every push and pull (Replicache's `auth`), gets a new one through
// `getAuth` when replisync answers 401, and opens the SSE stream with `?auth=<token>`.
//
// Query parameters: ?space=NAME (default: the page's own), ?server=URL (default: what the demo
// server was started with, REPLISYNC_URL), ?user=NAME (token mode; default a random name
// kept in this browser's localStorage).

import { Replicache } from 'replicache';

const params = new URLSearchParams(location.search);
const server = (params.get('server') ?? document.querySelector('meta[name="replisync-url"]').content).replace(
  /\/+$/,
  '',
);
const tokenMode = document.querySelector('meta[name="replisync-auth"]')?.content === 'token';
const space = params.get('space') ?? document.querySelector('meta[name="default-space"]')?.content ?? 'demo';
const spaceURL = `${server}/spaces/${encodeURIComponent(space)}`;

const $ = (id) => document.getElementById(id);
$('space').textContent = space;
$('server').textContent = server;

// --- Tokens (token mode only) ------------------------------------------------------------

function defaultUser() {
  const key = 'replisync-demo-user';
  let user = localStorage.getItem(key);
  if (!user) {
    user = `user-${Math.random().toString(36).slice(2, 8)}`;
    localStorage.setItem(key, user);
  }
  return user;
}

const userID = tokenMode ? (params.get('user') ?? defaultUser()) : undefined;
let token = '';
window.demoTokenFetches = 0;

/** Fetches a fresh token for this user and space from the demo server. */
async function fetchToken() {
  const query = new URLSearchParams({ user: userID, space });
  const res = await fetch(`/dev-token?${query}`, { cache: 'no-store' });
  if (!res.ok) throw new Error(`/dev-token answered ${res.status}: ${await res.text()}`);
  token = (await res.json()).token;
  window.demoTokenFetches++;
  return token;
}

if (tokenMode) {
  $('user').textContent = userID;
  $('as').hidden = false;
  await fetchToken();
}

// --- Replicache ----------------------------------------------------------------------------

/**
 * A Replicache for this page's space with these `mutators`, with tokens in token mode and
 * pulls on every poke. `app` names the local database, so two demo pages never share one.
 */
export function startReplicache(app, mutators) {
  const rep = new Replicache({
    // One local database per app, user and space, so two users on one browser never share data.
    name: tokenMode ? `${app}/${userID}/${space}` : `replisync-demo/${app}/${space}`,
    pushURL: `${spaceURL}/push`,
    pullURL: `${spaceURL}/pull`,
    auth: tokenMode ? `Bearer ${token}` : undefined,
    mutators,
  });
  if (tokenMode) {
    // Replicache calls this when a push or pull is answered 401 (e.g. the token expired), then
    // retries with what it returns. (An instance property: the constructor takes no getAuth.)
    rep.getAuth = async () => `Bearer ${await fetchToken()}`;
  }
  openPokes(rep);
  // For tests and the curious: the Replicache instance.
  window.rep = rep;
  return rep;
}

// --- Pokes -----------------------------------------------------------------------------------

// replisync sends `event: poke` on this stream after every push that changed the space.
// On each (re)connection we also pull, to catch up with pokes sent while we were away.
const status = $('status');
function setStatus(state, text) {
  status.dataset.sse = state;
  status.textContent = text;
}

let events;
let reopenDelay = 1_000;
function openPokes(rep) {
  const url = tokenMode ? `${spaceURL}/poke?auth=${encodeURIComponent(token)}` : `${spaceURL}/poke`;
  events = new EventSource(url);
  events.addEventListener('open', () => {
    reopenDelay = 1_000;
    setStatus('open', 'live: changes from others appear as they happen');
    rep.pull();
  });
  events.addEventListener('poke', () => rep.pull());
  events.addEventListener('error', () => {
    setStatus('connecting', 'reconnecting to replisync…');
    // EventSource reconnects by itself after a dropped connection, but gives up for good on
    // an HTTP error, e.g. a 401 once the token in its URL has expired: then open a new
    // stream with a fresh token.
    if (tokenMode && events.readyState === EventSource.CLOSED) {
      events.close();
      setTimeout(async () => {
        try {
          await fetchToken();
        } catch {
          // the demo server is away: try again later
        }
        openPokes(rep);
      }, reopenDelay);
      reopenDelay = Math.min(reopenDelay * 2, 30_000);
    }
  });
}

