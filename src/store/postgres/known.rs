//! What this instance knows of a space's push state (version, client groups, clients, the keys
//! read ahead) from its own last read and commit there, so that the next push skips its read.
//!
//! Sound because an unlocked push's commit writes only at the version it read: if anything else
//! moved the space (another instance, the server API, an import raising versions), the commit is
//! refused as a conflict, and the push runs again from a fresh, locked read. Every write replisync
//! makes to a space's entries or clients moves its version; a client group removed by garbage
//! collection is caught by the commit's group checks (and in-process collection forgets all). A
//! space whose known state turned out stale is read, not assumed, for a while after: instances
//! sharing a busy space would otherwise lose a commit each time.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::protocol::SpaceId;
use crate::store::{
    ClientGroupRecord, ClientRecord, ClientState, KnownCounts, MaybeNewGroup, PushChanges,
};

/// How long a known state is trusted after the database last confirmed it (a read, a commit): a
/// bound on memory held for a quiet space, and on how long a group garbage collection removed
/// in another process stays known (its pushes then commit nothing only when they carry no new
/// mutation; any commit checks the group).
const KNOWN_FOR: Duration = Duration::from_secs(60);

/// How long a space whose known state was stale is read before each push.
const SHARED_FOR: Duration = Duration::from_secs(10);

/// Most client groups and clients kept for one space: past it, only the last commit's are kept.
const MAX_IDS_PER_SPACE: usize = 1024;

/// Most keys kept for one space beyond those its last read asked for.
const MAX_KEYS_PER_SPACE: usize = 256;

/// Most bytes one space's known state may hold; a larger one is not kept.
const MAX_BYTES_PER_SPACE: u64 = 1 << 20;

/// Most spaces remembered as written by another writer; past it, the oldest marks go.
const MAX_SHARED_SPACES: usize = 10_000;

/// Bytes counted for each kept record besides its text (its map slot, its strings' allocations),
/// and for each space's state whatever it holds (its maps, its place in the LRU, its key): the
/// budget is of memory actually held, not of text (a soak of 425,850 one-push spaces held about
/// 7 times the text and 64 bytes a record).
const RECORD_OVERHEAD: usize = 256;
const SPACE_OVERHEAD: usize = 1024;

/// The known states of the spaces this instance pushed to lately, within a byte budget.
/// Pushes to one space run one at a time in an instance, and a push takes its space's state
/// out while it runs: the lock is held for a lookup or an insert, never across a statement.
pub(crate) struct KnownSpaces {
    /// 0: nothing is kept.
    max_bytes: u64,
    kept: Mutex<Kept>,
    served: AtomicU64,
    stale: AtomicU64,
}

/// The states, least recently committed first, and the spaces read before each push for now.
struct Kept {
    states: LruCache<SpaceId, KeptState>,
    bytes: u64,
    /// Spaces another writer moved under a known state, until when they are read.
    shared: LruCache<SpaceId, Instant>,
}

struct KeptState {
    state: KnownSpace,
    weight: u64,
}

/// One space's push state at `version`, as replisync last read or committed it.
#[derive(Debug, Clone, Default)]
pub(super) struct KnownSpace {
    version: u64,
    groups: HashMap<String, ClientGroupRecord>,
    clients: HashMap<String, ClientRecord>,
    /// Keys read ahead, each with its value (`None`: absent or deleted).
    entries: HashMap<String, Option<String>>,
    /// When the database last confirmed it: a read, or a commit (which checks the version and
    /// the groups); answering a push from it confirms nothing.
    checked_at: Option<Instant>,
}

/// What a push group's first read asks for: client groups, clients, keys read ahead, and the
/// groups that may be new.
pub(super) type Asked<'a> = (
    &'a [String],
    &'a [String],
    &'a [String],
    &'a [MaybeNewGroup],
);

/// What a push's first read was based on, for its commit to carry forward.
pub(super) struct ReadBase {
    state: KnownSpace,
    /// Whether the state came from memory (no statement read it).
    served: bool,
}

/// A push's read base while the push runs: given back as it was when the push ends without
/// a commit (nothing to write, refused, failed before its commit), so the next push knows it.
pub(super) struct HeldBase {
    known: Arc<KnownSpaces>,
    space: SpaceId,
    base: Option<ReadBase>,
}

