//! `etcd-bench`: the closed-loop load of `wraft bench`, against etcd v3.
//!
//! Same shape as `wraft bench` so that the two can be compared: N request loops share M
//! long-lived gRPC channels (tonic, HTTP/2), channel `i` goes to endpoint `i % len(endpoints)`,
//! each loop sends a Put of a random key `k0..k{keys-1}` with a value of `--value-size` random
//! alphanumeric bytes (or a Range of one key) and waits for the answer before the next; latency
//! per request into an HDR histogram; throughput is successful requests per second of wall
//! time; failures are counted by kind, never fatal. Channels use wraft's socket wrapper
//! (`host/src/coalesce.rs`), as `wraft bench` does. `--json` prints the same fields as
//! `wraft bench --json` (config, fsync_probe, elapsed_s, ops, ok, ops_per_s, writes, reads).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

// The same socket wrapper as `wraft bench`'s channels (one source file, so the two clients
// cannot drift apart): a load generator's writes of one scheduler pass leave together.
#[allow(dead_code)]
#[path = "../../../host/src/coalesce.rs"]
mod coalesce;

mod pb {
    tonic::include_proto!("etcdserverpb");
}
use pb::kv_client::KvClient;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    /// etcd's default: ReadIndex through the leader.
    Linearizable,
    /// `serializable`: the member asked answers from its own state.
    Serializable,
}

#[derive(clap::Parser, Debug)]
#[command(about = "Closed-loop Put/Range load against etcd v3, shaped like `wraft bench`")]
struct Args {
    /// Comma-separated HOST:PORT client URLs of the members.
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    #[arg(long, default_value_t = 16)]
    clients: u64,
    /// gRPC channels the loops share; default min(clients, 8) as in `wraft bench`.
    #[arg(long)]
    connections: Option<u64>,
    /// Threads of the generator (default: one per core), as `wraft bench --threads`.
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, conflicts_with = "duration")]
    ops: Option<u64>,
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    #[arg(long, default_value_t = 0.0)]
    read_ratio: f64,
    #[arg(long, value_enum, default_value = "linearizable")]
    consistency: Level,
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    timeout: f64,
    /// Append + fdatasync a 4 KiB block 200 times in DIR before the run (as `wraft bench`).
    #[arg(long, value_name = "DIR")]
    fsync_probe: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy)]
enum Stop {
    Ops(u64),
    Deadline(Instant),
}

struct Load {
    keys: u64,
    value_size: usize,
    pool: Vec<u8>,
    read_ratio: f64,
    serializable: bool,
    timeout: Duration,
    stop: Stop,
    issued: std::sync::atomic::AtomicU64,
}

impl Load {
    fn take_ticket(&self) -> bool {
        match self.stop {
            Stop::Ops(n) => {
                self.issued
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    < n
            }
            Stop::Deadline(at) => Instant::now() < at,
        }
    }
}

struct Tally {
    latency: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, (u64, String)>,
}

