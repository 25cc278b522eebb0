//! wraft: a Raft cluster whose replicated state machines are WebAssembly modules.
//!
//! A client's command travels: client → [`service`] (validate, forward to the leader) →
//! [`raft_loop`] (propose, replicate, persist through [`storage`]) → [`apply`] (feed the
//! committed entry to the tenant's module in [`wasm`]) → back to the waiting client with the
//! module's own output.
//!
//! Layout:
//! - [`node`]: starts a node: storage, the two threads, the gRPC server, shutdown.
//! - [`raft_loop`]: the thread that owns raft-rs's `RawNode` and handles every `Ready`.
//! - [`apply`]: the thread that applies committed entries to tenants and answers waiters.
//! - [`wasm`]: the deterministic sandbox that runs a tenant's module.
//! - [`storage`]: RocksDB: the raft log and hard state, checkpoints, modules.
//! - [`transport`]: raft messages between nodes, batched on one stream per peer, validated.
//! - [`service`]: the client gRPC API.
//! - [`tls`]: PEM files into TLS configurations; which certificates may speak for a peer.
//! - [`envelope`]: the versioned format of log entries; proposal ids.
//! - [`client`]: a client with endpoint failover (CLI, tests, benchmarks).
//! - [`coalesce`]: the socket wrapper that lets one write carry many HTTP/2 frames.
//! - [`cli`]: the `wraft` command line.
//! - [`error`], [`limits`], [`logging`], [`metrics`]: what can fail, how big things may be,
//!   what is logged and measured.

pub mod apply;
pub mod auth;
pub mod cli;
pub mod client;
pub mod coalesce;
pub mod crashpoint;
pub mod envelope;
pub mod error;
pub mod limits;
pub mod logging;
pub mod members;
pub mod metrics;
pub mod node;
pub mod raft_loop;
pub mod service;
pub mod snapshot;
pub mod storage;
pub mod tls;
pub mod transport;
/// The deterministic sandbox lives in its own crate (`sandbox/`) so fuzz targets build it alone.
pub use wraft_sandbox as wasm;

pub use apply::Applied;
pub use error::Error;
