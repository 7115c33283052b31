//! Push: applies a client group's pending mutations to a space, in order, exactly once.
//! One transaction per push under the space's lock; a poke goes out only after it commits.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::auth::check_group_ownership;
use crate::error::ApiError;
use crate::mutators::{MutationError, Mutators, PushOverlay, WriteTx};
use crate::protocol::{Mutation, ProtocolError, PushRequest, SpaceId};
use crate::store::{
    ClientGroupRecord, ClientRecord, PushChanges, Store, StoreError, reconnecting, unix_now,
};

/// How many times a push that lost a race with a concurrent push is run again.
const CONFLICT_ATTEMPTS: u32 = 8;

/// What a push did.
#[derive(Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// Every mutation had been applied before (or was blocked by a gap): nothing written.
    Unchanged,
    /// The space moved to `version`. `partial` (how many mutations were applied) when the
    /// push's budget ran out before its last mutation: the client keeps the rest pending and
    /// sends them again.
    Committed {
        version: u64,
        committed_at: Instant,
        partial: Option<usize>,
    },
}

/// How much one push may do. Past either bound the push commits what it applied and leaves the
/// rest (a prefix of each client's mutations is applied, never a later mutation without the
/// earlier ones); the client's next push continues from its last mutation id. At least one
/// mutation is always applied, so every push makes progress.
#[derive(Clone, Copy, Debug)]
pub struct PushBudget {
    /// Most mutations applied (already applied ones, skipped, do not count).
    pub max_mutations: usize,
    /// No mutator is started after this instant.
    pub deadline: Instant,
}

/// Refuses a push naming more clients than `max` (a client group has a handful): each would
/// be a row to read and create.
pub fn check_client_count(request: &PushRequest, max: usize) -> Result<(), ApiError> {
    let mut seen = HashSet::new();
    for mutation in &request.mutations {
        if seen.insert(mutation.client_id.as_str()) && seen.len() > max {
            return Err(ApiError::bad_request(
                "TooManyClients",
                format!(
                    "the push names more than {max} client ids; the limit is REPLISYNC_MAX_CLIENTS_PER_PUSH"
                ),
            ));
        }
    }
    Ok(())
}

