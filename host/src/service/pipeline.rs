//! `Pipeline`: many `Exec` and `Query` calls on one gRPC stream (see `wraft.proto`).
//!
//! A unary call opens an HTTP/2 stream of its own: a header block each way, decoded through
//! HPACK into a header map, trailers to finish, and a task on the server. Under many clients
//! that per-call cost, paid on the node and again on the client, is a large part of all the
//! work done for a small command or read (BENCHMARKS.md, "One stream per client"). On a
//! pipeline a call is one DATA frame each way.
//!
//! Nothing else differs: each call becomes the request its unary RPC would have received (the
//! stream's token goes with it) and runs through the same handler and [`ClientService::traced`],
//! so the checks, limits, routing, metrics and answers are the unary ones. A failed call is
//! answered with the status the unary call would have returned, as a [`CallFailure`]; the
//! stream goes on. Calls in flight together run concurrently, as concurrent unary calls do, and
//! are no more ordered than those: a call that must follow another is sent after its answer.
//! What one stream may have in flight is bounded in calls and in bytes ([`MAX_IN_FLIGHT`]).

use std::sync::Arc;

use prost::Message as _;

use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Response, Status, Streaming};
use wraft_proto::client::{
    pipeline_request, pipeline_response, CallFailure, PipelineRequest, PipelineResponse,
};

use super::ClientService;
use crate::auth::Access;
use crate::error::Outcome;
use crate::Error;

/// What one stream may have in flight, in units of [`UNIT_BYTES`] of calls: a call takes one
/// unit per 4 KiB it holds (at least one, at most all of them). So at most 1,024 calls, and
/// about 4 MiB of them, are in flight per stream, whatever the client sends. Past that the node
/// reads no more of the stream (HTTP/2 flow control then holds the client back) until calls
/// finish: a stream cannot make the node hold unbounded work or memory.
pub const MAX_IN_FLIGHT: u32 = 1024;
/// The size of a unit of [`MAX_IN_FLIGHT`].
const UNIT_BYTES: usize = 4096;
/// Answers finished but not yet taken by the connection. Small on purpose: a client that stops
/// reading leaves its calls' tasks waiting (holding their units) rather than answers piling up.
const QUEUED_ANSWERS: usize = 64;

/// The units a call of `bytes` takes.
fn units_of(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(UNIT_BYTES))
        .unwrap_or(MAX_IN_FLIGHT)
        .clamp(1, MAX_IN_FLIGHT)
}

/// The answers of one stream, in the order the calls finish.
pub type PipelineStream = ReceiverStream<Result<PipelineResponse, Status>>;

impl ClientService {
    /// Checks the stream's token (a stream nobody may use is refused at once, rather than call
    /// by call) and starts the task that reads the calls.
    pub(super) async fn pipeline_inner(
        &self,
        request: Request<Streaming<PipelineRequest>>,
    ) -> Result<Response<PipelineStream>, Status> {
        self.ctx.auth.check(request.metadata(), Access::Any)?;
        let authorization = crate::auth::authorization_of(request.metadata());
        let inbound = request.into_inner();
        let (answers, stream) = mpsc::channel(QUEUED_ANSWERS);
        tokio::spawn(self.clone().read_calls(inbound, authorization, answers));
        Ok(Response::new(ReceiverStream::new(stream)))
    }