impl HeldBase {
    pub(super) fn new(known: Arc<KnownSpaces>, space: SpaceId) -> HeldBase {
        HeldBase {
            known,
            space,
            base: None,
        }
    }

    pub(super) fn hold(&mut self, base: Option<ReadBase>) {
        self.base = base;
    }

    /// The base, for the push's commit to carry forward.
    pub(super) fn take(&mut self) -> Option<ReadBase> {
        self.base.take()
    }
}

impl Drop for HeldBase {
    fn drop(&mut self) {
        if let Some(base) = self.base.take() {
            self.known.keep(&self.space, base.state);
        }
    }
}

impl std::fmt::Debug for KnownSpaces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnownSpaces")
            .field("counts", &self.counts())
            .finish_non_exhaustive()
    }
}

impl KnownSpaces {
    /// Known states within `max_bytes` (0: none kept, every push reads).
    pub(super) fn new(max_bytes: u64) -> KnownSpaces {
        KnownSpaces {
            max_bytes,
            kept: Mutex::new(Kept {
                states: LruCache::unbounded(),
                bytes: 0,
                shared: LruCache::unbounded(),
            }),
            served: AtomicU64::new(0),
            stale: AtomicU64::new(0),
        }
    }

    fn kept(&self) -> MutexGuard<'_, Kept> {
        // Each change under the lock leaves the maps and byte count consistent.
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes out what the instance knows of `space`, for the push about to run there: it comes
    /// back, moved on, with the push's commit (pushes to one space run one at a time).
    pub(super) fn take(&self, space: &SpaceId) -> Option<KnownSpace> {
        if self.max_bytes == 0 {
            return None;
        }
        let taken = self.kept().take(space)?;
        let checked = taken.state.checked_at?;
        (checked.elapsed() < KNOWN_FOR).then_some(taken.state)
    }

    /// The push's first read answered from `known`, when every group, client and key it asks
    /// for is in it; else `known` back.
    #[allow(clippy::result_large_err)] // moved, not copied: `known` comes back whole
    pub(super) fn answer(
        &self,
        known: KnownSpace,
        asked: Asked<'_>,
    ) -> Result<(ClientState, ReadBase), KnownSpace> {
        let Some(answer) = known.answer(asked) else {
            return Err(known);
        };
        self.served.fetch_add(1, Ordering::Relaxed);
        let base = ReadBase {
            state: known,
            served: true,
        };
        Ok((answer, base))
    }

    /// What a statement read for a push (`read_ahead`: the keys it asked for), added to what
    /// was `kept` of the space, for the push's commit to carry forward.
    pub(super) fn learn(
        &self,
        kept: Option<KnownSpace>,
        read: &ClientState,
        read_ahead: &[String],
    ) -> Option<ReadBase> {
        if self.max_bytes == 0 {
            return None;
        }
        let mut state = kept.unwrap_or_default();
        state.absorb(read, read_ahead);
        Some(ReadBase {
            state,
            served: false,
        })
    }

    /// What a commit based on `base` will know, worked out before the commit takes `changes`.
    pub(super) fn after(base: ReadBase, changes: &PushChanges) -> (KnownSpace, bool) {
        let ReadBase { mut state, served } = base;
        state.apply(changes);
        (state, served)
    }

    /// Keeps a state (one a commit made, or one a push read and left as it was), unless a
    /// newer one is known or the space is shared; the least recently kept go while the states
    /// weigh more than the budget.
    pub(super) fn keep(&self, space: &SpaceId, state: KnownSpace) {
        let weight = state.weight();
        if self.max_bytes == 0 || weight > MAX_BYTES_PER_SPACE.min(self.max_bytes) {
            return;
        }
        let mut kept = self.kept();
        if kept.is_shared(space) {
            return;
        }
        if let Some(newer) = kept.states.peek(space)
            && newer.state.version > state.version
        {
            return;
        }
        kept.take(space);
        kept.bytes += weight;
        let entry = KeptState { state, weight };
        kept.states.push(space.clone(), entry);
        while kept.bytes > self.max_bytes {
            let Some((_, oldest)) = kept.states.pop_lru() else {
                break;
            };
            kept.bytes -= oldest.weight;
        }
    }

