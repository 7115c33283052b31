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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moka::ops::compute::Op;
use moka::sync::Cache;

use crate::protocol::SpaceId;
use crate::store::{ClientGroupRecord, ClientRecord, ClientState, KnownCounts, PushChanges};

/// How long a known state is trusted at most: a bound on memory held for a quiet space, and on
/// how long a group garbage collection removed in another process stays known (its pushes then
/// commit nothing only when they carry no new mutation; any commit checks the group).
const KNOWN_FOR: Duration = Duration::from_secs(60);

/// How long a space whose known state was stale is read before each push.
const SHARED_FOR: Duration = Duration::from_secs(10);

/// Most client groups and clients kept for one space: past it, only the last commit's are kept.
const MAX_IDS_PER_SPACE: usize = 1024;

/// Most keys kept for one space beyond those its last read asked for.
const MAX_KEYS_PER_SPACE: usize = 256;

/// Most bytes one space's known state may hold; a larger one is not kept.
const MAX_BYTES_PER_SPACE: u32 = 1 << 20;

/// Bytes counted for each kept record besides its text.
const RECORD_OVERHEAD: usize = 64;

/// The known states of the spaces this instance pushed to lately, within a byte budget.
pub(crate) struct KnownSpaces {
    states: Option<Cache<SpaceId, Arc<KnownSpace>>>,
    /// Spaces another writer moved under a known state lately.
    shared: Cache<SpaceId, ()>,
    served: AtomicU64,
    stale: AtomicU64,
}

/// One space's push state at `version`, as replisync last read or committed it.
#[derive(Debug, Clone, Default)]
pub(super) struct KnownSpace {
    version: u64,
    groups: HashMap<String, ClientGroupRecord>,
    clients: HashMap<String, ClientRecord>,
    /// Keys read ahead, each with its value (`None`: absent or deleted).
    entries: HashMap<String, Option<String>>,
}

/// What a push's first read was based on, for its commit to carry forward.
pub(super) struct ReadBase {
    state: KnownSpace,
    /// Whether the state came from memory (no statement read it).
    served: bool,
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
        let states = (max_bytes > 0).then(|| {
            Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_space: &SpaceId, state: &Arc<KnownSpace>| state.weight())
                .time_to_live(KNOWN_FOR)
                .build()
        });
        KnownSpaces {
            states,
            shared: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(SHARED_FOR)
                .build(),
            served: AtomicU64::new(0),
            stale: AtomicU64::new(0),
        }
    }

    /// The push's first read answered from memory, when every group, client and key it asks
    /// for is known.
    pub(super) fn answer(
        &self,
        space: &SpaceId,
        group_ids: &[String],
        client_ids: &[String],
        read_ahead: &[String],
    ) -> Option<(ClientState, ReadBase)> {
        let known = self.states.as_ref()?.get(space)?;
        let answer = known.answer(group_ids, client_ids, read_ahead)?;
        self.served.fetch_add(1, Ordering::Relaxed);
        let base = ReadBase {
            state: KnownSpace::clone(&known),
            served: true,
        };
        Some((answer, base))
    }

    /// Learns what a statement read for a push (`read_ahead`: the keys it asked for).
    pub(super) fn learn(
        &self,
        space: &SpaceId,
        read: &ClientState,
        read_ahead: &[String],
    ) -> Option<ReadBase> {
        let states = self.states.as_ref()?;
        let mut state = KnownSpace::from_read(read, read_ahead);
        if let Some(kept) = states.get(space) {
            state.keep_what_still_holds(&kept);
        }
        if !self.shared.contains_key(space) {
            states.insert(space.clone(), Arc::new(state.clone()));
        }
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

    /// Keeps the state a commit made, unless a newer one is known.
    pub(super) fn committed(&self, space: &SpaceId, state: KnownSpace) {
        let Some(states) = &self.states else { return };
        if self.shared.contains_key(space) {
            return;
        }
        let version = state.version;
        states
            .entry(space.clone())
            .and_compute_with(|kept| match kept {
                Some(kept) if kept.value().version > version => Op::Nop,
                _ => Op::Put(Arc::new(state)),
            });
    }

    /// Forgets a space after a commit that failed (`served`: based on a known state, which,
    /// on a conflict, another writer made stale).
    pub(super) fn refused(&self, space: &SpaceId, served: bool, conflict: bool) {
        self.forget(space);
        if served && conflict {
            self.stale.fetch_add(1, Ordering::Relaxed);
            self.shared.insert(space.clone(), ());
        }
    }

    /// Forgets a space (a locked push reads it afresh).
    pub(super) fn forget(&self, space: &SpaceId) {
        if let Some(states) = &self.states {
            states.invalidate(space);
        }
    }

    /// Forgets every space (after garbage collection removed client groups).
    pub(super) fn forget_all(&self) {
        if let Some(states) = &self.states {
            states.invalidate_all();
        }
    }

    pub(super) fn counts(&self) -> KnownCounts {
        KnownCounts {
            served: self.served.load(Ordering::Relaxed),
            stale: self.stale.load(Ordering::Relaxed),
            bytes: self.states.as_ref().map_or(0, |states| {
                states.run_pending_tasks(); // the weights of recent inserts
                states.weighted_size()
            }),
        }
    }
}

