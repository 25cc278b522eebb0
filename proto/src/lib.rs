//! wraft's wire and storage formats, generated from `proto/*.proto`.
//!
//! - [`client`]: the client API every node serves (`Wraft` service).
//! - [`peer`]: node-to-node raft traffic (`Peer` service).
//! - [`log`]: the envelope of every raft log entry and the records the apply stage persists.
//!   These are durable: fields are added, never renumbered.
//! - [`envelope`]: encoding and decoding a log entry's envelope (re-exported by the host).
//! - [`chunks`]: reassembling and checking a snapshot's records from `FetchSnapshot` chunks
//!   (re-exported by the host's `snapshot` module).
//!
//! The last two are pure and live here, not in the host, so that the fuzz targets (`fuzz/`)
//! reach them without building the node and RocksDB.

#![allow(missing_docs)]

/// The client API: `Deploy`, `Exec`, `Query`, `Status`, `Digest`.
pub mod client {
    tonic::include_proto!("wraft.v1");
}

/// Node-to-node traffic: batches of raft-rs messages on one stream per peer.
pub mod peer {
    tonic::include_proto!("wraft.peer.v1");
}

/// Durable formats: log entry envelopes, sessions and tenant checkpoints.
pub mod log {
    tonic::include_proto!("wraft.log.v1");
}

/// The version of [`log::LogEntry`] this build writes and the newest it can read.
pub const ENVELOPE_VERSION: u32 = 1;

pub mod chunks;
pub mod envelope;
