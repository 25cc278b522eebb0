//! `wraft bench`: a closed-loop load generator for a tenant running the `kv` plugin.
//!
//! It owns the load (N request loops over M long-lived gRPC channels), the measurement (one HDR
//! histogram per loop and per kind of op, merged at the end, so the hot path takes no lock) and
//! the report (text or one JSON object). It keeps two promises: it stops by itself (after
//! `--ops` requests or `--duration` seconds, every request bounded by `--timeout`), and a failed
//! request is counted by kind, never fatal.
//!
//! Channel `i` goes to endpoint `i % len(endpoints)` (falling back to the next ones if that one
//! cannot be reached), so the load is spread over every node given: stale reads are then served
//! by all of them, and writes sent to a follower pay for its forwarding to the leader, as they
//! would for a client that does not know which node leads. To measure the leader alone, pass
//! only its address.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tonic::transport::Channel;
use wraft_proto::client::wraft_client::WraftClient;
use wraft_proto::client::{
    exec_response, pipeline_request, pipeline_response, query_response, CallFailure, Consistency,
    ExecRequest, PipelineRequest, PipelineResponse, QueryRequest,
};

use super::{fail, Endpoints};
use crate::client::Client;

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum Level {
    /// Through the leader, never stale.
    Linearizable,
    /// Through the leader, without a quorum round while it holds its lease (assumes bounded
    /// clock drift); otherwise as linearizable.
    Lease,
    /// From the node asked; may lag.
    Stale,
}

/// How the request loops reach the node.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    /// One unary `Exec` or `Query` call (an HTTP/2 stream of its own) per request.
    Unary,
    /// One long-lived `Pipeline` stream per loop, a message each way per request.
    Pipeline,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    endpoints: Endpoints,
    /// The tenant to load; it must run the kv plugin (see --deploy).
    #[arg(long, default_value = "bench")]
    tenant: String,
    /// Deploy this module (the kv plugin) to the tenant before the run.
    #[arg(long, value_name = "FILE.wasm")]
    deploy: Option<PathBuf>,
    /// Concurrent request loops; each waits for its answer before sending the next request.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    clients: u64,
    /// gRPC channels (each one TCP connection) the loops share; default min(clients, 8).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    connections: Option<u64>,
    /// Threads of the load generator (default: one per core). With 1 every request loop runs
    /// on one thread and no answer waits for a thread to wake up: the truest latency for a few
    /// clients. Many clients at high rates need more, or the generator becomes the bottleneck.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    threads: Option<u64>,
    /// Stop after this many requests (default 10000 unless --duration is given).
    #[arg(long, conflicts_with = "duration", value_parser = clap::value_parser!(u64).range(1..))]
    ops: Option<u64>,
    /// Stop after this many seconds instead of a count.
    #[arg(long, value_name = "SECS", value_parser = positive_secs)]
    duration: Option<f64>,
    /// Size of the key space: keys are `k0` .. `k{N-1}`, picked uniformly at random.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
    /// Take the keys in order (k0, k1, ..., wrapping) instead of at random: with --ops equal
    /// to --keys every key is written once, to load a known amount of state.
    #[arg(long)]
    sequential_keys: bool,
    /// Bytes in each written value (at most 1 MiB, the node's limit on a command).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=crate::limits::MAX_COMMAND_BYTES as u64))]
    value_size: u64,
    /// Fraction of requests that are reads (gets); the rest are writes (puts).
    #[arg(long, default_value_t = 0.0, value_parser = ratio)]
    read_ratio: f64,
    /// Consistency of the reads.
    #[arg(long, value_enum, default_value = "linearizable")]
    consistency: Level,
    /// How each loop sends its requests: unary calls, or a `Pipeline` stream of its own
    /// (the same calls without HTTP/2 headers and a stream per request).
    #[arg(long, value_enum, default_value = "unary")]
    api: Api,
    /// Time limit of each request; a request that takes longer counts as a `timeout` error.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = positive_secs)]
    timeout: f64,
    /// Before the run, write and fdatasync a 4 KiB block 200 times in DIR and report the
    /// latency: fsync speed moves the write figures a lot on a shared machine.
    #[arg(long, value_name = "DIR")]
    fsync_probe: Option<PathBuf>,
    /// Print one JSON object instead of the table (and no progress bar).
    #[arg(long)]
    json: bool,
}

