//! Prometheus metrics: every collector the node exports, defined in one place, and the
//! `/metrics` endpoint that serves them in the text format on a port of its own.
//!
//! Collectors are process-global (one node per process). Recording is cheap (atomic adds), so
//! the Raft loop and the apply stage record directly; per-tenant and per-peer series are
//! labelled by tenant name and peer id.

use std::net::SocketAddr;
use std::sync::{LazyLock, Mutex, OnceLock};
use std::time::Instant;

use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every collector, registered in [`Metrics::registry`].
pub struct Metrics {
    pub registry: Registry,
    // Raft
    pub term: IntGauge,
    pub is_leader: IntGauge,
    pub commit_index: IntGauge,
    pub applied_index: IntGauge,
    pub proposals: IntCounter,
    pub proposals_dropped: IntCounter,
    pub entries_proposed: IntCounter,
    pub forwarded: IntCounterVec,
    pub read_index_seconds: HistogramVec,
    pub lease_reads: IntCounterVec,
    pub leader_changes: IntCounter,
    // Storage
    pub storage_write_seconds: HistogramVec,
    pub log_last_index: IntGauge,
    pub log_entries: IntGauge,
    pub snapshot_index: IntGauge,
    pub snapshots_sent: IntCounter,
    pub snapshots_installed: IntCounter,
    // Wasm, per tenant
    pub applies: IntCounterVec,
    pub traps: IntCounterVec,
    pub fuel_used: IntCounterVec,
    pub apply_seconds: HistogramVec,
    pub tenant_memory_bytes: IntGaugeVec,
    pub checkpoints: IntCounterVec,
    pub checkpoint_bytes: IntCounterVec,
    pub checkpoint_seconds: HistogramVec,
    pub trap_recovery_seconds: HistogramVec,
    // Wasm, per process: copied from the runtime's own counters at scrape time
    pub wasm_compilations: IntCounter,
    pub wasm_compile_cache_hits: IntCounter,
    // gRPC
    pub grpc_requests: IntCounterVec,
    pub grpc_seconds: HistogramVec,
    pub pipeline_streams: IntGauge,
    // Transport
    pub peer_messages_sent: IntCounterVec,
    pub peer_bytes_sent: IntCounterVec,
    pub peer_messages_received: IntCounterVec,
    pub peer_reconnects: IntCounterVec,
    pub peer_messages_dropped: IntCounterVec,
}

