//! Identical concurrent pulls share one database read. After a poke, every watcher of a space
//! pulls with the same cookie at once; pulls that arrive while a read for their (space, cookie)
//! is in flight are answered together by the next read, so a storm costs a few reads, not one each.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::metrics::{Gauge, Metrics};
use crate::protocol::SpaceId;
use crate::rules::KeySet;
use crate::store::{ClientGroupRecord, EntryChange, PullChanges, Store, StoreError, reconnecting};

use super::patch::write_patch_op;

/// Most client groups answered by one read (bounds the query's parameter array).
const MAX_GROUPS_PER_READ: usize = 1000;

/// One read's answer, shared by every pull of the batch.
#[derive(Debug)]
pub struct SharedPull {
    pub version: u64,
    /// Cookies below this may miss compacted deletions: they get the whole space instead.
    pub compacted_version: u64,
    client_groups: HashMap<String, ClientGroupRecord>,
    collected_client_groups: HashSet<String>,
    changed_clients: HashMap<String, Vec<(String, u64)>>,
    /// The patch's operations; `None` when the delta was too large to build in memory (each
    /// pull streams it instead).
    patch: Option<SharedPatch>,
}

/// A delta's operations, already JSON, comma-separated, without brackets, with where each
/// starts and its key, so that a caller under rules gets only the operations on keys it may
/// read. Callers with equal read sets share one filtered copy; others never share it.
#[derive(Debug)]
struct SharedPatch {
    whole: Bytes,
    /// Each operation's key and the byte range of its JSON in `whole`.
    ops: Vec<(Box<str>, Range<usize>)>,
    filtered: Mutex<HashMap<KeySet, Bytes>>,
}

impl SharedPatch {
    fn new(entries: &[EntryChange]) -> SharedPatch {
        let mut whole = Vec::new();
        let mut ops = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            if index > 0 {
                whole.push(b',');
            }
            let start = whole.len();
            write_patch_op(&mut whole, entry);
            ops.push((entry.key.as_str().into(), start..whole.len()));
        }
        SharedPatch {
            whole: Bytes::from(whole),
            ops,
            filtered: Mutex::new(HashMap::new()),
        }
    }

    /// The operations on keys `readable` allows: the whole patch for every key, else a copy
    /// made once per distinct read set.
    fn for_reader(&self, readable: &KeySet) -> Bytes {
        if readable.is_all() {
            return self.whole.clone();
        }
        let mut filtered = self.filtered.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(patch) = filtered.get(readable) {
            return patch.clone();
        }
        let mut patch = Vec::new();
        for (key, range) in &self.ops {
            if readable.allows(key) {
                if !patch.is_empty() {
                    patch.push(b',');
                }
                patch.extend_from_slice(&self.whole[range.clone()]);
            }
        }
        let patch = Bytes::from(patch);
        filtered.insert(readable.clone(), patch.clone());
        patch
    }
}

impl SharedPull {
    fn new(changes: PullChanges) -> SharedPull {
        let patch = changes.entries.as_deref().map(SharedPatch::new);
        let mut changed_clients: HashMap<String, Vec<(String, u64)>> = HashMap::new();
        for (group, client, last_mutation_id) in changes.changed_clients {
            changed_clients
                .entry(group)
                .or_default()
                .push((client, last_mutation_id));
        }
        SharedPull {
            version: changes.version,
            compacted_version: changes.compacted_version,
            client_groups: changes
                .client_groups
                .into_iter()
                .map(|g| (g.id.clone(), g))
                .collect(),
            collected_client_groups: changes.collected_client_groups.into_iter().collect(),
            changed_clients,
            patch,
        }
    }

    /// The patch's operations a caller that may read `readable` receives; `None` when the delta
    /// was too large to share (the pull streams it).
    pub fn patch_for(&self, readable: &KeySet) -> Option<Bytes> {
        self.patch.as_ref().map(|patch| patch.for_reader(readable))
    }

    pub fn client_group(&self, id: &str) -> Option<&ClientGroupRecord> {
        self.client_groups.get(id)
    }

    /// Whether garbage collection removed this client group.
    pub fn client_group_collected(&self, id: &str) -> bool {
        self.collected_client_groups.contains(id)
    }

    pub fn changed_clients(&self, client_group_id: &str) -> &[(String, u64)] {
        self.changed_clients
            .get(client_group_id)
            .map_or(&[], Vec::as_slice)
    }
}

type Reply = oneshot::Sender<Result<Arc<SharedPull>, StoreError>>;
type BatchKey = (SpaceId, u64);

pub struct PullCoalescer {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// Largest delta built in memory and shared; a larger one is streamed to each pull.
    max_shared_delta_bytes: usize,
    /// Pulls waiting for the next read, per (space, cookie). A key is present exactly while a
    /// reader task for it runs.
    waiting: Waiting,
}

impl std::fmt::Debug for PullCoalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullCoalescer")
            .field("metrics", &self.metrics)
            .field("max_shared_delta_bytes", &self.max_shared_delta_bytes)
            .field("waiting", &self.waiting)
            .finish_non_exhaustive()
    }
}