    /// Reads calls until the client closes its side, starting each as a task of its own. The
    /// answer stream ends once the last call has answered (every task holds a sender).
    async fn read_calls(
        self,
        mut inbound: Streaming<PipelineRequest>,
        authorization: Option<MetadataValue<Ascii>>,
        answers: mpsc::Sender<Result<PipelineResponse, Status>>,
    ) {
        let _open = OpenStream::counted();
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize));
        let mut stopping = self.ctx.stopping.clone();
        loop {
            // One unit before reading (so the count is bounded), the rest once the call's size
            // is known. A call never needs more than all units, so the wait always ends.
            let Ok(mut slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let call = tokio::select! {
                call = inbound.message() => call,
                // The client stopped reading answers (and so will never see these): stop.
                () = answers.closed() => return,
                // The node is stopping: the calls in flight are answered, then the stream
                // ends, and the client goes to another node.
                _ = stopping.wait_for(|stop| *stop) => return,
            };
            let call = match call {
                Ok(Some(call)) => call,
                Ok(None) => return,
                Err(status) => {
                    // A message that does not decode (or is over the size limit), or a broken
                    // stream: the stream ends with that status, which the client sees in place
                    // of the answers still owed.
                    tracing::debug!(%status, "pipeline stream ended by an unreadable call");
                    let _ = answers.send(Err(status)).await;
                    return;
                }
            };
            let more = units_of(call.encoded_len()) - 1;
            if more > 0 {
                let Ok(rest) = slots.clone().acquire_many_owned(more).await else {
                    return;
                };
                slot.merge(rest);
            }
            let service = self.clone();
            let answers = answers.clone();
            let authorization = authorization.clone();
            tokio::spawn(async move {
                let answer = service.pipeline_call(call, authorization).await;
                // A closed stream means the client went away: nobody is left to answer.
                let _ = answers.send(Ok(answer)).await;
                drop(slot);
            });
        }
    }

    /// Runs one call as its unary RPC and wraps the answer.
    async fn pipeline_call(
        &self,
        call: PipelineRequest,
        authorization: Option<MetadataValue<Ascii>>,
    ) -> PipelineResponse {
        use pipeline_request::Call;
        use pipeline_response::Answer;
        let answer = match call.call {
            Some(Call::Exec(req)) => self
                .traced("pipeline_exec", as_request(req, authorization), |r| {
                    self.exec_inner(r)
                })
                .await
                .map(|resp| Answer::Exec(resp.into_inner())),
            Some(Call::Query(req)) => self
                .traced("pipeline_query", as_request(req, authorization), |r| {
                    self.query_inner(r)
                })
                .await
                .map(|resp| Answer::Query(resp.into_inner())),
            None => Err(Error::InvalidArgument(
                "a pipeline call carries neither `exec` nor `query`".to_string(),
            )
            .into()),
        };
        PipelineResponse {
            id: call.id,
            answer: Some(answer.unwrap_or_else(|status| Answer::Failure(failure_of(&status)))),
        }
    }
}

/// Counts a stream in `wraft_pipeline_streams` for as long as its calls are read.
struct OpenStream;

impl OpenStream {
    fn counted() -> Self {
        crate::metrics::METRICS.pipeline_streams.inc();
        OpenStream
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        crate::metrics::METRICS.pipeline_streams.dec();
    }
}

/// The request a unary call would have carried: the body and the stream's token.
fn as_request<T>(body: T, authorization: Option<MetadataValue<Ascii>>) -> Request<T> {
    let mut request = Request::new(body);
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert(crate::auth::AUTHORIZATION_KEY, value);
    }
    request
}

/// A status as a pipeline answer, with its outcome (a status from this node always has one).
pub fn failure_of(status: &Status) -> CallFailure {
    CallFailure {
        code: status.code() as i32,
        message: status.message().to_string(),
        outcome: Outcome::of_status(status)
            .map(|o| o.as_str().to_string())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_takes_a_unit_per_4_kib_within_the_whole_budget() {
        assert_eq!(units_of(0), 1);
        assert_eq!(units_of(300), 1);
        assert_eq!(units_of(4096), 1);
        assert_eq!(units_of(4097), 2);
        assert_eq!(units_of(1 << 20), 256);
        // Larger than the whole budget (up to the 9 MiB message limit): all of it, never more,
        // or its wait would never end.
        assert_eq!(units_of(9 << 20), MAX_IN_FLIGHT);
        assert_eq!(units_of(usize::MAX), MAX_IN_FLIGHT);
    }
}