    /// After a commit that failed (`served`: based on a known state, which, on a conflict,
    /// another writer made stale): the space stays unknown, and a stale one is read for a while.
    pub(super) fn refused(&self, space: &SpaceId, served: bool, conflict: bool) {
        let mut kept = self.kept();
        kept.take(space);
        if served && conflict {
            self.stale.fetch_add(1, Ordering::Relaxed);
            kept.shared.push(space.clone(), Instant::now() + SHARED_FOR);
            if kept.shared.len() > MAX_SHARED_SPACES {
                kept.shared.pop_lru();
            }
        }
    }

    /// Forgets a space (a locked push reads it afresh).
    pub(super) fn forget(&self, space: &SpaceId) {
        self.kept().take(space);
    }

    /// Forgets every space (after garbage collection removed client groups).
    pub(super) fn forget_all(&self) {
        let mut kept = self.kept();
        kept.states.clear();
        kept.bytes = 0;
    }

    pub(super) fn counts(&self) -> KnownCounts {
        KnownCounts {
            served: self.served.load(Ordering::Relaxed),
            stale: self.stale.load(Ordering::Relaxed),
            bytes: self.kept().bytes,
        }
    }
}

impl Kept {
    fn take(&mut self, space: &SpaceId) -> Option<KeptState> {
        let taken = self.states.pop(space)?;
        self.bytes -= taken.weight;
        Some(taken)
    }

    /// Whether `space` is read before each push for now (a mark past its time goes).
    fn is_shared(&mut self, space: &SpaceId) -> bool {
        match self.shared.peek(space) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                self.shared.pop(space);
                false
            }
            None => false,
        }
    }
}

impl KnownSpace {
    /// Adds what a statement read: at a new version, clients and keys known before may have
    /// moved and are dropped; client groups are kept (a group's record never changes, and the
    /// commit checks that it still exists). Past the bounds, what was known before is dropped.
    fn absorb(&mut self, read: &ClientState, read_ahead: &[String]) {
        self.checked_at = Some(Instant::now());
        if read.space_version != self.version {
            self.version = read.space_version;
            self.clients.clear();
            self.entries.clear();
        }
        if self.groups.len() + self.clients.len() > MAX_IDS_PER_SPACE {
            self.groups.clear();
            self.clients.clear();
        }
        if self.entries.len() > MAX_KEYS_PER_SPACE {
            self.entries.clear();
        }
        for group in &read.groups {
            self.groups.insert(group.id.clone(), group.clone());
        }
        for client in &read.clients {
            self.clients.insert(client.id.clone(), client.clone());
        }
        for key in read_ahead {
            self.entries.insert(key.clone(), None);
        }
        self.entries.extend(read.entries.iter().cloned());
    }

    /// The read asked for, when everything in it is known, or is a group that may be new (see
    /// [`MaybeNewGroup`]) of which nothing is known, nor of its clients: such a group and its
    /// clients are answered absent (its pushes commit, and the commit refuses to create a group
    /// that exists or was collected, or to move another group's client).
    fn answer(&self, asked: Asked<'_>) -> Option<ClientState> {
        let (group_ids, client_ids, read_ahead, maybe_new) = asked;
        let mut new_clients: HashSet<&str> = HashSet::new();
        for group in maybe_new
            .iter()
            .filter(|g| !self.groups.contains_key(&g.id))
        {
            if group
                .client_ids
                .iter()
                .any(|c| self.clients.contains_key(c))
            {
                return None;
            }
            new_clients.extend(group.client_ids.iter().map(String::as_str));
        }
        let is_new_group = |id: &String| maybe_new.iter().any(|g| &g.id == id);
        let mut groups = Vec::with_capacity(group_ids.len());
        for id in group_ids {
            match self.groups.get(id) {
                Some(group) => groups.push(group.clone()),
                None if is_new_group(id) => {}
                None => return None,
            }
        }
        let mut clients = Vec::with_capacity(client_ids.len());
        for id in client_ids {
            match self.clients.get(id) {
                Some(client) => clients.push(client.clone()),
                None if new_clients.contains(id.as_str()) => {}
                None => return None,
            }
        }
        let entries = read_ahead
            .iter()
            .map(|key| Some((key.clone(), self.entries.get(key)?.clone())));
        Some(ClientState {
            space_version: self.version,
            groups,
            collected_groups: Vec::new(),
            clients,
            entries: entries.collect::<Option<_>>()?,
        })
    }

