//! One push group in one transaction: the per-space algorithm of the Replicache docs, applied
//! push after push to the same data, each push with its own outcome, and one commit.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tracing::Instrument;

mod all_or_nothing;

use super::locking::Locking;
use super::{ApplyMode, Push, PushBudget, PushError, PushOutcome};
use crate::auth::{AuthError, check_group_ownership};
use crate::metrics::Timing;
use crate::mutators::{MutationError, Mutators, PushOverlay, WriteTx, Writer};
use crate::poke::sinks::Pokes;
use crate::protocol::{Mutation, PushRequest, SpaceId};
use crate::store::{
    ClientGroupRecord, ClientRecord, ClientWrite, MaybeNewGroup, PushChanges, PushTx, Store,
    StoreError, unix_now,
};

/// What applying a group did to each of its pushes, in order: its answer, or `None` for a push
/// left for the next group (the group reached its age limit before it).
pub(super) type GroupAnswers = Vec<Option<Result<PushOutcome, PushError>>>;

/// Applies `pushes` (to `space`, in order) in one transaction and commits once. Each push that
/// changes something moves the space one version on, as if it had committed alone: cookies
/// count pushes as before, and a pull sees the whole group or none of it. Each push sees the
/// writes of those before it and gets its own answer: a push refused (ClientStateNotFound, 403)
/// writes nothing and changes nothing for the others (`others_waiting`: whether pushes wait
/// for the space's next group). No push after the first starts once the
/// group has applied pushes for `max_age`, or once its pushes have put as much as one push may
/// (REPLISYNC_MAX_PUSH_WRITE_BYTES): a group holds at most about twice that in memory. Its
/// pushes start no mutation past `max_age` either (the first only while others wait; they commit
/// what they applied, as a push past its budget does): a group commits within `max_age` and the
/// longest single mutation. A database error fails the whole group, with nothing written.
pub(super) async fn apply_group(
    store: &dyn Store,
    mutators: &Mutators,
    after_commit: AfterCommit<'_>,
    space: &SpaceId,
    pushes: &[Push],
    locking: Locking,
    limit: AgeLimit<'_>,
) -> Result<GroupAnswers, StoreError> {
    let AfterCommit { pokes, commit_time } = after_commit;
    let mut tx = locking.begin(store, space).await?;
    let mut group = GroupState::read(&mut *tx, pushes, mutators).await?;
    let started = Instant::now();
    let mut answers: GroupAnswers = Vec::with_capacity(pushes.len());
    for (index, push) in pushes.iter().enumerate() {
        let age = GroupAge {
            deadline: started + limit.max_age,
            first: index == 0,
            others_waiting: limit.others_waiting,
        };
        let group_full = group.overlay.group_bytes_put() >= push.budget.max_write_bytes;
        if index > 0 && (age.passed() || group_full) {
            answers.resize_with(pushes.len(), || None);
            break;
        }
        let answer = apply_push(&mut *tx, &mut group, mutators, space, push, &age).await?;
        answers.push(Some(answer));
    }
    let Some(changes) = group.into_changes() else {
        return Ok(answers); // nothing to write; dropping the transaction rolls it back
    };
    let poke = PokeAfterCommit::armed(pokes, space);
    let commit_span = tracing::debug_span!("push.commit", pushes = pushes.len() as i64);
    let commit_started = Instant::now();
    let committed = tx.commit(changes).instrument(commit_span).await;
    let committed_at = Instant::now();
    commit_time.observe(committed_at - commit_started);
    poke.settle(&committed);
    committed?;
    for answer in answers.iter_mut().flatten() {
        if let Ok(PushOutcome::Committed {
            committed_at: at, ..
        }) = answer
        {
            *at = committed_at;
        }
    }
    Ok(answers)
}

/// What a group's commit tells: the space's watchers, and the commit timing in `/metrics`.
#[derive(Clone, Copy)]
pub(super) struct AfterCommit<'a> {
    pub pokes: &'a Pokes,
    pub commit_time: &'a Timing,
}

