//! `wraft exec --stdin`: every line of standard input is a command, sent on one `Pipeline`
//! stream with up to `--in-flight` at once; the outputs are printed one line each, in input
//! order, and the errors on stderr with their line numbers.
//!
//! The exit code sums the lines up like `wraft exec` does one: 0 if every command was applied
//! and answered, 4 if any may have been applied without an answer (a broken stream, a timeout),
//! else 3 if any failed (refused, or the module's own error).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use wraft_proto::client::pipeline_request::Call;
use wraft_proto::client::pipeline_response::Answer;
use wraft_proto::client::{exec_response, ExecRequest, PipelineRequest, PipelineResponse};

use super::{EXIT_DEFINITE, EXIT_INDETERMINATE};
use crate::client::Client;

/// How much longer than one call's timeout the CLI waits for the next answer before it gives
/// up on the stream (the node answers every call within its own request timeout).
const ANSWER_SLACK: Duration = Duration::from_secs(5);

pub async fn run(client: Client, tenant: String, in_flight: usize) -> ExitCode {
    let (calls, outgoing) = mpsc::channel(in_flight);
    let mut answers = match client.pipeline(ReceiverStream::new(outgoing)).await {
        Ok(answers) => answers,
        Err(err) => return super::fail(&err, true),
    };
    // The reader takes a slot per line it sends; each answer gives one back.
    let slots = Arc::new(Semaphore::new(in_flight));
    let sent = Arc::new(AtomicU64::new(0));
    let reader = tokio::spawn(send_lines(tenant, calls, slots.clone(), sent.clone()));
    let wait = client.request_timeout() + ANSWER_SLACK;
    let mut report = Report::default();
    let broken = loop {
        match tokio::time::timeout(wait, answers.message()).await {
            Ok(Ok(Some(answer))) => {
                slots.add_permits(1);
                report.take(answer);
            }
            Ok(Ok(None)) => break None,
            Ok(Err(status)) => break Some(format!("the stream broke: {}", status.message())),
            Err(_) => break Some(format!("no answer came within {wait:?}")),
        }
    };
    let read = if broken.is_some() {
        reader.abort();
        Ok(())
    } else {
        reader
            .await
            .unwrap_or_else(|e| Err(format!("the reader stopped: {e}")))
    };
    report.finish(sent.load(Ordering::Acquire), broken.as_deref());
    if let Err(err) = &read {
        eprintln!(
            "error: {err}; the lines after {} were not sent",
            report.last
        );
        report.definite += 1;
    }
    report.exit_code()
}

/// Sends each line of standard input as a command, waiting for a free slot before reading the
/// next; ends (closing our side of the stream) at the end of the input.
async fn send_lines(
    tenant: String,
    calls: mpsc::Sender<PipelineRequest>,
    slots: Arc<Semaphore>,
    sent: Arc<AtomicU64>,
) -> Result<(), String> {
    // Bytes, not text: a command is bytes to the module.
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).split(b'\n');
    let mut id = 0;
    loop {
        match slots.acquire().await {
            Ok(slot) => slot.forget(),
            Err(_) => return Ok(()),
        }
        let Some(mut line) = lines
            .next_segment()
            .await
            .map_err(|e| format!("reading standard input: {e}"))?
        else {
            return Ok(());
        };
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        id += 1;
        let call = PipelineRequest {
            id,
            call: Some(Call::Exec(ExecRequest {
                tenant: tenant.clone(),
                command: line,
                client_id: String::new(),
                seq: 0,
            })),
        };
        if calls.send(call).await.is_err() {
            // The stream is gone; the answer loop reports why.
            return Ok(());
        }
        sent.store(id, Ordering::Release);
    }
}

/// The answers so far: printed in input order as the gaps fill, and counted.
#[derive(Default)]
struct Report {
    /// The last line printed (lines are numbered from 1).
    last: u64,
    /// Answered lines not printed yet: their output, or `None` for a failed line.
    waiting: BTreeMap<u64, Option<Vec<u8>>>,
    definite: u64,
    indeterminate: u64,
}

impl Report {
    /// Takes one answer: its error goes to stderr now, its output waits for its turn.
    fn take(&mut self, response: PipelineResponse) {
        let line = response.id;
        let output = match response.answer {
            Some(Answer::Exec(resp)) => match resp.outcome {
                Some(exec_response::Outcome::Output(out)) => Some(out),
                Some(exec_response::Outcome::Error(err)) => {
                    let kind = wraft_proto::client::module_error::Kind::try_from(err.kind)
                        .map(|k| k.as_str_name().to_ascii_lowercase())
                        .unwrap_or_else(|_| format!("kind {}", err.kind));
                    eprintln!("line {line}: error ({kind}): {}", err.message);
                    self.definite += 1;
                    None
                }
                None => {
                    eprintln!("line {line}: the node sent an empty answer");
                    self.indeterminate += 1;
                    None
                }
            },
            Some(Answer::Failure(f)) => {
                let code = tonic::Code::from_i32(f.code);
                if f.outcome == "definite" {
                    eprintln!("line {line}: error ({code:?}, not applied): {}", f.message);
                    self.definite += 1;
                } else {
                    eprintln!(
                        "line {line}: error ({code:?}, may have been applied): {}",
                        f.message
                    );
                    self.indeterminate += 1;
                }
                None
            }
            other => {
                eprintln!("line {line}: the node sent an answer of the wrong kind: {other:?}");
                self.indeterminate += 1;
                None
            }
        };
        self.waiting.insert(line, output);
        while let Some(output) = self.waiting.remove(&(self.last + 1)) {
            self.last += 1;
            print_line(output.as_deref());
        }
    }

    /// Prints what is left once the stream has ended: answered lines in order, and a line for
    /// each of the `sent` lines that got no answer. After a clean end those were never read by
    /// the node (it answers every call it reads before ending the stream): not applied.
    /// After a broken stream they may have been.
    fn finish(&mut self, sent: u64, broken: Option<&str>) {
        let end = sent.max(self.waiting.keys().next_back().copied().unwrap_or(0));
        for line in self.last + 1..=end {
            match self.waiting.remove(&line) {
                Some(output) => print_line(output.as_deref()),
                None => {
                    print_line(None);
                    match broken {
                        Some(why) => {
                            eprintln!("line {line}: no answer, may have been applied: {why}");
                            self.indeterminate += 1;
                        }
                        None => {
                            eprintln!(
                                "line {line}: not applied: the node ended the stream first \
                                 (stopping?)"
                            );
                            self.definite += 1;
                        }
                    }
                }
            }
            self.last = line;
        }
    }

    fn exit_code(&self) -> ExitCode {
        if self.indeterminate > 0 {
            ExitCode::from(EXIT_INDETERMINATE)
        } else if self.definite > 0 {
            ExitCode::from(EXIT_DEFINITE)
        } else {
            ExitCode::SUCCESS
        }
    }
}

/// A line of output: the module's (as `wraft exec` prints it), or an empty line for a failed
/// command, so that output line N is always input line N's.
fn print_line(output: Option<&[u8]>) {
    match output {
        Some(out) => super::print_output(out),
        None => println!(),
    }
}