    /// Moves the state over a commit: its version, new groups and clients, and the values it
    /// wrote (new keys up to [`MAX_KEYS_PER_SPACE`]; past it, a push reading them reads).
    fn apply(&mut self, changes: &PushChanges) {
        self.checked_at = Some(Instant::now()); // kept only once the commit succeeded
        self.version = changes.version;
        if self.groups.len() + self.clients.len() > MAX_IDS_PER_SPACE {
            self.groups.clear();
            self.clients.clear();
        }
        for group in &changes.new_client_groups {
            self.groups.insert(group.id.clone(), group.clone());
        }
        for write in &changes.clients {
            self.clients
                .insert(write.client.id.clone(), write.client.clone());
        }
        for entry in &changes.entries {
            if let Some(value) = self.entries.get_mut(&entry.key) {
                value.clone_from(&entry.value);
            } else if self.entries.len() < MAX_KEYS_PER_SPACE {
                self.entries.insert(entry.key.clone(), entry.value.clone());
            }
        }
    }

    /// Bytes the state holds, roughly.
    fn weight(&self) -> u64 {
        let groups: usize = self
            .groups
            .values()
            .map(|g| g.id.len() + g.user_id.len())
            .sum();
        let clients: usize = self.clients.values().map(|c| c.id.len() * 2).sum();
        let entries: usize = self
            .entries
            .iter()
            .map(|(key, value)| key.len() + value.as_ref().map_or(0, String::len))
            .sum();
        let records = self.groups.len() + self.clients.len() + self.entries.len();
        (SPACE_OVERHEAD + groups + clients + entries + records * RECORD_OVERHEAD) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ClientWrite, EntryWrite};