impl KnownSpace {
    fn from_read(read: &ClientState, read_ahead: &[String]) -> KnownSpace {
        let mut entries: HashMap<String, Option<String>> =
            read_ahead.iter().map(|key| (key.clone(), None)).collect();
        entries.extend(read.entries.iter().cloned());
        KnownSpace {
            version: read.space_version,
            groups: read
                .groups
                .iter()
                .map(|g| (g.id.clone(), g.clone()))
                .collect(),
            clients: read
                .clients
                .iter()
                .map(|c| (c.id.clone(), c.clone()))
                .collect(),
            entries,
        }
    }

    /// Adds what `kept` knew that still holds at this state's version: its client groups (a
    /// group's record never changes; the commit checks that it still exists) and, when it is
    /// of the same version, its clients and keys.
    fn keep_what_still_holds(&mut self, kept: &KnownSpace) {
        if self.groups.len() + kept.groups.len() > MAX_IDS_PER_SPACE {
            return;
        }
        for (id, group) in &kept.groups {
            self.groups
                .entry(id.clone())
                .or_insert_with(|| group.clone());
        }
        if kept.version != self.version
            || self.clients.len() + kept.clients.len() > MAX_IDS_PER_SPACE
        {
            return;
        }
        for (id, client) in &kept.clients {
            self.clients
                .entry(id.clone())
                .or_insert_with(|| client.clone());
        }
        for (key, value) in &kept.entries {
            if self.entries.len() >= MAX_KEYS_PER_SPACE {
                break;
            }
            self.entries
                .entry(key.clone())
                .or_insert_with(|| value.clone());
        }
    }

    /// The read asked for, when everything in it is known.
    fn answer(
        &self,
        group_ids: &[String],
        client_ids: &[String],
        read_ahead: &[String],
    ) -> Option<ClientState> {
        let groups = group_ids.iter().map(|id| self.groups.get(id).cloned());
        let clients = client_ids.iter().map(|id| self.clients.get(id).cloned());
        let entries = read_ahead
            .iter()
            .map(|key| Some((key.clone(), self.entries.get(key)?.clone())));
        Some(ClientState {
            space_version: self.version,
            groups: groups.collect::<Option<_>>()?,
            collected_groups: Vec::new(),
            clients: clients.collect::<Option<_>>()?,
            entries: entries.collect::<Option<_>>()?,
        })
    }

