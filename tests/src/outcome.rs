//! Client results classified the way the contract defines them.
//!
//! A gRPC error carries the metadata `wraft-outcome`: `definite` (nothing was applied) or
//! `indeterminate` (it may have been). A module's own error is not a gRPC error but a
//! `ModuleError` in the response. An error without the metadata is [`ExecOutcome::Unclassified`]:
//! either the client never reached a node (transport failure: the node is down or died
//! mid-call, so the caller must treat it as indeterminate) or a node broke the contract.

use std::fmt;

use tonic::{Code, Response, Status};

use crate::api::{exec_response, module_error, query_response, ExecResponse, QueryResponse};

/// What the `wraft-outcome` metadata of an error says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Certainty {
    /// Nothing was applied: safe to retry.
    Definite,
    /// It may have been applied.
    Indeterminate,
    /// No (or an unknown) `wraft-outcome` value.
    Missing,
}

impl Certainty {
    /// Reads the `wraft-outcome` metadata of `status`.
    pub fn of(status: &Status) -> Certainty {
        match status
            .metadata()
            .get("wraft-outcome")
            .and_then(|v| v.to_str().ok())
        {
            Some("definite") => Certainty::Definite,
            Some("indeterminate") => Certainty::Indeterminate,
            _ => Certainty::Missing,
        }
    }
}

/// An `Exec` result.
#[derive(Debug)]
pub enum ExecOutcome {
    /// Applied; `output` is what the module's `apply` returned.
    Ok { index: u64, output: Vec<u8> },
    /// Applied, and the module refused it (state unchanged).
    ModuleError {
        index: u64,
        kind: module_error::Kind,
        message: String,
    },
    /// A gRPC error marked `definite`.
    Definite(Status),
    /// A gRPC error marked `indeterminate`.
    Indeterminate(Status),
    /// A gRPC error without `wraft-outcome`: a transport failure, or a contract violation.
    Unclassified(Status),
}

fn module_kind(kind: i32) -> module_error::Kind {
    module_error::Kind::try_from(kind)
        .unwrap_or_else(|_| panic!("ModuleError.kind {kind} is not a known kind"))
}

fn classify_status(status: Status) -> ExecOutcome {
    match Certainty::of(&status) {
        Certainty::Definite => ExecOutcome::Definite(status),
        Certainty::Indeterminate => ExecOutcome::Indeterminate(status),
        Certainty::Missing => ExecOutcome::Unclassified(status),
    }
}

impl ExecOutcome {
    /// Classifies the result of a `WraftClient::exec` call.
    pub fn from_result(result: Result<Response<ExecResponse>, Status>) -> ExecOutcome {
        match result {
            Err(status) => classify_status(status),
            Ok(response) => {
                let response = response.into_inner();
                match response.outcome {
                    Some(exec_response::Outcome::Output(output)) => ExecOutcome::Ok {
                        index: response.index,
                        output,
                    },
                    Some(exec_response::Outcome::Error(e)) => ExecOutcome::ModuleError {
                        index: response.index,
                        kind: module_kind(e.kind),
                        message: e.message,
                    },
                    None => panic!("ExecResponse without an outcome: {response:?}"),
                }
            }
        }
    }

    /// The output as JSON and the index, panicking with the outcome unless it is `Ok`.
    pub fn expect_ok(&self, what: &str) -> (u64, serde_json::Value) {
        match self {
            ExecOutcome::Ok { index, output } => (*index, crate::json(output)),
            other => panic!("{what}: expected an applied command, got {other}"),
        }
    }

    /// The gRPC status of an error outcome, if it is one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ExecOutcome::Definite(s)
            | ExecOutcome::Indeterminate(s)
            | ExecOutcome::Unclassified(s) => Some(s),
            _ => None,
        }
    }

    /// The gRPC code of an error outcome, if it is one.
    pub fn code(&self) -> Option<Code> {
        self.status().map(Status::code)
    }
}

impl fmt::Display for ExecOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecOutcome::Ok { index, output } => {
                write!(f, "Ok(index {index}: {})", String::from_utf8_lossy(output))
            }
            ExecOutcome::ModuleError {
                index,
                kind,
                message,
            } => write!(f, "ModuleError(index {index}, {kind:?}: {message})"),
            ExecOutcome::Definite(s) => write!(f, "Definite({:?}: {})", s.code(), s.message()),
            ExecOutcome::Indeterminate(s) => {
                write!(f, "Indeterminate({:?}: {})", s.code(), s.message())
            }
            ExecOutcome::Unclassified(s) => write!(
                f,
                "Unclassified(no wraft-outcome; {:?}: {})",
                s.code(),
                s.message()
            ),
        }
    }
}

/// A `Query` result.
#[derive(Debug)]
pub enum QueryOutcome {
    /// The query's output, and the applied index of the state it ran against.
    Ok { index: u64, output: Vec<u8> },
    /// The module refused the query.
    ModuleError {
        index: u64,
        kind: module_error::Kind,
        message: String,
    },
    /// A gRPC error.
    Error(Status),
}

impl QueryOutcome {
    /// Classifies the result of a `WraftClient::query` call.
    pub fn from_result(result: Result<Response<QueryResponse>, Status>) -> QueryOutcome {
        match result {
            Err(status) => QueryOutcome::Error(status),
            Ok(response) => {
                let response = response.into_inner();
                match response.outcome {
                    Some(query_response::Outcome::Output(output)) => QueryOutcome::Ok {
                        index: response.index,
                        output,
                    },
                    Some(query_response::Outcome::Error(e)) => QueryOutcome::ModuleError {
                        index: response.index,
                        kind: module_kind(e.kind),
                        message: e.message,
                    },
                    None => panic!("QueryResponse without an outcome: {response:?}"),
                }
            }
        }
    }

    /// The output as JSON, panicking with the outcome unless it is `Ok`.
    pub fn expect_json(&self, what: &str) -> serde_json::Value {
        match self {
            QueryOutcome::Ok { output, .. } => crate::json(output),
            other => panic!("{what}: expected a query result, got {other}"),
        }
    }

    /// The output as JSON, or a description of the outcome (for [`crate::wait_until`] probes).
    pub fn json(&self) -> Result<serde_json::Value, String> {
        match self {
            QueryOutcome::Ok { output, .. } => serde_json::from_slice(output).map_err(|e| {
                format!(
                    "output is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(output)
                )
            }),
            other => Err(other.to_string()),
        }
    }
}

impl fmt::Display for QueryOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueryOutcome::Ok { index, output } => {
                write!(f, "Ok(index {index}: {})", String::from_utf8_lossy(output))
            }
            QueryOutcome::ModuleError {
                index,
                kind,
                message,
            } => write!(f, "ModuleError(index {index}, {kind:?}: {message})"),
            QueryOutcome::Error(s) => write!(
                f,
                "Error({:?}, {:?}: {})",
                Certainty::of(s),
                s.code(),
                s.message()
            ),
        }
    }
}
