//! An all-or-nothing push, the server API's: one client's mutations, numbered from 1, run in
//! one `WriteTx`, so that the first failure discards them all and is the push's answer.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use tracing::Instrument;

use super::{GroupState, Push, PushError, PushOutcome, run_mutator, shortened};
use crate::mutators::{MutationError, Mutators, WriteTx, Writer};
use crate::protocol::SpaceId;
use crate::store::{ClientGroupRecord, PushTx, StoreError};

/// The push's client as the group's checks found it: its group to create, if new, and the last
/// mutation id of its client (0 when new).
pub(super) struct Client<'r> {
    pub new_group: Option<ClientGroupRecord>,
    pub last_mutation_ids: HashMap<&'r str, u64>,
}

/// Applies `push`'s mutations together: `Replayed` when its client applied any before, its
/// first failure (nothing written) when one fails or the budget's deadline passes before the
/// last starts, `Committed` otherwise. The outer error (the database failed) fails the group.
pub(super) async fn apply<'r>(
    tx: &mut dyn PushTx,
    group: &mut GroupState,
    mutators: &Mutators,
    space: &SpaceId,
    push: &'r Push,
    client: Client<'r>,
) -> Result<Result<PushOutcome, PushError>, StoreError> {
    let Push {
        user,
        request,
        budget,
        writable,
        ..
    } = push;
    let (Some(first), Some(last)) = (request.mutations.first(), request.mutations.last()) else {
        return Ok(Ok(PushOutcome::Unchanged));
    };
    let client_id = first.client_id.as_str();
    let Client {
        new_group,
        mut last_mutation_ids,
    } = client;
    // The client is the call's own (one per idempotency key), and a call applies all its
    // mutations or none: any mutation applied means the key's call was, whatever this one holds.
    if last_mutation_ids.get(client_id).copied().unwrap_or(0) > 0 {
        return Ok(Ok(PushOutcome::Replayed));
    }
    let version = group.next_version();
    group.overlay.start_push(version, budget.max_write_bytes);
    let writer = Writer {
        space,
        user,
        writable,
    };
    let mut write_tx = WriteTx::new(tx, &mut group.overlay, writer, client_id, first.id);
    for (index, mutation) in request.mutations.iter().enumerate() {
        let failed = |error: &MutationError| PushError::MutationFailed {
            index,
            name: shortened(&mutation.name).into_owned(),
            reason: error.reason(),
            message: error.to_string(),
        };
        if index > 0 && Instant::now() >= budget.deadline {
            let mutations = request.mutations.len();
            return Ok(Err(PushError::TookTooLong {
                ran: index,
                mutations,
            }));
        }
        write_tx.start_mutation(mutation.id);
        if index + 1 == request.mutations.len() {
            write_tx.mark_last_of_push();
        }
        let span = tracing::debug_span!(
            "push.mutation",
            name = &*shortened(&mutation.name),
            id = mutation.id as i64
        );
        let result = run_mutator(mutators, &mut write_tx, mutation)
            .instrument(span)
            .await;
        match write_tx.within_write_limits(result) {
            Ok(()) => {}
            Err(MutationError::Store(error)) => return Err(error),
            Err(error) => {
                mutators.count_failure(&mutation.name, &error);
                tracing::warn!(
                    index,
                    name = ?shortened(&mutation.name),
                    reason = error.reason(),
                    "a server API call's mutation failed; none of its mutations is applied"
                );
                return Ok(Err(failed(&error)));
            }
        }
    }
    write_tx.keep_writes();
    last_mutation_ids.insert(client_id, last.id);
    group.record_push(
        request,
        new_group,
        last_mutation_ids,
        &HashSet::from([client_id]),
    );
    Ok(Ok(PushOutcome::Committed {
        version,
        committed_at: Instant::now(),
        partial: None,
    }))
}