fn positive_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("`{s}` is not a number: {e}"))?;
    // The upper bound keeps `Duration::from_secs_f64` from panicking on huge values.
    if v.is_finite() && v > 0.0 && v <= 1e9 {
        Ok(v)
    } else {
        Err(format!("`{s}` must be a number of seconds above 0"))
    }
}

fn ratio(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("`{s}` is not a number: {e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("`{s}` must be between 0.0 and 1.0"))
    }
}

/// When the run ends.
#[derive(Clone, Copy)]
enum Stop {
    Ops(u64),
    Deadline(Instant),
}

/// What every request loop needs, shared read-only.
struct Load {
    tenant: String,
    /// `Bearer <token>` for every request (`--token`), when the cluster requires one.
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    keys: u64,
    /// `--sequential-keys`: the next key to take.
    next_key: Option<AtomicU64>,
    value_size: usize,
    /// Random alphanumeric text, twice `value_size` long: a value is a slice of it at a random
    /// offset, so that making one costs a copy however large it is, and all loops share it.
    pool: String,
    read_ratio: f64,
    consistency: Consistency,
    timeout: Duration,
    stop: Stop,
    /// Requests handed out so far, so that `--ops` is met exactly across the loops.
    issued: AtomicU64,
    /// Requests finished (well or not), for the progress bar's message.
    finished: AtomicU64,
}

impl Load {
    /// Attaches the token, if the run has one.
    fn authorize<T>(&self, req: &mut tonic::Request<T>) {
        if let Some(value) = &self.authorization {
            req.metadata_mut()
                .insert(crate::auth::AUTHORIZATION_KEY, value.clone());
        }
    }

    /// Whether the loop may send one more request (and counts it if so).
    fn take_ticket(&self) -> bool {
        match self.stop {
            Stop::Ops(n) => self.issued.fetch_add(1, Ordering::Relaxed) < n,
            Stop::Deadline(at) => Instant::now() < at,
        }
    }
}

/// The measurements of one kind of op (reads or writes).
struct Tally {
    /// Latency of the successful requests, in microseconds.
    latency: Histogram<u64>,
    ok: u64,
    /// Failures by kind, with the first message seen for each (to tell what went wrong).
    errors: BTreeMap<String, (u64, String)>,
}

impl Tally {
    fn new() -> Result<Self, String> {
        // 1 µs to 1 hour at 3 significant digits: every request fits (the timeout caps them).
        let latency = Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .map_err(|e| format!("cannot create a histogram: {e}"))?;
        Ok(Self {
            latency,
            ok: 0,
            errors: BTreeMap::new(),
        })
    }

    fn error(&mut self, kind: String, message: String) {
        self.errors.entry(kind).or_insert((0, message)).0 += 1;
    }

    fn failed(&self) -> u64 {
        self.errors.values().map(|(n, _)| n).sum()
    }

    fn merge(&mut self, other: Tally) -> Result<(), String> {
        self.latency
            .add(&other.latency)
            .map_err(|e| format!("cannot merge histograms: {e:?}"))?;
        self.ok += other.ok;
        for (kind, (n, message)) in other.errors {
            self.errors.entry(kind).or_insert((0, message)).0 += n;
        }
        Ok(())
    }

    fn to_json(&self, secs: f64) -> serde_json::Value {
        let h = &self.latency;
        json!({
            "ops": self.ok + self.failed(),
            "ok": self.ok,
            "errors": self.errors.iter().map(|(k, (n, msg))| (k.clone(), json!({"count": n, "example": msg}))).collect::<serde_json::Map<_, _>>(),
            "ops_per_s": self.ok as f64 / secs,
            "latency_us": if h.is_empty() { serde_json::Value::Null } else { json!({
                "p50": h.value_at_quantile(0.50),
                "p90": h.value_at_quantile(0.90),
                "p99": h.value_at_quantile(0.99),
                "p99_9": h.value_at_quantile(0.999),
                "max": h.max(),
                "mean": h.mean(),
            })},
        })
    }
}

/// What one request loop measured.
struct Tallies {
    reads: Tally,
    writes: Tally,
}