fn latency(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    // 50 µs to ~26 s: fsyncs at the bottom, stalled elections at the top.
    let buckets = exponential_buckets(0.00005, 2.0, 20).unwrap_or_default();
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

fn counters(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

impl Metrics {
    // The panics above can only fire on a malformed metric definition in this file (a bad name,
    // duplicate labels): a programming error caught by the first test that touches metrics,
    // never by input.
    fn new() -> Self {
        let m = Metrics {
            registry: Registry::new_custom(Some("wraft".into()), None).unwrap_or_default(),
            term: gauge("raft_term", "Current raft term."),
            is_leader: gauge("raft_is_leader", "1 when this node is the leader."),
            commit_index: gauge("raft_commit_index", "Highest log index known committed."),
            applied_index: gauge(
                "raft_applied_index",
                "Highest log index applied to tenants.",
            ),
            proposals: counter(
                "raft_proposals_total",
                "Ops proposed by this node as leader.",
            ),
            proposals_dropped: counter(
                "raft_proposals_dropped_total",
                "Ops raft refused to propose (not leader, transfer).",
            ),
            entries_proposed: counter(
                "raft_entries_proposed_total",
                "Log entries proposed (each packs one or more ops).",
            ),
            forwarded: counters(
                "requests_forwarded_total",
                "Requests a follower forwarded to the leader.",
                &["method"],
            ),
            read_index_seconds: latency(
                "read_index_seconds",
                "Time to confirm leadership for a linearizable read.",
                &["result"],
            ),
            lease_reads: counters(
                "lease_reads_total",
                "Lease reads on the leader: served within the lease, or fallen back to ReadIndex.",
                &["result"],
            ),
            leader_changes: counter(
                "raft_role_changes_total",
                "Changes of this node's raft role or term.",
            ),
            storage_write_seconds: latency(
                "storage_write_seconds",
                "Raft log writes (one per Ready), by whether fsync'd.",
                &["synced"],
            ),
            log_last_index: gauge(
                "storage_log_last_index",
                "Last index in the stored raft log.",
            ),
            log_entries: gauge(
                "storage_log_entries",
                "Entries in the stored raft log (after the compaction point).",
            ),
            snapshot_index: gauge(
                "storage_snapshot_index",
                "The log's compaction point: entries up to it live only in snapshots.",
            ),
            snapshots_sent: counter(
                "raft_snapshots_sent_total",
                "Snapshots this node sent to followers (as leader).",
            ),
            snapshots_installed: counter(
                "raft_snapshots_installed_total",
                "Snapshots this node downloaded and installed.",
            ),
            applies: counters(
                "wasm_applies_total",
                "Commands applied, per tenant.",
                &["tenant"],
            ),
            traps: counters(
                "wasm_errors_total",
                "Applies that failed, per tenant and kind.",
                &["tenant", "kind"],
            ),
            fuel_used: counters(
                "wasm_fuel_used_total",
                "Fuel burnt by applies, per tenant.",
                &["tenant"],
            ),
            apply_seconds: latency(
                "wasm_apply_seconds",
                "Time of one apply call, per tenant.",
                &["tenant"],
            ),
            tenant_memory_bytes: IntGaugeVec::new(
                Opts::new("wasm_memory_bytes", "Linear memory of a tenant's instance."),
                &["tenant"],
            )
            .unwrap_or_else(|e| panic!("metric wasm_memory_bytes: {e}")),
            checkpoints: counters(
                "tenant_checkpoints_total",
                "Checkpoints written, per tenant (memory model: the whole state each time).",
                &["tenant"],
            ),
            checkpoint_bytes: counters(
                "tenant_checkpoint_bytes_total",
                "Bytes of checkpoints written, per tenant.",
                &["tenant"],
            ),
            checkpoint_seconds: latency(
                "tenant_checkpoint_seconds",
                "Time of a memory-model checkpoint on the apply thread, by phase: the module's \
                 snapshot, then encoding and writing the record (waiting for a flush included).",
                &["phase"],
            ),
            trap_recovery_seconds: latency(
                "trap_recovery_seconds",
                "Time the apply thread spent recovering a memory-model tenant from a trapped \
                 command: the rebuild, and the snapshot kept for the next one. What a tenant's \
                 trap budget is charged.",
                &[],
            ),
            wasm_compilations: counter(
                "wasm_compilations_total",
                "Modules compiled (not found in the module cache).",
            ),
            wasm_compile_cache_hits: counter(
                "wasm_compile_cache_hits_total",
                "Modules loaded from the module cache instead of compiled.",
            ),
            grpc_requests: counters(
                "grpc_requests_total",
                "Client API requests by method and status code.",
                &["method", "code"],
            ),
            grpc_seconds: latency(
                "grpc_request_seconds",
                "Client API latency by method.",
                &["method"],
            ),
            pipeline_streams: gauge(
                "pipeline_streams",
                "Client `Pipeline` streams open on this node (their calls are counted in \
                 grpc_requests_total as pipeline_exec and pipeline_query).",
            ),
            peer_messages_sent: counters(
                "peer_messages_sent_total",
                "Raft messages sent, per peer.",
                &["peer"],
            ),
            peer_bytes_sent: counters(
                "peer_bytes_sent_total",
                "Bytes of raft messages sent, per peer.",
                &["peer"],
            ),
            peer_messages_received: counters(
                "peer_messages_received_total",
                "Raft messages received, per peer.",
                &["peer"],
            ),
            peer_reconnects: counters(
                "peer_reconnects_total",
                "Streams to a peer (re)opened.",
                &["peer"],
            ),
            peer_messages_dropped: counters(
                "peer_messages_dropped_total",
                "Raft messages dropped: full queue, broken stream or invalid.",
                &["peer", "reason"],
            ),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.term.clone()),
            Box::new(m.is_leader.clone()),
            Box::new(m.commit_index.clone()),
            Box::new(m.applied_index.clone()),
            Box::new(m.proposals.clone()),
            Box::new(m.proposals_dropped.clone()),
            Box::new(m.entries_proposed.clone()),
            Box::new(m.forwarded.clone()),
            Box::new(m.read_index_seconds.clone()),
            Box::new(m.lease_reads.clone()),
            Box::new(m.leader_changes.clone()),
            Box::new(m.storage_write_seconds.clone()),
            Box::new(m.log_last_index.clone()),
            Box::new(m.log_entries.clone()),
            Box::new(m.snapshot_index.clone()),
            Box::new(m.snapshots_sent.clone()),
            Box::new(m.snapshots_installed.clone()),
            Box::new(m.applies.clone()),
            Box::new(m.traps.clone()),
            Box::new(m.fuel_used.clone()),
            Box::new(m.apply_seconds.clone()),
            Box::new(m.tenant_memory_bytes.clone()),
            Box::new(m.checkpoints.clone()),
            Box::new(m.checkpoint_bytes.clone()),
            Box::new(m.checkpoint_seconds.clone()),
            Box::new(m.trap_recovery_seconds.clone()),
            Box::new(m.wasm_compilations.clone()),
            Box::new(m.wasm_compile_cache_hits.clone()),
            Box::new(m.grpc_requests.clone()),
            Box::new(m.grpc_seconds.clone()),
            Box::new(m.pipeline_streams.clone()),
            Box::new(m.peer_messages_sent.clone()),
            Box::new(m.peer_bytes_sent.clone()),
            Box::new(m.peer_messages_received.clone()),
            Box::new(m.peer_reconnects.clone()),
            Box::new(m.peer_messages_dropped.clone()),
        ];
        for c in collectors {
            if let Err(err) = m.registry.register(c) {
                tracing::error!(%err, "registering a metric failed");
            }
        }
        m
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        self.copy_wasm_runtime_counters();
        let mut buf = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            return format!("# encoding metrics failed: {err}\n");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The node's Wasm runtime, whose compile counters `/metrics` reports.
static WASM_RUNTIME: OnceLock<crate::wasm::Runtime> = OnceLock::new();

/// Reports `runtime`'s compilations and compile-cache hits in `/metrics` (one runtime per
/// process: later calls are ignored).
pub fn watch_wasm_runtime(runtime: &crate::wasm::Runtime) {
    let _ = WASM_RUNTIME.set(runtime.clone());
}

impl Metrics {
    fn copy_wasm_runtime_counters(&self) {
        let Some(runtime) = WASM_RUNTIME.get() else {
            return;
        };
        // One scrape at a time: two at once could both add the same difference.
        static COPYING: Mutex<()> = Mutex::new(());
        let _copying = COPYING
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let stats = runtime.stats();
        let catch_up = |counter: &IntCounter, total: u64| {
            counter.inc_by(total.saturating_sub(counter.get()));
        };
        catch_up(&self.wasm_compilations, stats.compilations);
        catch_up(&self.wasm_compile_cache_hits, stats.cache_hits);
    }
}

/// Records one client API request: count by method and code, and latency.
pub fn observe_grpc<T>(method: &'static str, started: Instant, result: &Result<T, tonic::Status>) {
    let code = match result {
        Ok(_) => "Ok".to_string(),
        Err(status) => format!("{:?}", status.code()),
    };
    METRICS
        .grpc_requests
        .with_label_values(&[method, code.as_str()])
        .inc();
    METRICS
        .grpc_seconds
        .with_label_values(&[method])
        .observe(started.elapsed().as_secs_f64());
}

/// Serves `/metrics` on `addr` until `stop` resolves.
pub async fn serve(
    addr: SocketAddr,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4",
                )],
                METRICS.render(),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_and_renders() {
        // A label no other test uses: under `cargo test` every test shares this registry.
        METRICS
            .applies
            .with_label_values(&["metrics-test-only"])
            .inc();
        METRICS
            .storage_write_seconds
            .with_label_values(&["true"])
            .observe(0.001);
        let text = METRICS.render();
        assert!(
            text.contains("wraft_wasm_applies_total{tenant=\"metrics-test-only\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("wraft_storage_write_seconds_bucket"),
            "{text}"
        );
        // Nothing failed to register: every family appears once it has a sample or is a plain gauge.
        assert!(text.contains("wraft_raft_term "), "{text}");
    }
}