impl PullCoalescer {
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        max_shared_delta_bytes: usize,
    ) -> Self {
        PullCoalescer {
            store,
            metrics,
            max_shared_delta_bytes,
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// What an incremental pull of `client_group_id` from cookie `from` needs.
    pub async fn pull(
        self: &Arc<Self>,
        space: &SpaceId,
        client_group_id: &str,
        from: u64,
    ) -> Result<Arc<SharedPull>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let key = (space.clone(), from);
        let start_reader = {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let start = match waiting.entry(key.clone()) {
                Entry::Occupied(mut batch) => {
                    batch.get_mut().push((client_group_id.to_owned(), reply));
                    false
                }
                Entry::Vacant(slot) => {
                    slot.insert(vec![(client_group_id.to_owned(), reply)]);
                    true
                }
            };
            // Counted under the lock, so the reader cannot take the pull out first.
            self.metrics.pulls_waiting.add(1);
            start
        };
        if start_reader {
            // A task of its own, so a client that hangs up cannot strand the others.
            tokio::spawn(self.clone().read_batches(key));
        }
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the pull's read was abandoned".into()))?
    }

    /// Answers waiting pulls of `key`, one read per batch, until none wait.
    async fn read_batches(self: Arc<Self>, key: BatchKey) {
        let mut reader = ReaderGuard {
            waiting: &self.waiting,
            pulls_waiting: &self.metrics.pulls_waiting,
            key: &key,
            finished: false,
        };
        loop {
            let batch = {
                let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                let Some(queue) = waiting.get_mut(&key) else {
                    reader.finished = true;
                    return;
                };
                if queue.is_empty() {
                    waiting.remove(&key);
                    reader.finished = true;
                    return;
                }
                let take = queue.len().min(MAX_GROUPS_PER_READ);
                self.metrics.pulls_waiting.sub(take as u64);
                queue.drain(..take).collect::<Vec<_>>()
            };
            let groups: Vec<String> = batch
                .iter()
                .map(|(group, _)| group.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            self.metrics.pull_reads.increment();
            let result = reconnecting(|| {
                self.store
                    .pull_changes(&key.0, &groups, key.1, self.max_shared_delta_bytes)
            })
            .await
            .map(|changes| Arc::new(SharedPull::new(changes)));
            for (_, reply) in batch {
                let _ = reply.send(result.clone());
            }
        }
    }
}

type Waiting = Mutex<HashMap<BatchKey, Vec<(String, Reply)>>>;

/// Held by a key's reader task. If the task ends any other way than by emptying its queue (a
/// panic), the key leaves the map, so the next pull starts a new reader, and the pulls that
/// waited are answered with an error as their replies drop, instead of waiting for ever.
struct ReaderGuard<'a> {
    waiting: &'a Waiting,
    /// The count of waiting pulls, which the orphaned ones leave.
    pulls_waiting: &'a Gauge,
    key: &'a BatchKey,
    finished: bool,
}

impl Drop for ReaderGuard<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let orphaned = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(self.key);
        let orphaned = orphaned.map_or(0, |batch| batch.len());
        self.pulls_waiting.sub(orphaned as u64);
        tracing::error!(
            space = self.key.0.as_str(),
            pulls = orphaned,
            "pull reader failed; its waiting pulls are answered with an error"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_reader_frees_its_key_and_answers_its_waiters() {
        let waiting: Arc<Waiting> = Arc::default();
        let key: BatchKey = (SpaceId::parse("s").unwrap(), 7);
        let (reply, answer) = oneshot::channel();
        waiting
            .lock()
            .unwrap()
            .insert(key.clone(), vec![("g".to_owned(), reply)]);
        let counted = Arc::new(Gauge::default());
        counted.add(1);
        let reader = {
            let (waiting, key, pulls_waiting) = (waiting.clone(), key.clone(), counted.clone());
            tokio::spawn(async move {
                let _guard = ReaderGuard {
                    waiting: &waiting,
                    pulls_waiting: &pulls_waiting,
                    key: &key,
                    finished: false,
                };
                panic!("the store panicked");
            })
        };
        assert!(reader.await.unwrap_err().is_panic());
        assert_eq!(
            counted.get(),
            0,
            "the orphaned pull no longer counts as waiting"
        );
        assert!(answer.await.is_err(), "the waiting pull is answered");
        assert!(waiting.lock().unwrap().is_empty(), "the key is free again");
    }

    #[tokio::test]
    async fn a_finished_reader_leaves_the_map_alone() {
        let waiting: Waiting = Mutex::default();
        let key: BatchKey = (SpaceId::parse("s").unwrap(), 7);
        let (reply, _answer) = oneshot::channel();
        waiting
            .lock()
            .unwrap()
            .insert(key.clone(), vec![("g".to_owned(), reply)]);
        drop(ReaderGuard {
            waiting: &waiting,
            pulls_waiting: &Gauge::default(),
            key: &key,
            finished: true,
        });
        assert_eq!(waiting.lock().unwrap()[&key].len(), 1);
    }
}
