//! What a mutator sees of one push: `WriteTx` reads through the push's open transaction, sees
//! the writes of earlier mutations in the push and its own, and buffers its writes.
//!
//! A mutator reads and writes through a [`WriteTx`]. Its writes stay in memory until the
//! mutator returns: an `Err` discards them (the mutation still counts as processed, as the
//! Replicache protocol requires), an `Ok` keeps them for the push's single commit.
//!
//! What one push's mutators put (keys and values, in bytes) is bounded, and so are the keys
//! they may write (the caller's write rules): the mutation that crosses either fails, even if
//! it caught the error its write gave, and nothing it wrote is kept.

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use async_trait::async_trait;
use serde_json::Value;

use super::error::MutationError;
use super::writes::MutationWrites;
use crate::protocol::{SpaceId, check_key};
use crate::rules::KeySet;
use crate::store::{EntryWrite, PushTx, StoreError};

/// A named server-side mutation. Register your own with `Mutators::register`.
///
/// ```
/// use replisync::mutators::{MutationError, Mutator, Mutators, WriteTx};
/// use serde_json::Value;
///
/// struct Rename;
///
/// #[async_trait::async_trait]
/// impl Mutator for Rename {
///     async fn apply(&self, tx: &mut WriteTx<'_>, args: &Value) -> Result<(), MutationError> {
///         let title = args["title"]
///             .as_str()
///             .ok_or_else(|| MutationError::InvalidArgs("`title` must be a string".into()))?;
///         tx.put("title", Value::from(title))
///     }
/// }
///
/// let mutators = Mutators::builtin().register("rename", Rename);
/// assert!(mutators.get("rename").is_some());
/// ```
#[async_trait]
pub trait Mutator: Send + Sync + 'static {
    async fn apply(&self, tx: &mut WriteTx<'_>, args: &Value) -> Result<(), MutationError>;

    /// What kind of mutator this is, as `/metrics` counts its failures: `rust` (yours),
    /// `builtin` or `javascript`.
    fn kind(&self) -> &'static str {
        "rust"
    }
}

/// The state of one push group's data: what it read from the store and what its pushes'
/// successful mutations wrote. Values are parsed JSON; `None` means absent or deleted.
pub struct PushOverlay {
    known: HashMap<String, Option<Value>>,
    /// The keys written, each with the version of the last push that wrote it.
    written: BTreeMap<String, u64>,
    /// The version the push being applied writes at.
    version: u64,
    /// Bytes (keys and values) the kept mutations of the push being applied put, and of every
    /// push of the group.
    push_bytes_put: usize,
    group_bytes_put: usize,
    /// Most bytes the push being applied may put.
    max_push_write_bytes: usize,
    /// What mutators keep for the rest of the push (see [`WriteTx::push_scoped`]).
    scoped: HashMap<TypeId, Box<dyn Any + Send>>,
}

/// Counts what the push read and wrote, never the app's data.
impl std::fmt::Debug for PushOverlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushOverlay")
            .field("version", &self.version)
            .field("keys_known", &self.known.len())
            .field("keys_written", &self.written.len())
            .field("push_bytes_put", &self.push_bytes_put)
            .finish_non_exhaustive()
    }
}

impl Default for PushOverlay {
    fn default() -> Self {
        PushOverlay {
            known: HashMap::new(),
            written: BTreeMap::new(),
            version: 0,
            push_bytes_put: 0,
            group_bytes_put: 0,
            max_push_write_bytes: usize::MAX,
            scoped: HashMap::new(),
        }
    }
}

impl PushOverlay {
    /// Starts the next push of a group, which writes at `version` and may put
    /// `max_write_bytes` of keys and values: it sees the data as the pushes before it left it,
    /// but none of their push-scoped state.
    pub(crate) fn start_push(&mut self, version: u64, max_write_bytes: usize) {
        self.scoped.clear();
        self.version = version;
        self.push_bytes_put = 0;
        self.max_push_write_bytes = max_write_bytes;
    }