/// Pokes a space's watchers once its group's commit may have happened: when it succeeded, when
/// its outcome is unknown (the connection died before the answer), and when the push was dropped
/// while it waited for the answer (its caller left, or timed out). Whoever waits for the answer,
/// every commit is poked; a spurious poke costs one pull.
struct PokeAfterCommit<'a> {
    pokes: &'a Pokes,
    space: &'a SpaceId,
    armed: bool,
}

impl<'a> PokeAfterCommit<'a> {
    fn armed(pokes: &'a Pokes, space: &'a SpaceId) -> Self {
        PokeAfterCommit {
            pokes,
            space,
            armed: true,
        }
    }

    /// Pokes now, unless the commit failed in a way that certainly wrote nothing.
    fn settle(mut self, committed: &Result<(), StoreError>) {
        self.armed = match committed {
            Ok(()) | Err(StoreError::Disconnected(_)) => true,
            Err(_) => false,
        };
    }
}

impl Drop for PokeAfterCommit<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pokes.space_changed(self.space, Instant::now());
        }
    }
}

/// What the group knows and has done so far: the stored state read at its start, updated by
/// each push it applied, and the writes of all of them.
struct GroupState {
    read_version: u64,
    groups: HashMap<String, ClientGroupRecord>,
    collected_groups: HashSet<String>,
    /// Stored clients, and those the group's pushes created or advanced.
    clients: HashMap<String, ClientRecord>,
    new_groups: Vec<ClientGroupRecord>,
    active_groups: HashSet<String>,
    /// Clients advanced by the group's pushes, with the version of the last push that did.
    advanced_clients: HashMap<String, u64>,
    /// Pushes of the group that changed something so far.
    committed: u64,
    overlay: PushOverlay,
}

impl GroupState {
    /// Reads the space's version and every client group and client the pushes name, at once;
    /// with them, the entries the pushes' mutations are likely to read (see
    /// [`ReadHints`]), when the store can in the same snapshot.
    async fn read(
        tx: &mut dyn PushTx,
        pushes: &[Push],
        mutators: &Mutators,
    ) -> Result<GroupState, StoreError> {
        let group_ids = distinct(pushes.iter().map(|p| p.request.client_group_id.as_str()));
        let client_ids = distinct(
            pushes
                .iter()
                .flat_map(|p| &p.request.mutations)
                .map(|m| m.client_id.as_str()),
        );
        let mutations = pushes.iter().flat_map(|p| &p.request.mutations);
        let read_ahead = mutators.read_hints().keys(mutations);
        let maybe_new = maybe_new_groups(pushes);
        let stored = tx
            .client_state_of(&group_ids, &client_ids, &read_ahead, &maybe_new)
            .await?;
        mutators.metrics().read_ahead(stored.entries.len());
        let mut overlay = PushOverlay::default();
        overlay.know_stored(stored.entries);
        Ok(GroupState {
            read_version: stored.space_version,
            groups: stored
                .groups
                .into_iter()
                .map(|g| (g.id.clone(), g))
                .collect(),
            collected_groups: stored.collected_groups.into_iter().collect(),
            clients: stored
                .clients
                .into_iter()
                .map(|c| (c.id.clone(), c))
                .collect(),
            new_groups: Vec::new(),
            active_groups: HashSet::new(),
            advanced_clients: HashMap::new(),
            committed: 0,
            overlay,
        })
    }

    /// The version the next push that changes something writes at.
    fn next_version(&self) -> u64 {
        self.read_version + self.committed + 1
    }

    /// Records what a push that changed something did, once it is done: its client group
    /// (created, or active) and its clients' new last mutation ids, at the next version.
    fn record_push(
        &mut self,
        request: &PushRequest,
        new_group: Option<ClientGroupRecord>,
        last_mutation_ids: HashMap<&str, u64>,
        advanced: &HashSet<&str>,
    ) {
        match new_group {
            Some(group) => {
                self.groups.insert(group.id.clone(), group.clone());
                self.new_groups.push(group);
            }
            None => {
                self.active_groups.insert(request.client_group_id.clone());
            }
        }
        let version = self.next_version();
        self.committed += 1;
        for client in advanced {
            self.clients.insert(
                (*client).to_owned(),
                ClientRecord {
                    id: (*client).to_owned(),
                    client_group_id: request.client_group_id.clone(),
                    last_mutation_id: last_mutation_ids[client],
                },
            );
            self.advanced_clients.insert((*client).to_owned(), version);
        }
    }

