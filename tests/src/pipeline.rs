//! A client of a node's `Pipeline` stream: calls go out as they are sent, answers come back in
//! the order the node finishes them, matched by the caller through their ids.

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use wraft_proto::client::pipeline_response::Answer;
use wraft_proto::client::{pipeline_request::Call, PipelineRequest, PipelineResponse};

use crate::cluster::{with_token, Client};
use crate::{within, RPC_TIMEOUT};

/// An open `Pipeline` stream.
pub struct Pipeline {
    /// `None` once [`Pipeline::close`] has ended our side.
    calls: Option<mpsc::UnboundedSender<PipelineRequest>>,
    answers: tonic::Streaming<PipelineResponse>,
    what: String,
}

impl Pipeline {
    /// Opens a stream on `client` with `token` (if any): the node's refusal, if it refuses it.
    pub async fn open(
        client: &mut Client,
        token: Option<&str>,
        what: &str,
    ) -> Result<Pipeline, tonic::Status> {
        let (calls, outgoing) = mpsc::unbounded_channel();
        let request = with_token(UnboundedReceiverStream::new(outgoing), token);
        let answers = within(
            RPC_TIMEOUT,
            &format!("opening {what}"),
            client.pipeline(request),
        )
        .await?
        .into_inner();
        Ok(Pipeline {
            calls: Some(calls),
            answers,
            what: what.to_string(),
        })
    }

    /// Sends a call without waiting for anything.
    pub fn send(&self, id: u64, call: Option<Call>) {
        let calls = self
            .calls
            .as_ref()
            .unwrap_or_else(|| panic!("{}: sending after close", self.what));
        calls
            .send(PipelineRequest { id, call })
            .unwrap_or_else(|_| panic!("{}: the stream's sender is gone", self.what));
    }

    /// Ends our side of the stream: the node answers what is in flight, then ends its side.
    pub fn close(&mut self) {
        self.calls = None;
    }

    /// The next answer (id and answer), `Ok(None)` once the node ended the stream, or the
    /// status the stream ended with. Fails the test if nothing comes within [`RPC_TIMEOUT`].
    pub async fn next(&mut self) -> Result<Option<(u64, Answer)>, tonic::Status> {
        let what = format!("{}: the next answer", self.what);
        match within(RPC_TIMEOUT, &what, self.answers.message()).await? {
            None => Ok(None),
            Some(response) => {
                let answer = response
                    .answer
                    .unwrap_or_else(|| panic!("{what}: call {} has an empty answer", response.id));
                Ok(Some((response.id, answer)))
            }
        }
    }

    /// The next answer, which must be there (not the end of the stream, not an error).
    pub async fn answer(&mut self) -> (u64, Answer) {
        match self.next().await {
            Ok(Some(answer)) => answer,
            Ok(None) => panic!("{}: the stream ended with answers owed", self.what),
            Err(status) => panic!("{}: the stream failed: {status:?}", self.what),
        }
    }

    /// Sends one call and waits for its answer (with nothing else in flight).
    pub async fn call(&mut self, id: u64, call: Call) -> Answer {
        self.send(id, Some(call));
        let (got, answer) = self.answer().await;
        assert_eq!(
            got, id,
            "{}: the answer carries another call's id",
            self.what
        );
        answer
    }
}

/// A `Pipeline` client that stands in for unary calls, one call at a time: each answer comes
/// back as the unary call's result would (a failure as a status with its `wraft-outcome`), and a
/// broken stream, or no answer within the caller's backstop, as a status without an outcome,
/// like a broken connection. The stream is then opened again for the next call. Nothing here
/// panics on a slow or dead node: fault tests use it.
pub struct PipelineCaller {
    client: Client,
    open: Option<(
        mpsc::UnboundedSender<PipelineRequest>,
        tonic::Streaming<PipelineResponse>,
    )>,
    next_id: u64,
}

impl PipelineCaller {
    pub fn new(client: Client) -> Self {
        PipelineCaller {
            client,
            open: None,
            next_id: 0,
        }
    }

    /// An `Exec` on the stream, answered as the unary `Exec` would be.
    pub async fn exec(
        &mut self,
        request: wraft_proto::client::ExecRequest,
        backstop: std::time::Duration,
    ) -> Result<tonic::Response<wraft_proto::client::ExecResponse>, tonic::Status> {
        match self.call(Call::Exec(request), backstop).await? {
            Answer::Exec(resp) => Ok(tonic::Response::new(resp)),
            other => Err(tonic::Status::internal(format!("wrong answer: {other:?}"))),
        }
    }

    /// A `Query` on the stream, answered as the unary `Query` would be.
    pub async fn query(
        &mut self,
        request: wraft_proto::client::QueryRequest,
        backstop: std::time::Duration,
    ) -> Result<tonic::Response<wraft_proto::client::QueryResponse>, tonic::Status> {
        match self.call(Call::Query(request), backstop).await? {
            Answer::Query(resp) => Ok(tonic::Response::new(resp)),
            other => Err(tonic::Status::internal(format!("wrong answer: {other:?}"))),
        }
    }

    async fn call(
        &mut self,
        call: Call,
        backstop: std::time::Duration,
    ) -> Result<Answer, tonic::Status> {
        let id = self.next_id;
        self.next_id += 1;
        let answered = tokio::time::timeout(backstop, async {
            if self.open.is_none() {
                let (calls, outgoing) = mpsc::unbounded_channel();
                let request = tonic::Request::new(UnboundedReceiverStream::new(outgoing));
                let answers = self.client.pipeline(request).await?.into_inner();
                self.open = Some((calls, answers));
            }
            let Some((calls, answers)) = self.open.as_mut() else {
                return Err(tonic::Status::unavailable("no stream"));
            };
            calls
                .send(PipelineRequest {
                    id,
                    call: Some(call),
                })
                .map_err(|_| tonic::Status::unavailable("the stream closed"))?;
            loop {
                match answers.message().await? {
                    Some(PipelineResponse {
                        id: got,
                        answer: Some(answer),
                    }) if got == id => return Ok(answer),
                    Some(PipelineResponse { id: got, .. }) if got == id => {
                        return Err(tonic::Status::internal("an empty answer"))
                    }
                    // A late answer to an earlier call (cannot happen: the stream is dropped
                    // after a timeout), skipped all the same.
                    Some(_) => continue,
                    None => return Err(tonic::Status::unavailable("the node ended the stream")),
                }
            }
        })
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer (client side)")));
        match answered {
            Ok(Answer::Failure(f)) => {
                let mut metadata = tonic::metadata::MetadataMap::new();
                if let Ok(value) = f.outcome.parse() {
                    if !f.outcome.is_empty() {
                        metadata.insert("wraft-outcome", value);
                    }
                }
                Err(tonic::Status::with_metadata(
                    tonic::Code::from_i32(f.code),
                    f.message,
                    metadata,
                ))
            }
            Ok(answer) => Ok(answer),
            Err(status) => {
                // Whatever broke, the next call starts on a fresh stream.
                self.open = None;
                Err(status)
            }
        }
    }
}
