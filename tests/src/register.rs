//! The kv register workload's write: one put or cas on a key, sent with a deadline and recorded
//! in a linearizability [`History`] with the outcome a client can know (ok, definite failure,
//! or unknown).

use std::time::Duration;

use serde_json::json;

use crate::cluster::{exec_request, Client};
use crate::history::History;
use crate::linearizability::{Op, Outcome, Ret};
use crate::pipeline::PipelineCaller;
use crate::{ExecOutcome, NodeId};

/// Deadlines of one call: `timeout` goes to the server with the request, `backstop` bounds the
/// wait here (a node that stopped answering).
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    pub timeout: Duration,
    pub backstop: Duration,
}

/// How a write reaches its node: a unary call, or a call on a `Pipeline` stream.
pub enum Via<'a> {
    Unary(&'a mut Client),
    Pipeline(&'a mut PipelineCaller),
}

/// Runs a put or cas through `via` (connected to `node`) on `tenant`, records it, and
/// returns its outcome and applied index. `Err` carries a module error: kv rejects none of
/// these commands, so that is a broken promise for the caller to report (the history has it as
/// unknown).
#[allow(clippy::too_many_arguments)]
pub async fn write(
    history: &History,
    process: u64,
    via: Via<'_>,
    node: NodeId,
    tenant: &str,
    key: &str,
    op: Op,
    deadlines: Deadlines,
) -> Result<(Outcome, Option<u64>), String> {
    let command = match &op {
        Op::Put { value } => json!({"op": "put", "key": key, "value": value}),
        Op::Cas { expect, value } => {
            json!({"op": "cas", "key": key, "expect": expect, "value": value})
        }
        Op::Get => unreachable!("reads go through Query"),
    };
    let mut request = tonic::Request::new(exec_request(
        tenant,
        command.to_string().into_bytes(),
        "",
        0,
    ));
    request.set_timeout(deadlines.timeout);
    let inv = history.invoke(process, key, op.clone());
    let result = match via {
        Via::Unary(client) => tokio::time::timeout(deadlines.backstop, client.exec(request)).await,
        Via::Pipeline(pipe) => {
            // The caller bounds its own wait by the backstop (a late answer is a status).
            Ok(pipe.exec(request.into_inner(), deadlines.backstop).await)
        }
    };
    let mut broken = None;
    let (outcome, index, note) = match result {
        Err(_) => (Outcome::Unknown, None, format!("node {node}: no answer")),
        Ok(result) => match ExecOutcome::from_result(result) {
            ExecOutcome::Ok { index, output } => {
                let out = crate::json(&output);
                let text = |v: &serde_json::Value| v.as_str().map(String::from);
                let ret = match op {
                    Op::Put { .. } => Ret::Put {
                        prev: text(&out["prev"]),
                    },
                    _ => Ret::Cas {
                        ok: out["ok"]
                            .as_bool()
                            .unwrap_or_else(|| panic!("cas output without ok: {out}")),
                        current: text(&out["current"]),
                    },
                };
                (
                    Outcome::Ok(ret),
                    Some(index),
                    format!("node {node} index {index}"),
                )
            }
            other @ ExecOutcome::ModuleError { .. } => {
                let what = format!("{command} through node {node}: {other}");
                broken = Some(what.clone());
                (Outcome::Unknown, None, what)
            }
            ExecOutcome::Definite(s) => (
                Outcome::Fail,
                None,
                format!("node {node}: definite {:?} {}", s.code(), s.message()),
            ),
            ExecOutcome::Indeterminate(s) => (
                Outcome::Unknown,
                None,
                format!("node {node}: indeterminate {:?} {}", s.code(), s.message()),
            ),
            // Transport failure, or our own deadline: the node may have applied it.
            ExecOutcome::Unclassified(s) => (
                Outcome::Unknown,
                None,
                format!("node {node}: unclassified {:?} {}", s.code(), s.message()),
            ),
        },
    };
    history.complete(inv, outcome.clone(), note);
    match broken {
        Some(what) => Err(what),
        None => Ok((outcome, index)),
    }
}