    /// Everything to write, or `None` when no push advanced a client.
    fn into_changes(mut self) -> Option<PushChanges> {
        if self.committed == 0 {
            return None;
        }
        let version = self.read_version + self.committed;
        let new_group_ids: HashSet<&str> = self.new_groups.iter().map(|g| g.id.as_str()).collect();
        let active_client_groups = self
            .active_groups
            .iter()
            .filter(|id| !new_group_ids.contains(id.as_str()))
            .cloned()
            .collect();
        let clients = self
            .advanced_clients
            .iter()
            .map(|(id, version)| ClientWrite {
                client: self
                    .clients
                    .remove(id)
                    .expect("advanced clients are recorded"),
                version: *version,
            })
            .collect();
        Some(PushChanges {
            version,
            read_version: self.read_version,
            active_at: unix_now(),
            new_client_groups: self.new_groups,
            active_client_groups,
            clients,
            entries: self.overlay.into_changes(),
        })
    }
}

/// Applies one push of the group, starting no mutation after its budget's deadline or the
/// group's (`None` for the group's first push). The outer error (the database failed) fails the
/// group; the inner one is this push's own answer, given before it wrote anything.
async fn apply_push(
    tx: &mut dyn PushTx,
    group: &mut GroupState,
    mutators: &Mutators,
    space: &SpaceId,
    push: &Push,
    age: &GroupAge<'_>,
) -> Result<Result<PushOutcome, PushError>, StoreError> {
    let Push {
        user,
        request,
        budget,
        writable,
        mode,
    } = push;
    let checked = check_client_group(group, request, space, user)
        .and_then(|new_group| Ok((new_group, known_clients(&group.clients, request)?)));
    let (new_group, mut last_mutation_ids) = match checked {
        Ok(checked) => checked,
        Err(refusal) => return Ok(Err(refusal)),
    };
    if *mode == ApplyMode::AllOrNothing {
        let client = all_or_nothing::Client {
            new_group,
            last_mutation_ids,
        };
        return all_or_nothing::apply(tx, group, mutators, space, push, client).await;
    }

    let version = group.next_version();
    group.overlay.start_push(version, budget.max_write_bytes);
    let mut failed = FailedMutations::default();
    let mut advanced: HashSet<&str> = HashSet::new();
    let mut stopped_by_gap: HashSet<&str> = HashSet::new();
    let mut applied = 0usize;
    let mut replayed = 0usize;
    let mut partial = None;
    let last_index = request.mutations.len().saturating_sub(1);
    for (index, mutation) in request.mutations.iter().enumerate() {
        let client = mutation.client_id.as_str();
        if stopped_by_gap.contains(client) {
            continue;
        }
        let expected = last_mutation_ids.get(client).copied().unwrap_or(0) + 1;
        if mutation.id < expected {
            replayed += 1; // applied by an earlier push: re-sent pushes are normal
            continue;
        }
        if mutation.id > expected {
            tracing::warn!(
                client = ?shortened(client),
                expected,
                got = mutation.id,
                "mutation id gap; ignoring this client's later mutations"
            );
            stopped_by_gap.insert(client);
            continue;
        }
        if applied > 0 && out_of_budget(applied, budget, age) {
            // Stopping here leaves every client with a prefix applied: the rest of the push
            // comes later in the list, and the client sends it again.
            tracing::info!(
                applied,
                "push budget spent; the rest of its mutations are left for the next push"
            );
            partial = Some(applied);
            break;
        }
        let writer = Writer {
            space,
            user,
            writable,
        };
        let mut write_tx = WriteTx::new(&mut *tx, &mut group.overlay, writer, client, mutation.id);
        if index == last_index {
            write_tx.mark_last_of_push();
        }
        let span = tracing::debug_span!(
            "push.mutation",
            name = &*shortened(&mutation.name),
            client = &*shortened(client),
            id = mutation.id as i64
        );
        let result = run_mutator(mutators, &mut write_tx, mutation)
            .instrument(span)
            .await;
        match write_tx.within_write_limits(result) {
            Ok(()) => write_tx.keep_writes(),
            Err(MutationError::Store(error)) => return Err(error),
            Err(error) => {
                mutators.count_failure(&mutation.name, &error);
                failed.record(mutation, &error);
            }
        }
        last_mutation_ids.insert(client, mutation.id);
        advanced.insert(client);
        applied += 1;
    }

    failed.log(user);
    if advanced.is_empty() {
        return Ok(Ok(if replayed > 0 {
            PushOutcome::Replayed
        } else {
            PushOutcome::Unchanged
        }));
    }
    group.record_push(request, new_group, last_mutation_ids, &advanced);
    // The commit's instant is filled in once the group commits.
    Ok(Ok(PushOutcome::Committed {
        version,
        committed_at: Instant::now(),
        partial,
    }))
}

