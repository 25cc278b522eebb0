//! The node's error type and how it reaches clients.
//!
//! Every failure a client can see is either *definite* (nothing was applied, so a retry is safe)
//! or *indeterminate* (the request may have been applied). The distinction is made where the
//! error is created, travels with it, and reaches the client as the `wraft-outcome` metadata key
//! on the gRPC status; the CLI turns it into exit code 3 or 4.

use std::time::Duration;

/// The metadata key that carries [`Outcome`] on every error status.
pub const OUTCOME_KEY: &str = "wraft-outcome";

/// Whether a failed request may have taken effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not applied: safe to retry.
    Definite,
    /// May have been applied: the client must find out (or use a session) before retrying.
    Indeterminate,
}

impl Outcome {
    /// The metadata value for this outcome.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Definite => "definite",
            Outcome::Indeterminate => "indeterminate",
        }
    }

    /// Reads the outcome from a status; statuses that did not come from a wraft node (a broken
    /// connection, say) have none, and the caller decides what they mean.
    pub fn of_status(status: &tonic::Status) -> Option<Outcome> {
        match status.metadata().get(OUTCOME_KEY)?.to_str().ok()? {
            "definite" => Some(Outcome::Definite),
            "indeterminate" => Some(Outcome::Indeterminate),
            _ => None,
        }
    }
}

/// What can go wrong while serving a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{what} is {len} bytes; the limit is {limit} bytes")]
    TooLarge {
        what: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("tenant `{0}` does not exist")]
    UnknownTenant(String),
    #[error("no leader was elected within {0:?}; the cluster may have lost its quorum")]
    NoLeader(Duration),
    #[error("this node is not the leader (leader: {leader})")]
    NotLeader { leader: u64 },
    #[error("the proposal was dropped by raft ({0}); retry")]
    Dropped(String),
    #[error("log index {index} was taken by another entry after a leadership change; not applied, retry")]
    Superseded { index: u64 },
    #[error("the node is overloaded ({0}); retry later")]
    Busy(&'static str),
    /// A tenant's queries are held off on this node for a while (see `apply/tenant.rs`).
    #[error("{0}")]
    Paused(String),
    #[error("timed out after {0:?} waiting for the command to apply; it may still be applied")]
    Timeout(Duration),
    #[error("timed out after {0:?} waiting to confirm leadership for a read")]
    ReadTimeout(Duration),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error(
        "the node stopped before the command was known to be applied; it may still be applied"
    )]
    Interrupted,
    #[error(
        "the leader changed before the command was known to be applied; it may still be applied"
    )]
    LeaderChanged,
    #[error("forwarding to leader {leader} at {addr} failed: {message}")]
    Forward {
        leader: u64,
        addr: String,
        message: String,
        outcome: Outcome,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Whether the failed request may have been applied.
    pub fn outcome(&self) -> Outcome {
        match self {
            Error::Timeout(_) | Error::Interrupted | Error::LeaderChanged | Error::Internal(_) => {
                Outcome::Indeterminate
            }
            Error::Forward { outcome, .. } => *outcome,
            _ => Outcome::Definite,
        }
    }

    fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::InvalidArgument(_) | Error::TooLarge { .. } => Code::InvalidArgument,
            Error::UnknownTenant(_) => Code::NotFound,
            Error::NoLeader(_) | Error::NotLeader { .. } | Error::Dropped(_) => Code::Unavailable,
            Error::ShuttingDown | Error::Interrupted | Error::LeaderChanged => Code::Unavailable,
            Error::Superseded { .. } => Code::Aborted,
            Error::Busy(_) | Error::Paused(_) => Code::ResourceExhausted,
            Error::Timeout(_) | Error::ReadTimeout(_) => Code::DeadlineExceeded,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Forward { outcome, .. } => match outcome {
                Outcome::Definite => Code::Unavailable,
                Outcome::Indeterminate => Code::Unknown,
            },
            Error::Internal(_) => Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let mut status = tonic::Status::new(err.code(), err.to_string());
        status.metadata_mut().insert(
            OUTCOME_KEY,
            tonic::metadata::MetadataValue::from_static(err.outcome().as_str()),
        );
        status
    }
}

/// Marks a status (for example one passed through from the leader) with an outcome unless it
/// already carries one.
pub fn with_outcome(mut status: tonic::Status, outcome: Outcome) -> tonic::Status {
    if Outcome::of_status(&status).is_none() {
        status.metadata_mut().insert(
            OUTCOME_KEY,
            tonic::metadata::MetadataValue::from_static(outcome.as_str()),
        );
    }
    status
}