/// Runs the push, again from the start when a concurrent push won a race on a new row (the
/// space lock makes that rare) or when it met a dead database connection. Running a push again
/// is always safe, even after a commit whose answer was lost: applied mutation ids are skipped.
pub async fn push(
    store: &dyn Store,
    mutators: &Mutators,
    space: &SpaceId,
    user: &str,
    request: &PushRequest,
    budget: PushBudget,
) -> Result<PushOutcome, ApiError> {
    let mut attempt = 1;
    loop {
        match reconnecting(|| apply_push(store, mutators, space, user, request, budget)).await {
            Err(ApiError::Store(StoreError::Conflict(cause))) if attempt < CONFLICT_ATTEMPTS => {
                tracing::debug!(attempt, %cause, "push conflicted with a concurrent push; retrying");
                tokio::time::sleep(conflict_backoff(attempt)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn conflict_backoff(attempt: u32) -> Duration {
    let base_ms = 2u64 << attempt.min(6);
    Duration::from_millis(base_ms + rand::random_range(0..base_ms))
}

/// One attempt: the per-space algorithm of the Replicache docs, in one transaction.
async fn apply_push(
    store: &dyn Store,
    mutators: &Mutators,
    space: &SpaceId,
    user: &str,
    request: &PushRequest,
    budget: PushBudget,
) -> Result<PushOutcome, ApiError> {
    let mut tx = store.begin_push(space).await?;
    let client_ids = distinct_client_ids(&request.mutations);
    let stored = tx
        .client_state(&request.client_group_id, &client_ids)
        .await?;
    let next_version = stored.space_version + 1;
    let new_client_group = check_client_group(stored.group, request, space, user)?;
    let mut last_mutation_ids = known_clients(stored.clients, request)?;

    let mut overlay = PushOverlay::default();
    let mut failed = FailedMutations::default();
    let mut advanced: HashSet<&str> = HashSet::new();
    let mut stopped_by_gap: HashSet<&str> = HashSet::new();
    let mut applied = 0usize;
    let mut partial = None;
    for mutation in &request.mutations {
        let client = mutation.client_id.as_str();
        if stopped_by_gap.contains(client) {
            continue;
        }
        let expected = last_mutation_ids.get(client).copied().unwrap_or(0) + 1;
        if mutation.id < expected {
            continue; // applied by an earlier push: re-sent pushes are normal
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
        if applied > 0 && (applied >= budget.max_mutations || Instant::now() >= budget.deadline) {
            // Stopping here leaves every client with a prefix applied: the rest of the push
            // comes later in the list, and the client sends it again.
            tracing::info!(
                applied,
                "push budget spent; the rest of its mutations are left for the next push"
            );
            partial = Some(applied);
            break;
        }
        let mut write_tx = WriteTx::new(&mut *tx, &mut overlay, space, user, client, mutation.id);
        match run_mutator(mutators, &mut write_tx, mutation).await {
            Ok(()) => write_tx.keep_writes(),
            Err(MutationError::Store(error)) => return Err(error.into()),
            Err(error) => failed.record(mutation, &error),
        }
        last_mutation_ids.insert(client, mutation.id);
        advanced.insert(client);
        applied += 1;
    }

    failed.log();
    if advanced.is_empty() {
        return Ok(PushOutcome::Unchanged); // dropping the transaction rolls it back
    }
    let clients = advanced
        .into_iter()
        .map(|client| ClientRecord {
            id: client.to_owned(),
            client_group_id: request.client_group_id.clone(),
            last_mutation_id: last_mutation_ids[client],
        })
        .collect();
    let changes = PushChanges {
        version: next_version,
        client_group_id: request.client_group_id.clone(),
        active_at: unix_now(),
        new_client_group,
        clients,
        entries: overlay.into_changes(),
    };
    match tx.commit(changes).await {
        Err(StoreError::ClientGroupCollected) => {
            tracing::info!("client group removed by garbage collection: ClientStateNotFound");
            return Err(ProtocolError::ClientStateNotFound.into());
        }
        committed => committed?,
    }
    Ok(PushOutcome::Committed {
        version: next_version,
        committed_at: Instant::now(),
        partial,
    })
}

/// A client group belongs to the space and user that created it. Returns the group to create
/// when it is new.
fn check_client_group(
    stored: Option<ClientGroupRecord>,
    request: &PushRequest,
    space: &SpaceId,
    user: &str,
) -> Result<Option<ClientGroupRecord>, ApiError> {
    match stored {
        Some(group) => {
            check_group_ownership(&group, space, user)?;
            Ok(None)
        }
        None => Ok(Some(ClientGroupRecord {
            id: request.client_group_id.clone(),
            space_id: space.as_str().to_owned(),
            user_id: user.to_owned(),
        })),
    }
}

fn distinct_client_ids(mutations: &[Mutation]) -> Vec<String> {
    let mut seen = HashSet::new();
    mutations
        .iter()
        .filter(|m| seen.insert(m.client_id.as_str()))
        .map(|m| m.client_id.clone())
        .collect()
}

/// The last mutation id of every client in the push. Rejects a client of another group, and
/// answers ClientStateNotFound for an unknown client whose first mutation is not id 1 (the
/// server lost its state: the client must start over).
fn known_clients(
    stored: Vec<ClientRecord>,
    request: &PushRequest,
) -> Result<HashMap<&str, u64>, ApiError> {
    let stored: HashMap<String, ClientRecord> =
        stored.into_iter().map(|c| (c.id.clone(), c)).collect();
    let mut last_mutation_ids = HashMap::new();
    for mutation in &request.mutations {
        let client = mutation.client_id.as_str();
        if last_mutation_ids.contains_key(client) {
            continue;
        }
        match stored.get(client) {
            Some(record) if record.client_group_id != request.client_group_id => {
                return Err(ApiError::Forbidden(format!(
                    "client {client} belongs to another client group"
                )));
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
                return Err(ProtocolError::ClientStateNotFound.into());
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
    fn log(&self) {
        if self.count > 0 {
            tracing::warn!(
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
    mutator.apply(tx, &args).await
}