/// Whether a push that applied `applied` mutations may start no more: its own budget is spent,
/// or its group has run for its age limit.
fn out_of_budget(applied: usize, budget: &PushBudget, age: &GroupAge<'_>) -> bool {
    applied >= budget.max_mutations || Instant::now() >= budget.deadline || age.passed()
}

/// How long a group may run: `max_age`, and whether pushes wait for the space's next group.
#[derive(Clone, Copy)]
pub(super) struct AgeLimit<'a> {
    pub max_age: Duration,
    pub others_waiting: &'a (dyn Fn() -> bool + Sync),
}

/// A group's age limit, as one of its pushes sees it. Pushes after the first start nothing past
/// it; the first push (which may be a group of one) stops there only when other pushes wait for
/// the space, so that a long push alone is not cut for nothing.
struct GroupAge<'a> {
    deadline: Instant,
    first: bool,
    others_waiting: &'a (dyn Fn() -> bool + Sync),
}

impl GroupAge<'_> {
    fn passed(&self) -> bool {
        Instant::now() >= self.deadline && (!self.first || (self.others_waiting)())
    }
}

/// A client group belongs to the space and user that created it; one garbage collection
/// removed must start over. Returns the group to create when it is new.
fn check_client_group(
    group: &GroupState,
    request: &PushRequest,
    space: &SpaceId,
    user: &str,
) -> Result<Option<ClientGroupRecord>, PushError> {
    let id = &request.client_group_id;
    if let Some(stored) = group.groups.get(id) {
        check_group_ownership(stored, space, user)?;
        return Ok(None);
    }
    if group.collected_groups.contains(id) {
        tracing::info!("client group removed by garbage collection: ClientStateNotFound");
        return Err(PushError::ClientStateNotFound);
    }
    Ok(Some(ClientGroupRecord {
        id: id.clone(),
        space_id: space.as_str().to_owned(),
        user_id: user.to_owned(),
    }))
}

/// The client groups of `pushes` that may be new (see [`MaybeNewGroup`]): each of their clients'
/// first mutation here is id 1, and no push of another group names those clients.
fn maybe_new_groups(pushes: &[Push]) -> Vec<MaybeNewGroup> {
    let mut first: HashMap<&str, (&str, u64)> = HashMap::new();
    let mut shared: HashSet<&str> = HashSet::new();
    for push in pushes {
        let group = push.request.client_group_id.as_str();
        for mutation in &push.request.mutations {
            let (first_group, _) = *first
                .entry(mutation.client_id.as_str())
                .or_insert((group, mutation.id));
            if first_group != group {
                shared.insert(mutation.client_id.as_str());
            }
        }
    }
    let groups = distinct(pushes.iter().map(|p| p.request.client_group_id.as_str()));
    groups
        .into_iter()
        .filter_map(|id| {
            let clients: Vec<(&str, u64)> = first
                .iter()
                .filter(|(_, (group, _))| *group == id)
                .map(|(client, (_, first_id))| (*client, *first_id))
                .collect();
            let new_like = !clients.is_empty()
                && clients
                    .iter()
                    .all(|(client, first_id)| *first_id == 1 && !shared.contains(client));
            new_like.then(|| MaybeNewGroup {
                client_ids: clients.iter().map(|(c, _)| (*c).to_owned()).collect(),
                id,
            })
        })
        .collect()
}

