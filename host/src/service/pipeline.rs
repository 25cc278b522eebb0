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

use std::sync::Arc;

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

/// Most calls of one stream in flight at once. Past it the node stops reading the stream (HTTP/2
/// flow control then holds the client back) until a call finishes: a stream cannot queue
/// unbounded work on the node.
pub const MAX_IN_FLIGHT: usize = 1024;

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
        let (answers, stream) = mpsc::channel(MAX_IN_FLIGHT);
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
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut stopping = self.ctx.stopping.clone();
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
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
