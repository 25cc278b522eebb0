//! Decoding what arrives from outside a node's own memory: the client API's requests (and the
//! responses a client decodes), and the durable log formats every replica decodes when it
//! applies an entry or loads a checkpoint, through the same functions the node uses
//! (`prost::Message::decode`, `wraft_proto::envelope::decode`).
//!
//! The first byte picks the message, the rest is its encoding. Nothing may panic; what decodes
//! must re-encode to bytes that decode to the same message, and encode the same way again
//! (replicas that re-encode what they decoded must agree); an envelope that decodes is never
//! newer than this build.

#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use wraft_proto::client::*;
use wraft_proto::log::{LogEntry, Session, StoredOutcome, TenantCheckpoint};
use wraft_proto::{envelope, ENVELOPE_VERSION};

fn round_trip<M: Message + Default + PartialEq + Debug>(bytes: &[u8]) {
    let Ok(message) = M::decode(bytes) else {
        return;
    };
    let encoded = message.encode_to_vec();
    assert_eq!(encoded.len(), message.encoded_len());
    let again = match M::decode(encoded.as_slice()) {
        Ok(again) => again,
        Err(e) => panic!("{message:?} re-encoded to bytes that do not decode: {e}"),
    };
    assert_eq!(again, message, "decode(encode(m)) != m");
    assert_eq!(again.encode_to_vec(), encoded, "encoding is not stable");
}

fn log_entry(bytes: &[u8]) {
    match envelope::decode(bytes) {
        Ok(entry) => {
            assert!(entry.version <= ENVELOPE_VERSION, "{entry:?}");
            let again = match envelope::decode(&envelope::encode(&entry)) {
                Ok(again) => again,
                Err(e) => panic!("{entry:?} re-encoded to an envelope that does not decode: {e}"),
            };
            assert_eq!(again, entry);
        }
        Err(envelope::EnvelopeError::TooNew { found }) => assert!(found > ENVELOPE_VERSION),
        Err(envelope::EnvelopeError::Decode(_)) => {}
    }
    round_trip::<LogEntry>(bytes);
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 20 {
        // What a node decodes from clients (and from the followers that forward to it).
        0 => round_trip::<DeployRequest>(bytes),
        1 => round_trip::<ExecRequest>(bytes),
        2 => round_trip::<QueryRequest>(bytes),
        3 => round_trip::<StatusRequest>(bytes),
        4 => round_trip::<DigestRequest>(bytes),
        5 => round_trip::<DeleteTenantRequest>(bytes),
        6 => round_trip::<TransferLeaderRequest>(bytes),
        7 => round_trip::<ChangeMembersRequest>(bytes),
        // What a client (and a forwarding follower) decodes from a node.
        8 => round_trip::<DeployResponse>(bytes),
        9 => round_trip::<ExecResponse>(bytes),
        10 => round_trip::<QueryResponse>(bytes),
        11 => round_trip::<StatusResponse>(bytes),
        12 => round_trip::<DigestResponse>(bytes),
        13 => round_trip::<ChangeMembersResponse>(bytes),
        14 => round_trip::<TransferLeaderResponse>(bytes),
        // What every replica decodes from its log and its checkpoints.
        15 => round_trip::<TenantCheckpoint>(bytes),
        16 => round_trip::<Session>(bytes),
        17 => round_trip::<StoredOutcome>(bytes),
        _ => log_entry(bytes),
    }
});