impl Tally {
    fn new() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .unwrap_or_else(|e| panic!("histogram bounds are constants: {e}")),
            ok: 0,
            errors: BTreeMap::new(),
        }
    }

    fn failed(&self) -> u64 {
        self.errors.values().map(|(n, _)| n).sum()
    }

    fn merge(&mut self, other: Tally) {
        let _ = self.latency.add(&other.latency);
        self.ok += other.ok;
        for (kind, (n, message)) in other.errors {
            self.errors.entry(kind).or_insert((0, message)).0 += n;
        }
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

/// The runtime is built as `wraft bench` builds its own (`--threads`), so that both generators
/// take the same kind of share of the machine they measure.
fn main() -> ExitCode {
    let args = <Args as clap::Parser>::parse();
    let runtime = match args.threads {
        Some(1) => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n.max(1))
            .enable_all()
            .build(),
        None => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> Result<ExitCode, String> {
    let connections = args.connections.unwrap_or(args.clients.min(8)).max(1);
    let fsync = match &args.fsync_probe {
        Some(dir) => Some(fsync_probe(dir)?),
        None => None,
    };
    let mut channels = Vec::new();
    for i in 0..connections as usize {
        let endpoint = &args.endpoints[i % args.endpoints.len()];
        let channel = Endpoint::from_shared(format!("http://{endpoint}"))
            .map_err(|e| format!("{endpoint}: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .connect_with_connector(coalesce::CoalescedConnector)
            .await
            .map_err(|e| format!("connect to {endpoint}: {e}"))?;
        channels.push(KvClient::new(channel));
    }
    let stop = match args.duration {
        Some(secs) => Stop::Deadline(Instant::now() + Duration::from_secs_f64(secs)),
        None => Stop::Ops(args.ops.unwrap_or(10_000)),
    };
    let mut rng = rand::rng();
    let load = Arc::new(Load {
        keys: args.keys.max(1),
        value_size: args.value_size,
        pool: (0..args.value_size * 2)
            .map(|_| rng.sample(rand::distr::Alphanumeric))
            .collect(),
        read_ratio: args.read_ratio,
        serializable: args.consistency == Level::Serializable,
        timeout: Duration::from_secs_f64(args.timeout),
        stop,
        issued: std::sync::atomic::AtomicU64::new(0),
    });
    let start = Instant::now();
    let mut loops = Vec::new();
    for i in 0..args.clients {
        let client = channels[(i % connections) as usize].clone();
        let rng = SmallRng::from_rng(&mut rand::rng());
        loops.push(tokio::spawn(request_loop(client, load.clone(), rng)));
    }
    let (mut reads, mut writes) = (Tally::new(), Tally::new());
    for handle in loops {
        let (r, w) = handle
            .await
            .map_err(|e| format!("a request loop stopped: {e}"))?;
        reads.merge(r);
        writes.merge(w);
    }
    let secs = start.elapsed().as_secs_f64();
    let ok = reads.ok + writes.ok;
    let done = ok + reads.failed() + writes.failed();
    let report = json!({
        "config": {
            "target": "etcd",
            "endpoints": args.endpoints,
            "clients": args.clients,
            "connections": connections,
            "threads": args.threads,
            "duration_s": args.duration,
            "keys": args.keys,
            "value_size": args.value_size,
            "read_ratio": args.read_ratio,
            "consistency": format!("{:?}", args.consistency).to_ascii_lowercase(),
            "timeout_s": args.timeout,
        },
        "fsync_probe": fsync,
        "elapsed_s": secs,
        "ops": done,
        "ok": ok,
        "ops_per_s": ok as f64 / secs,
        "writes": writes.to_json(secs),
        "reads": reads.to_json(secs),
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    }
    Ok(if done > 0 && ok == 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

async fn request_loop(
    mut client: KvClient<Channel>,
    load: Arc<Load>,
    mut rng: SmallRng,
) -> (Tally, Tally) {
    let (mut reads, mut writes) = (Tally::new(), Tally::new());
    while load.take_ticket() {
        let is_read = rng.random::<f64>() < load.read_ratio;
        let key = format!("k{}", rng.random_range(0..load.keys)).into_bytes();
        let started = Instant::now();
        let result = if is_read {
            let mut req = tonic::Request::new(pb::RangeRequest {
                key,
                serializable: load.serializable,
                ..Default::default()
            });
            req.set_timeout(load.timeout);
            tokio::time::timeout(load.timeout, client.range(req))
                .await
                .map(|r| r.map(|_| ()))
        } else {
            let at = rng.random_range(0..=load.value_size);
            let mut req = tonic::Request::new(pb::PutRequest {
                key,
                value: load.pool[at..at + load.value_size].to_vec(),
                ..Default::default()
            });
            req.set_timeout(load.timeout);
            tokio::time::timeout(load.timeout, client.put(req))
                .await
                .map(|r| r.map(|_| ()))
        };
        let micros = started.elapsed().as_micros();
        let tally = if is_read { &mut reads } else { &mut writes };
        match result {
            Ok(Ok(())) => {
                tally.ok += 1;
                tally
                    .latency
                    .saturating_record(u64::try_from(micros).unwrap_or(u64::MAX));
            }
            Ok(Err(status)) => {
                let kind = format!("grpc:{:?}", status.code());
                tally
                    .errors
                    .entry(kind)
                    .or_insert((0, status.message().to_string()))
                    .0 += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => {
                tally
                    .errors
                    .entry("timeout".into())
                    .or_insert((0, format!("no answer within {:?}", load.timeout)))
                    .0 += 1;
            }
        }
    }
    (reads, writes)
}

/// The probe of `wraft bench --fsync-probe`: 200 appends of 4 KiB, each followed by fdatasync.
fn fsync_probe(dir: &Path) -> Result<serde_json::Value, String> {
    const SAMPLES: usize = 200;
    let path = dir.join(format!(".etcd-bench-fsync-probe-{}", std::process::id()));
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
    let _ = std::fs::remove_file(&path);
    result.map_err(|e| format!("fsync probe in {}: {e}", dir.display()))?;
    micros.sort_unstable();
    let at = |q: f64| micros[((micros.len() - 1) as f64 * q) as usize];
    Ok(json!({
        "dir": dir.display().to_string(),
        "samples": SAMPLES,
        "median_us": at(0.5),
        "p90_us": at(0.9),
        "max_us": at(1.0),
    }))
}
