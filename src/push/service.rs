//! The push service, the one way into the write path: a parsed push is checked, given its
//! budget, applied (alone or in its space's group), committed, poked and counted here, and
//! answered with an outcome or a `PushError`. The HTTP handler only parses and maps.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use super::{ApplyMode, Push, PushBudget, PushError, PushGroups, PushOutcome};
use crate::auth::AuthError;
use crate::metrics::PushAnswer;
use crate::protocol::{PushRequest, SpaceId};
use crate::rules::KeySet;

impl PushGroups {
    /// Applies `request`, sent by `user`, to `space`; its mutations may write the keys of
    /// `writable` (a mutation writing another fails, as a failing mutator does). A push committed only in part is answered
    /// `PushError::Partial` (its prefix is committed and poked): only a failure makes Replicache
    /// push again without a new mutation, as its push loop has no timer.
    pub async fn push(
        self: &Arc<Self>,
        space: &SpaceId,
        user: String,
        request: PushRequest,
        writable: KeySet,
    ) -> Result<PushOutcome, PushError> {
        let started = Instant::now();
        let answer = self
            .checked_push(space, user, request, writable, ApplyMode::EachMutation)
            .await;
        self.metrics
            .observe_push(answer_kind(&answer), started.elapsed());
        answer
    }

    /// Applies `request`'s mutations (of one client, numbered from 1) as `user`, all or none:
    /// the server API's calls. Applied before (the same client), it is answered `Replayed`; a
    /// failed mutation is the answer (`PushError::MutationFailed`), with nothing written.
    pub async fn push_all_or_nothing(
        self: &Arc<Self>,
        space: &SpaceId,
        user: String,
        request: PushRequest,
    ) -> Result<PushOutcome, PushError> {
        let started = Instant::now();
        let max = self.limits.max_mutations;
        let answer = if request.mutations.len() > max {
            Err(PushError::TooManyMutations {
                mutations: request.mutations.len(),
                max,
            })
        } else {
            self.checked_push(space, user, request, KeySet::All, ApplyMode::AllOrNothing)
                .await
        };
        self.metrics
            .observe_push(answer_kind(&answer), started.elapsed());
        answer
    }

    async fn checked_push(
        self: &Arc<Self>,
        space: &SpaceId,
        user: String,
        request: PushRequest,
        writable: KeySet,
        mode: ApplyMode,
    ) -> Result<PushOutcome, PushError> {
        let budget = self.budget();
        request.validate()?;
        if let Err(error) = check_client_count(&request, self.limits.max_clients) {
            self.metrics.push_refused_too_many_clients.increment();
            return Err(error);
        }
        let mutations = request.mutations.len();
        self.metrics.push_mutations.observe(mutations);
        let push = Push {
            user,
            request,
            budget,
            writable,
            mode,
        };
        let outcome = self.apply_in_group(space, push).await?;
        if let PushOutcome::Committed {
            version,
            partial: Some(applied),
            ..
        } = outcome
        {
            tracing::debug!(version, mutations, applied, "push committed in part");
            return Err(PushError::Partial { applied });
        }
        tracing::debug!(mutations, ?outcome, "push answered");
        self.metrics.pushes.increment();
        Ok(outcome)
    }

    /// The budget of a push that starts now.
    fn budget(&self) -> PushBudget {
        PushBudget {
            max_mutations: self.limits.max_mutations,
            deadline: Instant::now() + self.work_budget,
            max_write_bytes: self.limits.max_write_bytes,
        }
    }
}

/// How a push was answered, as `replisync_push_duration_seconds` labels it.
fn answer_kind(answer: &Result<PushOutcome, PushError>) -> PushAnswer {
    match answer {
        Ok(PushOutcome::Committed { .. }) | Err(PushError::Partial { .. }) => PushAnswer::Committed,
        Ok(PushOutcome::Unchanged | PushOutcome::Replayed) => PushAnswer::Unchanged,
        Err(
            PushError::Store(_)
            | PushError::GroupFailed
            | PushError::Forbidden(AuthError::Unavailable(_)),
        ) => PushAnswer::Failed,
        Err(
            PushError::Invalid(_)
            | PushError::TooManyClients { .. }
            | PushError::TooManyMutations { .. }
            | PushError::TookTooLong { .. }
            | PushError::MutationFailed { .. }
            | PushError::ClientStateNotFound
            | PushError::Forbidden(_),
        ) => PushAnswer::Refused,
    }
}

/// Refuses a push naming more clients than `max` (a client group has a handful): each would
/// be a row to read and create.
fn check_client_count(request: &PushRequest, max: usize) -> Result<(), PushError> {
    let mut seen = HashSet::new();
    for mutation in &request.mutations {
        if seen.insert(mutation.client_id.as_str()) && seen.len() > max {
            return Err(PushError::TooManyClients { max });
        }
    }
    Ok(())
}