fn distinct<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut seen = HashSet::new();
    ids.filter(|id| seen.insert(*id))
        .map(str::to_owned)
        .collect()
}

/// The last mutation id of every client in the push. Rejects a client of another group, and
/// answers ClientStateNotFound for an unknown client whose first mutation is not id 1 (the
/// server lost its state: the client must start over).
fn known_clients<'r>(
    stored: &HashMap<String, ClientRecord>,
    request: &'r PushRequest,
) -> Result<HashMap<&'r str, u64>, PushError> {
    let mut last_mutation_ids = HashMap::new();
    for mutation in &request.mutations {
        let client = mutation.client_id.as_str();
        if last_mutation_ids.contains_key(client) {
            continue;
        }
        match stored.get(client) {
            Some(record) if record.client_group_id != request.client_group_id => {
                return Err(PushError::Forbidden(AuthError::Forbidden(format!(
                    "client {client} belongs to another client group"
                ))));
            }
            Some(record) => {
                last_mutation_ids.insert(client, record.last_mutation_id);
            }
            None if mutation.id > 1 => {
                tracing::info!(
                    client,
                    first_id = mutation.id,
                    "unknown client: ClientStateNotFound"
                );
                return Err(PushError::ClientStateNotFound);
            }
            None => {
                last_mutation_ids.insert(client, 0);
            }
        }
    }
    Ok(last_mutation_ids)
}

/// How many failed mutations a push's log line describes, and how much of each client string.
const LOGGED_FAILURES: usize = 5;
const LOGGED_TEXT_BYTES: usize = 200;

/// A push's failed mutations, logged as one line: a push of 90,000 failing mutations (or one
/// with a 4 MB argument) writes a few hundred bytes of log, not megabytes.
#[derive(Default)]
struct FailedMutations {
    count: usize,
    first: Vec<String>,
}

impl FailedMutations {
    fn record(&mut self, mutation: &Mutation, error: &MutationError) {
        self.count += 1;
        if self.first.len() < LOGGED_FAILURES {
            self.first.push(format!(
                "{}#{} {}: {}",
                shortened(&mutation.client_id),
                mutation.id,
                shortened(&mutation.name),
                shortened(&error.to_string())
            ));
        }
    }

    /// Client strings are logged with `?` (escaped): a name holding a newline cannot forge a
    /// log line.
    fn log(&self, user: &str) {
        if self.count > 0 {
            tracing::warn!(
                user = ?shortened(user),
                failed = self.count,
                first = ?self.first,
                "mutations failed; their writes are discarded and they count as processed"
            );
        }
    }
}

/// At most [`LOGGED_TEXT_BYTES`] of `text` (cut at a character boundary, marked with `…`).
fn shortened(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= LOGGED_TEXT_BYTES {
        return text.into();
    }
    let mut end = LOGGED_TEXT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}

async fn run_mutator(
    mutators: &Mutators,
    tx: &mut WriteTx<'_>,
    mutation: &Mutation,
) -> Result<(), MutationError> {
    let mutator = mutators.get(&mutation.name).ok_or_else(|| {
        MutationError::Rejected(format!("no mutator is named {:?}", mutation.name))
    })?;
    let args: serde_json::Value = serde_json::from_str(mutation.args.get())
        .map_err(|e| MutationError::InvalidArgs(format!("arguments are not JSON: {e}")))?;
    let applied = mutator.apply(tx, &args).await;
    if !tx.store_reads().is_empty() {
        let hints = mutators.read_hints();
        hints.learn(&mutation.name, &args, tx.store_reads());
    }
    applied
}
