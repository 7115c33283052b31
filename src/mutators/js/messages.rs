//! What a push and the engine thread running its JavaScript mutators say to each other: the push
//! asks for a mutation, the engine asks for reads and writes of the push's data until it is done.

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::mutators::{MutationWrites, ScriptError};
use crate::rules::KeySet;

/// One mutation to run.
pub(super) struct Call {
    pub name: String,
    /// The mutation's arguments, JSON text.
    pub args: String,
    pub client_id: String,
    pub mutation_id: u64,
    pub user_id: String,
    pub space_id: String,
    /// Entries the push knows that the mutation is likely to read (see `ReadHints`), each with
    /// its JSON text (`None`: absent): the engine answers their `tx.get` and `tx.has` itself.
    pub known: Vec<(String, Option<String>)>,
    /// The writes the push lends the mutation (those of the mutations before it in an
    /// all-or-nothing call, else none), which the engine makes and checks itself, with the keys
    /// the caller may write; they go back with [`FromEngine::Done`].
    pub writes: MutationWrites,
    pub writable: KeySet,
    /// The push's last mutation: the engine ends the session after it, without waiting for
    /// the push to let it go.
    pub last: bool,
}

/// A read the running mutator asks of the push's transaction (its writes stay in the engine).
pub(super) enum HostRequest {
    /// Of a key the mutation did not write.
    Get(String),
    Has(String),
    /// A scan sees the mutation's writes: they go along, and come back with the reply.
    Scan {
        prefix: String,
        start: String,
        exclusive: bool,
        limit: usize,
        writes: MutationWrites,
    },
}

/// The answer to a [`HostRequest`]: text for the JavaScript side (JSON, or `true`/`false`), or
/// an error message that it throws.
pub(super) type HostReply = Result<Option<String>, String>;

pub(super) enum ToEngine {
    Run(Call),
    /// The answer to a request, with the writes a scan took along.
    Reply(HostReply, Option<MutationWrites>),
}

pub(super) enum FromEngine {
    Host(HostRequest),
    /// How the call ended, and its writes (those it was lent, and its own; `None` only if they
    /// were lost with the push, which then fails whole).
    Done(Result<(), RunError>, Option<MutationWrites>),
}

/// Why a mutation did not run to its end.
pub(super) enum RunError {
    /// The mutation failed by its own doing (threw, time, memory): it counts as processed.
    Script(ScriptError),
    /// The engine could not run it (no context or runtime could be made): not the mutation's
    /// doing, so the push fails, writes nothing, and the client sends it again.
    Engine(String),
}

/// The engine's end of a push's session.
pub(super) struct EngineEnd {
    pub from_push: UnboundedReceiver<ToEngine>,
    pub to_push: UnboundedSender<FromEngine>,
}

/// The push's end of its session with an engine. Dropping it ends the session.
pub(super) struct PushEnd {
    pub to_engine: UnboundedSender<ToEngine>,
    pub from_engine: UnboundedReceiver<FromEngine>,
}

/// A new session's two ends.
pub(super) fn session() -> (PushEnd, EngineEnd) {
    let (to_engine, from_push) = unbounded_channel();
    let (to_push, from_engine) = unbounded_channel();
    (
        PushEnd {
            to_engine,
            from_engine,
        },
        EngineEnd { from_push, to_push },
    )
}