    fn known_from(read: &ClientState, read_ahead: &[String]) -> KnownSpace {
        let mut known = KnownSpace::default();
        known.absorb(read, read_ahead);
        known
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    fn read_at(version: u64) -> ClientState {
        ClientState {
            space_version: version,
            groups: vec![ClientGroupRecord {
                id: "g".into(),
                space_id: "s".into(),
                user_id: "u".into(),
            }],
            collected_groups: Vec::new(),
            clients: vec![client("c", 3)],
            entries: vec![("k".into(), Some("1".into()))],
        }
    }

    fn client(id: &str, last_mutation_id: u64) -> ClientRecord {
        ClientRecord {
            id: id.into(),
            client_group_id: "g".into(),
            last_mutation_id,
        }
    }

    #[test]
    fn a_read_is_answered_only_when_everything_it_asks_for_is_known() {
        let known = known_from(&read_at(7), &strings(&["k", "absent"]));
        let (g, c) = (strings(&["g"]), strings(&["c"]));
        let answer = known
            .answer((&g, &c, &strings(&["absent", "k"]), &[]))
            .expect("all known");
        assert_eq!(answer.space_version, 7);
        assert_eq!(answer.clients, vec![client("c", 3)]);
        assert_eq!(
            answer.entries,
            vec![("absent".into(), None), ("k".into(), Some("1".into()))]
        );
        assert!(
            known
                .answer((&strings(&["other"]), &[], &[], &[]))
                .is_none()
        );
        assert!(known.answer((&g, &strings(&["new"]), &[], &[])).is_none());
        assert!(
            known
                .answer((&g, &[], &strings(&["unread"]), &[]))
                .is_none()
        );
    }

    #[test]
    fn an_unknown_group_that_may_be_new_is_answered_absent_unless_a_client_is_known() {
        let known = known_from(&read_at(7), &[]);
        let maybe_new = |clients: &[&str]| MaybeNewGroup {
            id: "fresh".into(),
            client_ids: strings(clients),
        };
        let (groups, clients) = (strings(&["g", "fresh"]), strings(&["c", "n1", "n2"]));
        let fresh = [maybe_new(&["n1", "n2"])];
        let answer = known.answer((&groups, &clients, &[], &fresh)).expect("new");
        assert_eq!(answer.groups.len(), 1);
        assert_eq!(answer.clients, vec![client("c", 3)]);
        // A client of the maybe-new group that is known: the group is not new, read it.
        let claimed = [maybe_new(&["n1", "c"])];
        assert!(known.answer((&groups, &clients, &[], &claimed)).is_none());
        // An unknown client outside the maybe-new groups is read.
        assert!(
            known
                .answer((&groups, &clients, &[], &[maybe_new(&["n1"])]))
                .is_none()
        );
        // A known group is answered as known, whatever the push layer guessed.
        let guessed = [MaybeNewGroup {
            id: "g".into(),
            client_ids: strings(&["c"]),
        }];
        let answer = known.answer((&g_only(), &strings(&["c"]), &[], &guessed));
        assert_eq!(answer.expect("known").groups.len(), 1);
    }

    fn g_only() -> Vec<String> {
        strings(&["g"])
    }

    #[test]
    fn a_commit_moves_the_version_and_what_it_wrote() {
        let mut known = known_from(&read_at(7), &strings(&["k"]));
        known.apply(&PushChanges {
            version: 9,
            read_version: 7,
            clients: vec![ClientWrite {
                client: client("c", 5),
                version: 9,
            }],
            entries: vec![
                EntryWrite {
                    key: "k".into(),
                    value: None,
                    version: 9,
                },
                EntryWrite {
                    key: "new".into(),
                    value: Some("2".into()),
                    version: 8,
                },
            ],
            ..PushChanges::default()
        });
        let answer = known
            .answer((
                &strings(&["g"]),
                &strings(&["c"]),
                &strings(&["k", "new"]),
                &[],
            ))
            .unwrap();
        assert_eq!(answer.space_version, 9);
        assert_eq!(answer.clients, vec![client("c", 5)]);
        assert_eq!(
            answer.entries,
            vec![("k".into(), None), ("new".into(), Some("2".into()))]
        );
    }

    #[test]
    fn a_newer_read_keeps_only_the_groups_known_before() {
        let mut known = known_from(&read_at(7), &strings(&["k"]));
        known.clients.insert("old".into(), client("old", 1));
        let mut same = KnownSpace::clone(&known);
        same.absorb(&read_at(7), &[]);
        assert!(same.clients.contains_key("old") && same.entries.contains_key("k"));
        let newer = ClientState {
            space_version: 8,
            ..ClientState::default()
        };
        known.absorb(&newer, &[]);
        assert!(known.groups.contains_key("g"));
        assert!(known.clients.is_empty() && known.entries.is_empty());
    }

    #[test]
    fn a_state_past_its_bound_is_not_kept_and_stale_spaces_are_read() {
        let spaces = KnownSpaces::new(64 << 20);
        let space = SpaceId::parse("s").unwrap();
        let commit = |read: &ClientState| {
            let base = spaces.learn(spaces.take(&space), read, &[]).unwrap();
            let (state, served) = KnownSpaces::after(base, &PushChanges::default());
            spaces.keep(&space, state);
            served
        };
        let huge = ClientState {
            entries: vec![("k".into(), Some("x".repeat(2 << 20)))],
            ..ClientState::default()
        };
        assert!(!commit(&huge));
        assert!(spaces.take(&space).is_none(), "over 1 MiB");

        commit(&read_at(7));
        let known = spaces.take(&space).expect("known");
        assert!(
            spaces.take(&space).is_none(),
            "taken out while its push runs"
        );
        let (_, base) = spaces.answer(known, (&[], &[], &[], &[])).ok().unwrap();
        let (_, served) = KnownSpaces::after(base, &PushChanges::default());
        assert!(served);
        spaces.refused(&space, true, true);
        commit(&read_at(8));
        assert!(
            spaces.take(&space).is_none(),
            "read while another writer is about"
        );
        assert_eq!(
            spaces.counts(),
            KnownCounts {
                served: 1,
                stale: 1,
                bytes: 0
            }
        );
    }

    #[test]
    fn the_least_recently_kept_states_go_past_the_budget() {
        let state = |value: &str| {
            known_from(
                &ClientState {
                    entries: vec![("k".into(), Some(value.into()))],
                    ..ClientState::default()
                },
                &[],
            )
        };
        let weight = state(&"x".repeat(1000)).weight();
        let spaces = KnownSpaces::new(2 * weight + weight / 2);
        let names = ["a", "b", "c"].map(|name| SpaceId::parse(name).unwrap());
        for space in &names {
            spaces.keep(space, state(&"x".repeat(1000)));
        }
        assert_eq!(spaces.counts().bytes, 2 * weight);
        assert!(spaces.take(&names[0]).is_none(), "the oldest went");
        assert!(spaces.take(&names[1]).is_some() && spaces.take(&names[2]).is_some());
        assert_eq!(spaces.counts().bytes, 0);
        spaces.keep(&names[0], state("1"));
        spaces.forget_all();
        assert!(spaces.take(&names[0]).is_none());
    }
}