    /// Takes the stored values of keys read ahead (`None`: absent) as known, so that mutations
    /// reading them find them here. A value that does not parse is left out: the mutation
    /// that reads it reads it again, and fails as it would have.
    pub(crate) fn know_stored(&mut self, entries: Vec<(String, Option<String>)>) {
        for (key, text) in entries {
            let value = match text {
                Some(text) => match parse_stored(&key, &text) {
                    Ok(value) => Some(value),
                    Err(_) => continue,
                },
                None => None,
            };
            self.known.entry(key).or_insert(value);
        }
    }

    /// Bytes of keys and values the group's pushes put so far.
    pub(crate) fn group_bytes_put(&self) -> usize {
        self.group_bytes_put
    }

    /// The writes to commit, in key order, each at the version of the last push that wrote it.
    /// Push-scoped state is dropped here.
    pub fn into_changes(self) -> Vec<EntryWrite> {
        let PushOverlay {
            mut known, written, ..
        } = self;
        written
            .into_iter()
            .map(|(key, version)| {
                let value = known.remove(&key).flatten().map(|v| v.to_string());
                EntryWrite {
                    key,
                    value,
                    version,
                }
            })
            .collect()
    }
}

/// Which keys a scan reads: those starting with `prefix`, from `start` on (after it when
/// `exclusive`). Keys are ordered by their UTF-8 bytes, which is the order of their Unicode
/// code points, as Replicache's `scan` orders them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanRange {
    pub prefix: String,
    pub start: String,
    pub exclusive: bool,
}

impl ScanRange {
    /// The first key the scan may return: `start`, or `prefix` when `start` sorts before it.
    fn lower_bound(&self) -> Bound<&str> {
        if self.start.as_str() < self.prefix.as_str() {
            Bound::Included(&self.prefix)
        } else if self.exclusive {
            Bound::Excluded(&self.start)
        } else {
            Bound::Included(&self.start)
        }
    }
}

/// Most entries one store read of a scan asks for.
const SCAN_PAGE: usize = 256;

/// Who writes, as a mutation sees it: the space, the user, and the keys it may write.
#[derive(Debug, Clone, Copy)]
pub struct Writer<'a> {
    pub space: &'a SpaceId,
    pub user: &'a str,
    pub writable: &'a KeySet,
}

/// What a mutator sees: reads through to the store, writes buffered until it returns.
pub struct WriteTx<'a> {
    store: &'a mut dyn PushTx,
    overlay: &'a mut PushOverlay,
    /// This mutation's writes so far, and the keys the caller may write.
    writes: MutationWrites,
    writable: &'a KeySet,
    space: &'a SpaceId,
    user_id: &'a str,
    client_id: &'a str,
    mutation_id: u64,
    /// Whether this is the push's last mutation (nothing more runs in it after this one).
    last_of_push: bool,
    /// Keys this mutation read from the store (the first few), to learn read hints from.
    store_reads: Vec<String>,
}

/// Most keys a mutation's [`WriteTx::store_reads`] remembers.
const REMEMBERED_STORE_READS: usize = 4;

/// Names the mutation, never the app's data.
impl std::fmt::Debug for WriteTx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTx")
            .field("space", &self.space)
            .field("client_id", &self.client_id)
            .field("mutation_id", &self.mutation_id)
            .field("overlay", &self.overlay)
            .finish_non_exhaustive()
    }
}

impl<'a> WriteTx<'a> {
    pub(crate) fn new(
        store: &'a mut dyn PushTx,
        overlay: &'a mut PushOverlay,
        writer: Writer<'a>,
        client_id: &'a str,
        mutation_id: u64,
    ) -> Self {
        WriteTx {
            store,
            writes: MutationWrites::new(overlay.push_bytes_put, overlay.max_push_write_bytes),
            overlay,
            writable: writer.writable,
            space: writer.space,
            user_id: writer.user,
            client_id,
            mutation_id,
            last_of_push: false,
            store_reads: Vec::new(),
        }
    }

    /// The first keys this mutation read from the store (not from the push's writes or what it
    /// knew already).
    pub(crate) fn store_reads(&self) -> &[String] {
        &self.store_reads
    }

    pub fn space(&self) -> &SpaceId {
        self.space
    }

    /// The user the authenticator found for this request.
    pub fn user_id(&self) -> &str {
        self.user_id
    }

    /// The Replicache client that made the mutation.
    pub fn client_id(&self) -> &str {
        self.client_id
    }

