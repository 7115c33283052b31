//! The label values of the push and pull histograms: how a push was answered, what kind a pull
//! was, and the timer a pull carries to where its answer ends.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OutcomeLabels {
    pub(super) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PullKindLabels {
    pub(super) kind: &'static str,
}

/// How a push was answered, for `replisync_push_duration_seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushAnswer {
    /// It moved the space on (in full or in part).
    Committed,
    /// It changed nothing (every mutation applied before, or blocked by a gap).
    Unchanged,
    /// It was refused (4xx: a bad request, ClientStateNotFound, another user's group).
    Refused,
    /// The server failed it (5xx: the database, a group that failed).
    Failed,
}

impl PushAnswer {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            PushAnswer::Committed => "committed",
            PushAnswer::Unchanged => "unchanged",
            PushAnswer::Refused => "refused",
            PushAnswer::Failed => "failed",
        }
    }
}

/// What kind of pull, for `replisync_pull_duration_seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullKind {
    /// An incremental pull answered from a read shared with other pulls of its cookie.
    Shared,
    /// A first pull, or a delta too large to share, streamed from a snapshot of its own.
    Streamed,
    /// A pull answered with the whole space (its cookie was compacted away, or ahead).
    Reset,
}

impl PullKind {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            PullKind::Shared => "shared",
            PullKind::Streamed => "streamed",
            PullKind::Reset => "reset",
        }
    }
}

/// A pull's kind and when it arrived, carried to where its answer ends.
#[derive(Clone, Copy, Debug)]
pub struct PullTimer {
    pub(super) kind: PullKind,
    pub(super) started: Instant,
}

impl PullTimer {
    /// A pull arriving now, counted as `Shared` until it turns out otherwise.
    pub fn start() -> PullTimer {
        PullTimer {
            kind: PullKind::Shared,
            started: Instant::now(),
        }
    }

    pub fn with_kind(self, kind: PullKind) -> PullTimer {
        PullTimer { kind, ..self }
    }
}