    /// Moves the state over a commit: its version, new groups and clients, and the values it
    /// wrote (new keys up to [`MAX_KEYS_PER_SPACE`]; past it, a push reading them reads).
    fn apply(&mut self, changes: &PushChanges) {
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

    /// Bytes the state holds, roughly; past [`MAX_BYTES_PER_SPACE`] it outweighs any budget.
    fn weight(&self) -> u32 {
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
        let bytes = groups + clients + entries + records * RECORD_OVERHEAD;
        u32::try_from(bytes).map_or(
            u32::MAX,
            |b| if b > MAX_BYTES_PER_SPACE { u32::MAX } else { b },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ClientWrite, EntryWrite};

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
        let known = KnownSpace::from_read(&read_at(7), &strings(&["k", "absent"]));
        let answer = known
            .answer(
                &strings(&["g"]),
                &strings(&["c"]),
                &strings(&["absent", "k"]),
            )
            .expect("all known");
        assert_eq!(answer.space_version, 7);
        assert_eq!(answer.clients, vec![client("c", 3)]);
        assert_eq!(
            answer.entries,
            vec![("absent".into(), None), ("k".into(), Some("1".into()))]
        );
        assert!(known.answer(&strings(&["other"]), &[], &[]).is_none());
        assert!(
            known
                .answer(&strings(&["g"]), &strings(&["new"]), &[])
                .is_none()
        );
        assert!(
            known
                .answer(&strings(&["g"]), &[], &strings(&["unread"]))
                .is_none()
        );
    }

    #[test]
    fn a_commit_moves_the_version_and_what_it_wrote() {
        let mut known = KnownSpace::from_read(&read_at(7), &strings(&["k"]));
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
            .answer(&strings(&["g"]), &strings(&["c"]), &strings(&["k", "new"]))
            .unwrap();
        assert_eq!(answer.space_version, 9);
        assert_eq!(answer.clients, vec![client("c", 5)]);
        assert_eq!(
            answer.entries,
            vec![("k".into(), None), ("new".into(), Some("2".into()))]
        );
    }

    #[test]
    fn a_newer_read_keeps_only_the_groups_an_older_state_knew() {
        let mut older = KnownSpace::from_read(&read_at(7), &strings(&["k"]));
        older.clients.insert("old".into(), client("old", 1));
        let mut newer = KnownSpace::from_read(
            &ClientState {
                space_version: 8,
                ..ClientState::default()
            },
            &[],
        );
        newer.keep_what_still_holds(&older);
        assert!(newer.groups.contains_key("g"));
        assert!(newer.clients.is_empty() && newer.entries.is_empty());
        let mut same = KnownSpace::from_read(&read_at(7), &[]);
        same.keep_what_still_holds(&older);
        assert!(same.clients.contains_key("old") && same.entries.contains_key("k"));
    }

    #[test]
    fn a_state_past_its_bound_is_not_kept_and_stale_spaces_are_read() {
        let huge = ClientState {
            entries: vec![("k".into(), Some("x".repeat(2 << 20)))],
            ..ClientState::default()
        };
        let spaces = KnownSpaces::new(64 << 20);
        let space = SpaceId::parse("s").unwrap();
        assert!(spaces.learn(&space, &huge, &[]).is_some());
        spaces.counts();
        assert!(spaces.answer(&space, &[], &[], &[]).is_none(), "over 1 MiB");

        spaces.learn(&space, &read_at(7), &[]);
        let (_, base) = spaces.answer(&space, &[], &[], &[]).expect("known");
        let (state, served) = KnownSpaces::after(base, &PushChanges::default());
        assert!(served);
        drop(state);
        spaces.refused(&space, true, true);
        assert!(spaces.answer(&space, &[], &[], &[]).is_none());
        spaces.learn(&space, &read_at(8), &[]);
        assert!(
            spaces.answer(&space, &[], &[], &[]).is_none(),
            "read while shared"
        );
        assert_eq!(spaces.counts().stale, 1);
    }
}