    /// The mutation's id (per client, consecutive).
    pub fn mutation_id(&self) -> u64 {
        self.mutation_id
    }

    /// Marks this mutation as the push's last: a mutator may let go of what it kept for the
    /// push (its [`WriteTx::push_scoped`] state) as it returns.
    pub(crate) fn mark_last_of_push(&mut self) {
        self.last_of_push = true;
    }

    /// Whether this is the push's last mutation (see [`WriteTx::mark_last_of_push`]).
    pub fn is_last_of_push(&self) -> bool {
        self.last_of_push
    }

    /// State of type `T` kept from one mutation of this push to the next, created with
    /// `T::default()` on first use and dropped when the push's mutations are done (a push run
    /// again after a conflict starts with none).
    pub fn push_scoped<T: Default + Send + 'static>(&mut self) -> &mut T {
        self.overlay
            .scoped
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Box::new(T::default()))
            .downcast_mut::<T>()
            .expect("push-scoped state is stored under its own type id")
    }

    /// The value of `key` as this mutation sees it: its own writes, then earlier mutations'
    /// writes in the same push, then the database.
    pub async fn get(&mut self, key: &str) -> Result<Option<Value>, MutationError> {
        if let Some(value) = self.writes.get(key) {
            return Ok(value.cloned());
        }
        if let Some(value) = self.overlay.known.get(key) {
            return Ok(value.clone());
        }
        if check_key(key).is_err() {
            return Ok(None); // no store can hold it (and Postgres refuses a NUL in a query)
        }
        let stored = match self.store.entry(key).await? {
            Some(text) => Some(parse_stored(key, &text)?),
            None => None,
        };
        if self.store_reads.len() < REMEMBERED_STORE_READS {
            self.store_reads.push(key.to_owned());
        }
        self.overlay.known.insert(key.to_owned(), stored.clone());
        Ok(stored)
    }

    /// The value of `key` as this mutation sees it, when the push knows it without a read (read
    /// ahead, read or written by earlier mutations, or written by this one): `Some(None)` when it
    /// is known to be absent, `None` when only a read would tell.
    pub(crate) fn known(&self, key: &str) -> Option<Option<&Value>> {
        self.writes
            .get(key)
            .or_else(|| self.overlay.known.get(key).map(Option::as_ref))
    }

    /// Whether `key` holds a value, as this mutation sees it.
    pub async fn has(&mut self, key: &str) -> Result<bool, MutationError> {
        Ok(self.get(key).await?.is_some())
    }

    /// At most `limit` entries of `range`, in key order, as this mutation sees them: the
    /// database's, overwritten or hidden by this push's writes so far. Reads at most a few pages
    /// of the database however large the space; call again from the last key (exclusive) for
    /// more.
    pub async fn scan(
        &mut self,
        range: &ScanRange,
        limit: usize,
    ) -> Result<Vec<(String, Value)>, MutationError> {
        if range.start.contains('\0') {
            return Err(MutationError::InvalidArgs(
                "a scan's start key cannot hold a NUL character".into(),
            ));
        }
        if range.prefix.contains('\0') {
            return Ok(Vec::new()); // no key holds one
        }
        let in_prefix = |key: &str| key.starts_with(range.prefix.as_str());
        // This push's writes in the range: earlier mutations', then this one's over them.
        let mut pending: BTreeMap<&str, Option<&Value>> = BTreeMap::new();
        let bounds = (range.lower_bound(), Bound::Unbounded);
        for (key, _) in self.overlay.written.range::<str, _>(bounds) {
            if !in_prefix(key) {
                break;
            }
            pending.insert(key, self.overlay.known.get(key).and_then(Option::as_ref));
        }
        for (key, value) in self.writes.by_key.range::<str, _>(bounds) {
            if !in_prefix(key) {
                break;
            }
            pending.insert(key, value.as_ref());
        }
        let mut pending = pending.into_iter().peekable();

        let mut out = Vec::new();
        let mut stored: std::collections::VecDeque<(String, String)> = Default::default();
        let (mut cursor, mut cursor_exclusive) = match range.lower_bound() {
            Bound::Excluded(key) => (key.to_owned(), true),
            Bound::Included(key) => (key.to_owned(), false),
            Bound::Unbounded => (String::new(), false),
        };
        let mut store_done = false;
        while out.len() < limit {
            if stored.is_empty() && !store_done {
                let want = (limit - out.len()).clamp(1, SCAN_PAGE);
                let page = self
                    .store
                    .scan_entries(&cursor, cursor_exclusive, want)
                    .await?;
                store_done = page.len() < want;
                if let Some((last, _)) = page.last() {
                    cursor = last.clone();
                    cursor_exclusive = true;
                }
                for (key, value) in page {
                    if !in_prefix(&key) {
                        store_done = true;
                        break;
                    }
                    stored.push_back((key, value));
                }
            }
            let next_pending = pending.peek().map(|(key, _)| *key);
            let next_stored = stored.front().map(|(key, _)| key.as_str());
            match (next_pending, next_stored) {
                (None, None) => break,
                (Some(p), Some(s)) if s < p => {
                    let (key, text) = stored.pop_front().expect("peeked");
                    let value = parse_stored(&key, &text)?;
                    out.push((key, value));
                }
                (Some(p), s) => {
                    if s == Some(p) {
                        stored.pop_front(); // this push's write wins over the stored value
                    }
                    let (key, value) = pending.next().expect("peeked");
                    if let Some(value) = value {
                        out.push((key.to_owned(), value.clone()));
                    }
                }
                (None, Some(_)) => {
                    let (key, text) = stored.pop_front().expect("peeked");
                    let value = parse_stored(&key, &text)?;
                    out.push((key, value));
                }
            }
        }
        Ok(out)
    }

    /// Writes `value` at `key`. Fails (failing the mutation) for a key no store can hold, or
    /// past the push's write limit.
    pub fn put(&mut self, key: impl Into<String>, value: Value) -> Result<(), MutationError> {
        let bytes = json_len(&value);
        self.writes.put(self.writable, key.into(), value, bytes)
    }

    /// Deletes `key`. Fails (failing the mutation) for a key no store can hold, or past the
    /// push's write limit.
    pub fn del(&mut self, key: impl Into<String>) -> Result<(), MutationError> {
        self.writes.del(self.writable, key.into())
    }

    /// Lends this mutation's writes to whoever makes them elsewhere (a JavaScript engine),
    /// with the keys the caller may write: until [`WriteTx::give_back_writes`], reads see none
    /// of them.
    pub(crate) fn lend_writes(&mut self) -> (MutationWrites, KeySet) {
        (self.take_writes(), self.writable.clone())
    }

    /// Takes this mutation's writes (reads see none of them until they are given back).
    pub(crate) fn take_writes(&mut self) -> MutationWrites {
        let none = self.writes.none_yet();
        std::mem::replace(&mut self.writes, none)
    }

    /// Takes back the writes lent by [`WriteTx::lend_writes`], with what was written since.
    pub(crate) fn give_back_writes(&mut self, writes: MutationWrites) {
        self.writes = writes;
    }

    /// The mutator's `result`, unless a write of its went past the push's limit or to a key
    /// the caller may not write: then the mutation fails, even if the mutator caught that
    /// write's error.
    pub(crate) fn within_write_limits(
        &self,
        result: Result<(), MutationError>,
    ) -> Result<(), MutationError> {
        self.writes.within_limits(result)
    }

    /// Runs the next mutation, `id`, of an all-or-nothing push in this same `WriteTx`: it sees
    /// the writes of the ones before it, and they are kept (or discarded) together.
    pub(crate) fn start_mutation(&mut self, id: u64) {
        self.mutation_id = id;
    }

    /// Keeps this mutation's writes for the push's commit.
    pub(crate) fn keep_writes(self) {
        self.overlay.push_bytes_put += self.writes.bytes;
        self.overlay.group_bytes_put += self.writes.bytes;
        for (key, value) in self.writes.by_key {
            self.overlay
                .written
                .insert(key.clone(), self.overlay.version);
            self.overlay.known.insert(key, value);
        }
    }
}

/// The length of `value`'s JSON text, without writing it anywhere.
fn json_len(value: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

fn parse_stored(key: &str, text: &str) -> Result<Value, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("value of {key:?} is not JSON: {e}")))
}