impl Args {
    /// The generator's thread count, if given (see `--threads`).
    pub fn threads(&self) -> Option<usize> {
        self.threads.map(|n| n as usize)
    }
}

pub async fn run(args: Args) -> ExitCode {
    match bench(args).await {
        Ok(code) => code,
        Err(Setup::Printed(code)) => code,
        Err(Setup::Failed { code, message }) => {
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}

/// Why the run could not start (or finish).
enum Setup {
    /// Exit with `code` after printing `message`.
    Failed { code: u8, message: String },
    /// The error is already printed (the deploy's, by [`fail`]).
    Printed(ExitCode),
}

impl Setup {
    /// A bad flag value that clap could not check (a file or folder that is not there): exit 2.
    fn usage(message: String) -> Self {
        Setup::Failed { code: 2, message }
    }

    /// No node could be reached: nothing was sent, exit 3.
    fn unreachable(message: String) -> Self {
        Setup::Failed {
            code: super::EXIT_DEFINITE,
            message,
        }
    }
}

/// Anything else (a task that stopped, a histogram that could not be made): exit 1.
impl From<String> for Setup {
    fn from(message: String) -> Self {
        Setup::Failed { code: 1, message }
    }
}

async fn bench(args: Args) -> Result<ExitCode, Setup> {
    let tls = args.endpoints.tls().map_err(Setup::Printed)?;
    let authorization = args.endpoints.authorization().map_err(Setup::Printed)?;
    let token = args.endpoints.token;
    let endpoints = args.endpoints.endpoints;
    if endpoints.is_empty() {
        return Err(Setup::usage("no endpoints given".to_string()));
    }
    let connections = args.connections.unwrap_or(args.clients.min(8));
    let value_size = usize::try_from(args.value_size)
        .map_err(|_| format!("--value-size {} is too large", args.value_size))?;

    let fsync = match &args.fsync_probe {
        Some(dir) => {
            let dir = dir.clone();
            let probe = tokio::task::spawn_blocking(move || fsync_probe(&dir))
                .await
                .map_err(|e| format!("the fsync probe stopped: {e}"))?
                .map_err(Setup::usage)?;
            Some(probe)
        }
        None => None,
    };

    if let Some(file) = &args.deploy {
        let wasm = std::fs::read(file)
            .map_err(|e| Setup::usage(format!("read {}: {e}", file.display())))?;
        let resp = Client::new(endpoints.clone())
            .with_tls(tls.clone())
            .with_token(token.as_deref())
            .map_err(|e| Setup::usage(format!("--token: {e}")))?
            .deploy(&args.tenant, wasm)
            .await
            .map_err(|e| Setup::Printed(fail(&e, true)))?;
        if !args.json {
            eprintln!("deployed {} to tenant {}", resp.module_hash, args.tenant);
        }
    }

    let mut channels = Vec::new();
    for i in 0..connections {
        channels.push(
            connect(&endpoints, i as usize, tls.as_ref())
                .await
                .map_err(Setup::unreachable)?,
        );
    }

    let stop = match args.duration {
        Some(secs) => Stop::Deadline(Instant::now() + Duration::from_secs_f64(secs)),
        None => Stop::Ops(args.ops.unwrap_or(10_000)),
    };
    let load = Arc::new(Load {
        tenant: args.tenant.clone(),
        authorization,
        keys: args.keys,
        next_key: args.sequential_keys.then(|| AtomicU64::new(0)),
        value_size,
        pool: {
            let mut rng = rand::rng();
            (0..value_size * 2)
                .map(|_| char::from(rng.sample(rand::distr::Alphanumeric)))
                .collect()
        },
        read_ratio: args.read_ratio,
        consistency: match args.consistency {
            Level::Linearizable => Consistency::Linearizable,
            Level::Lease => Consistency::Lease,
            Level::Stale => Consistency::Stale,
        },
        timeout: Duration::from_secs_f64(args.timeout),
        stop,
        issued: AtomicU64::new(0),
        finished: AtomicU64::new(0),
    });

    let bar = progress_bar(args.json, stop, args.duration)?;
    let start = Instant::now();
    let ticker = tokio::spawn(tick(bar.clone(), load.clone(), start));
    let mut loops = Vec::new();
    for i in 0..args.clients {
        let channel = channels[(i % connections) as usize].clone();
        let rng = SmallRng::from_rng(&mut rand::rng());
        loops.push(tokio::spawn(request_loop(
            channel,
            load.clone(),
            bar.clone(),
            rng,
            args.api,
        )));
    }
    let mut reads = Tally::new()?;
    let mut writes = Tally::new()?;
    for handle in loops {
        let t = handle
            .await
            .map_err(|e| format!("a request loop stopped: {e}"))??;
        reads.merge(t.reads)?;
        writes.merge(t.writes)?;
    }
    let secs = start.elapsed().as_secs_f64();
    ticker.abort();
    bar.finish_and_clear();

    let config = json!({
        "endpoints": endpoints,
        "tenant": args.tenant,
        "clients": args.clients,
        "connections": connections,
        "threads": args.threads,
        "ops": match stop { Stop::Ops(n) => Some(n), Stop::Deadline(_) => None },
        "duration_s": args.duration,
        "keys": args.keys,
        "value_size": args.value_size,
        "read_ratio": args.read_ratio,
        "consistency": format!("{:?}", args.consistency).to_ascii_lowercase(),
        "api": format!("{:?}", args.api).to_ascii_lowercase(),
        "timeout_s": args.timeout,
    });
    let done = reads.ok + reads.failed() + writes.ok + writes.failed();
    let ok = reads.ok + writes.ok;
    if args.json {
        let report = json!({
            "config": config,
            "fsync_probe": fsync.as_ref().map(Probe::to_json),
            "elapsed_s": secs,
            "ops": done,
            "ok": ok,
            "ops_per_s": ok as f64 / secs,
            "writes": writes.to_json(secs),
            "reads": reads.to_json(secs),
        });
        println!("{report}");
    } else {
        print_report(&config, fsync.as_ref(), secs, &writes, &reads);
    }
    Ok(if done > 0 && ok == 0 {
        ExitCode::from(super::EXIT_DEFINITE)
    } else {
        ExitCode::SUCCESS
    })
}

/// Opens channel `i` to endpoint `i % n`, or to the next endpoint that answers.
async fn connect(
    endpoints: &[String],
    i: usize,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<WraftClient<Channel>, String> {
    let mut errors = Vec::new();
    for k in 0..endpoints.len() {
        let endpoint = &endpoints[(i + k) % endpoints.len()];
        match Client::connect_one_tls(endpoint, Duration::from_secs(2), tls).await {
            Ok(c) => return Ok(c),
            Err(e) => errors.push(e),
        }
    }
    Err(format!("no endpoint answered: {}", errors.join("; ")))
}

fn progress_bar(json: bool, stop: Stop, duration: Option<f64>) -> Result<ProgressBar, String> {
    if json || !std::io::stderr().is_terminal() {
        return Ok(ProgressBar::hidden());
    }
    let (len, template) = match (stop, duration) {
        (Stop::Ops(n), _) => (n, "{bar:40} {pos}/{len} ops  {elapsed}  {msg}"),
        // In time mode the bar counts milliseconds; the message counts ops.
        (Stop::Deadline(_), d) => (
            (d.unwrap_or(0.0) * 1000.0) as u64,
            "{bar:40} {elapsed}/{duration_secs}s  {msg}",
        ),
    };
    let template = template.replace(
        "{duration_secs}",
        &format!("{:.0}", duration.unwrap_or(0.0)),
    );
    let style = ProgressStyle::with_template(&template)
        .map_err(|e| format!("progress bar template: {e}"))?;
    Ok(ProgressBar::new(len).with_style(style))
}

/// Refreshes the bar's message (and, in time mode, its position) a few times a second.
async fn tick(bar: ProgressBar, load: Arc<Load>, start: Instant) {
    let mut every = tokio::time::interval(Duration::from_millis(200));
    loop {
        every.tick().await;
        let n = load.finished.load(Ordering::Relaxed);
        let secs = start.elapsed().as_secs_f64();
        if let Stop::Deadline(_) = load.stop {
            bar.set_position(start.elapsed().as_millis() as u64);
        }
        bar.set_message(format!("{n} done, {:.0} ops/s", n as f64 / secs.max(1e-3)));
    }
}

/// How long a request loop waits after a failed request before sending the next one.
const ERROR_PAUSE: Duration = Duration::from_millis(20);

/// One closed loop: send a request, wait for its answer (or the timeout), record, repeat.
async fn request_loop(
    client: WraftClient<Channel>,
    load: Arc<Load>,
    bar: ProgressBar,
    mut rng: SmallRng,
    api: Api,
) -> Result<Tallies, String> {
    let mut t = Tallies {
        reads: Tally::new()?,
        writes: Tally::new()?,
    };
    let mut caller = Caller {
        client,
        pipe: None,
        api,
    };
    let counts_by_bar = matches!(load.stop, Stop::Ops(_));
    while load.take_ticket() {
        let is_read = rng.random::<f64>() < load.read_ratio;
        let key = match &load.next_key {
            Some(next) => next.fetch_add(1, Ordering::Relaxed) % load.keys,
            None => rng.random_range(0..load.keys),
        };
        let started = Instant::now();
        let result = if is_read {
            caller.read(&load, key).await
        } else {
            let at = rng.random_range(0..=load.value_size);
            let value = &load.pool[at..at + load.value_size];
            caller.write(&load, key, value).await
        };
        let micros = started.elapsed().as_micros();
        let tally = if is_read { &mut t.reads } else { &mut t.writes };
        match result {
            Ok(()) => {
                tally.ok += 1;
                tally
                    .latency
                    .saturating_record(u64::try_from(micros).unwrap_or(u64::MAX));
            }
            Err((kind, message)) => {
                tally.error(kind, message);
                // A dead node fails a request in microseconds (connection refused); without a
                // pause its loops would spin and take the CPU the surviving nodes need.
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
        load.finished.fetch_add(1, Ordering::Relaxed);
        if counts_by_bar {
            bar.inc(1);
        }
    }
    Ok(t)
}

/// A failed request: its kind (for counting) and the message (for the report).
type Failure = (String, String);

/// One loop's way to the node: unary calls on its channel, or its own `Pipeline` stream on it.
struct Caller {
    client: WraftClient<Channel>,
    /// The open stream (`--api pipeline`); opened on first use, and again after it broke.
    pipe: Option<Pipe>,
    api: Api,
}

/// A loop's `Pipeline` stream: where its calls go, where their answers come from.
struct Pipe {
    calls: tokio::sync::mpsc::Sender<PipelineRequest>,
    answers: tonic::Streaming<PipelineResponse>,
    next_id: u64,
}

impl Caller {
    async fn write(&mut self, load: &Load, key: u64, value: &str) -> Result<(), Failure> {
        // The key is `k` and digits and the value is alphanumeric, so neither needs JSON
        // escaping.
        let command = format!(r#"{{"op":"put","key":"k{key}","value":"{value}"}}"#).into_bytes();
        let req = ExecRequest {
            tenant: load.tenant.clone(),
            command,
            client_id: String::new(),
            seq: 0,
        };
        let outcome = match self.api {
            Api::Unary => unary(load, req, |r| self.client.exec(r)).await?.outcome,
            Api::Pipeline => match self
                .pipelined(load, pipeline_request::Call::Exec(req))
                .await?
            {
                pipeline_response::Answer::Exec(resp) => resp.outcome,
                other => return Err(wrong_answer(&other)),
            },
        };
        match outcome {
            Some(exec_response::Outcome::Output(_)) => Ok(()),
            Some(exec_response::Outcome::Error(e)) => Err(module_failure(&e)),
            None => Err(empty_answer()),
        }
    }

    async fn read(&mut self, load: &Load, key: u64) -> Result<(), Failure> {
        let query = format!(r#"{{"op":"get","key":"k{key}"}}"#).into_bytes();
        let req = QueryRequest {
            tenant: load.tenant.clone(),
            query,
            consistency: load.consistency as i32,
        };
        let outcome = match self.api {
            Api::Unary => unary(load, req, |r| self.client.query(r)).await?.outcome,
            Api::Pipeline => match self
                .pipelined(load, pipeline_request::Call::Query(req))
                .await?
            {
                pipeline_response::Answer::Query(resp) => resp.outcome,
                other => return Err(wrong_answer(&other)),
            },
        };
        match outcome {
            Some(query_response::Outcome::Output(_)) => Ok(()),
            Some(query_response::Outcome::Error(e)) => Err(module_failure(&e)),
            None => Err(empty_answer()),
        }
    }

    /// Sends one call on the loop's stream (opening it if need be) and waits for its answer,
    /// all within the request's timeout. A late answer to a call that timed out is skipped
    /// when it arrives. A broken stream fails the call and is opened again for the next one.
    async fn pipelined(
        &mut self,
        load: &Load,
        call: pipeline_request::Call,
    ) -> Result<pipeline_response::Answer, Failure> {
        let deadline = tokio::time::Instant::now() + load.timeout;
        let answer = tokio::time::timeout_at(deadline, async {
            if self.pipe.is_none() {
                self.pipe = Some(open_pipe(&mut self.client, load).await?);
            }
            let Some(pipe) = self.pipe.as_mut() else {
                return Err(empty_answer());
            };
            let id = pipe.next_id;
            pipe.next_id += 1;
            let sent = pipe.calls.send(PipelineRequest {
                id,
                call: Some(call),
            });
            if sent.await.is_err() {
                return Err(broken_pipe(
                    "the stream closed before the call was sent".into(),
                ));
            }
            loop {
                match pipe.answers.message().await {
                    Ok(Some(answer)) if answer.id == id => {
                        return answer.answer.ok_or_else(empty_answer);
                    }
                    // The answer to an earlier call that timed out here.
                    Ok(Some(_)) => continue,
                    Ok(None) => return Err(broken_pipe("the node ended the stream".into())),
                    Err(status) => return Err(status_failure(&status)),
                }
            }
        })
        .await
        .unwrap_or_else(|_| Err(timed_out(load.timeout)));
        match answer {
            Ok(pipeline_response::Answer::Failure(f)) => Err(call_failure(&f)),
            Ok(answer) => Ok(answer),
            Err(failure) => {
                // Whatever broke (or timed out while opening), the next call starts afresh,
                // unless only this call's answer was late.
                if failure.0 != "timeout" {
                    self.pipe = None;
                }
                Err(failure)
            }
        }
    }
}

/// One unary call with the run's token and timeout.
async fn unary<Req, Resp, Fut>(
    load: &Load,
    body: Req,
    call: impl FnOnce(tonic::Request<Req>) -> Fut,
) -> Result<Resp, Failure>
where
    Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
{
    let mut req = tonic::Request::new(body);
    req.set_timeout(load.timeout);
    load.authorize(&mut req);
    match tokio::time::timeout(load.timeout, call(req)).await {
        Err(_) => Err(timed_out(load.timeout)),
        Ok(Err(status)) => Err(status_failure(&status)),
        Ok(Ok(resp)) => Ok(resp.into_inner()),
    }
}

/// Opens a `Pipeline` stream on the loop's channel, with the run's token.
async fn open_pipe(client: &mut WraftClient<Channel>, load: &Load) -> Result<Pipe, Failure> {
    let (calls, outgoing) = tokio::sync::mpsc::channel(1);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outgoing));
    load.authorize(&mut req);
    let answers = client
        .pipeline(req)
        .await
        .map_err(|status| status_failure(&status))?
        .into_inner();
    Ok(Pipe {
        calls,
        answers,
        next_id: 0,
    })
}

fn broken_pipe(message: String) -> Failure {
    ("broken_stream".into(), message)
}

fn empty_answer() -> Failure {
    (
        "empty_answer".into(),
        "the node sent an empty answer".into(),
    )
}

fn wrong_answer(answer: &pipeline_response::Answer) -> Failure {
    (
        "wrong_answer".into(),
        format!("the node answered a call with the wrong kind of answer: {answer:?}"),
    )
}

/// A failed pipeline call, counted as its unary call's status would be.
fn call_failure(f: &CallFailure) -> Failure {
    let code = snake_case(&format!("{:?}", tonic::Code::from_i32(f.code)));
    let kind = if f.outcome.is_empty() {
        format!("grpc:{code}")
    } else {
        format!("grpc:{code} ({})", f.outcome)
    };
    (kind, f.message.clone())
}

fn timed_out(after: Duration) -> Failure {
    (
        "timeout".into(),
        format!("no answer within {after:?} (client side)"),
    )
}

/// Kind `grpc:<code>`, e.g. `grpc:unavailable`, with the outcome for a code that carries one.
fn status_failure(status: &tonic::Status) -> Failure {
    let code = snake_case(&format!("{:?}", status.code()));
    let kind = match crate::error::Outcome::of_status(status) {
        Some(outcome) => format!("grpc:{code} ({})", outcome.as_str()),
        None => format!("grpc:{code}"),
    };
    (kind, status.message().to_string())
}

fn module_failure(err: &wraft_proto::client::ModuleError) -> Failure {
    let kind = wraft_proto::client::module_error::Kind::try_from(err.kind)
        .map(|k| k.as_str_name().to_ascii_lowercase())
        .unwrap_or_else(|_| format!("kind_{}", err.kind));
    (format!("module:{kind}"), err.message.clone())
}

fn snake_case(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Latency of write + fdatasync of a 4 KiB block, in microseconds.
struct Probe {
    dir: PathBuf,
    samples: usize,
    median: u64,
    p90: u64,
    max: u64,
}

impl Probe {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "dir": self.dir.display().to_string(),
            "samples": self.samples,
            "median_us": self.median,
            "p90_us": self.p90,
            "max_us": self.max,
        })
    }
}

/// Appends a 4 KiB block and fdatasyncs, 200 times, in a scratch file in `dir` (removed after).
/// Appending, not overwriting, because a log append (what RocksDB's WAL does) must also make the
/// new file size durable.
fn fsync_probe(dir: &Path) -> Result<Probe, String> {
    const SAMPLES: usize = 200;
    let path = dir.join(format!(".wraft-fsync-probe-{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("fsync probe: create {}: {e}", path.display()))?;
    let block = [0x5au8; 4096];
    let mut micros = Vec::with_capacity(SAMPLES);
    let result = (|| {
        for _ in 0..SAMPLES {
            let started = Instant::now();
            file.write_all(&block)?;
            file.sync_data()?;
            micros.push(started.elapsed().as_micros() as u64);
        }
        Ok::<_, std::io::Error>(())
    })();
    // Remove the scratch file whether or not the probe went through.
    let _ = std::fs::remove_file(&path);
    result.map_err(|e| format!("fsync probe in {}: {e}", dir.display()))?;
    micros.sort_unstable();
    let at = |q: f64| micros[((micros.len() - 1) as f64 * q) as usize];
    Ok(Probe {
        dir: dir.to_path_buf(),
        samples: SAMPLES,
        median: at(0.5),
        p90: at(0.9),
        max: at(1.0),
    })
}

fn ms(micros: u64) -> String {
    format!("{:.3}ms", micros as f64 / 1000.0)
}

fn print_report(
    config: &serde_json::Value,
    fsync: Option<&Probe>,
    secs: f64,
    writes: &Tally,
    reads: &Tally,
) {
    println!("config: {config}");
    if let Some(p) = fsync {
        println!(
            "fsync probe ({}, {} x 4 KiB append + fdatasync): median {}, p90 {}, max {}",
            p.dir.display(),
            p.samples,
            ms(p.median),
            ms(p.p90),
            ms(p.max)
        );
    }
    println!("elapsed: {secs:.2}s");
    println!(
        "{:<7} {:>9} {:>9} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "", "ops", "ok", "errors", "ok ops/s", "p50", "p90", "p99", "p99.9", "max"
    );
    for (name, t) in [("writes", writes), ("reads", reads)] {
        let ops = t.ok + t.failed();
        if ops == 0 {
            continue;
        }
        let h = &t.latency;
        let pct = |q: f64| {
            if h.is_empty() {
                "-".to_string()
            } else {
                ms(h.value_at_quantile(q))
            }
        };
        let max = if h.is_empty() {
            "-".to_string()
        } else {
            ms(h.max())
        };
        println!(
            "{:<7} {:>9} {:>9} {:>7} {:>10.1} {:>10} {:>10} {:>10} {:>10} {:>10}",
            name,
            ops,
            t.ok,
            t.failed(),
            t.ok as f64 / secs,
            pct(0.5),
            pct(0.9),
            pct(0.99),
            pct(0.999),
            max
        );
    }
    for (name, t) in [("writes", writes), ("reads", reads)] {
        for (kind, (n, message)) in &t.errors {
            println!("error: {name} {kind}: {n} (e.g. {message})");
        }
    }
}
