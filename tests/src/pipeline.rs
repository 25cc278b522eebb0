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
