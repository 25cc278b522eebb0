//! The envelope of every log entry wraft proposes, and proposal ids.
//!
//! An entry carries a versioned [`LogEntry`] with one or more ops. A [`ProposalId`] names an op
//! uniquely across nodes and restarts (node id, a random id drawn at process start, a sequence
//! number), so a waiter is never woken by another node's entry that happens to land at the
//! index it expected.

use prost::Message as _;
use wraft_proto::log::{LogEntry, ProposalId};
use wraft_proto::ENVELOPE_VERSION;

/// Hands out proposal ids for this node process.
#[derive(Debug)]
pub struct ProposalIds {
    node: u64,
    boot: u64,
    next_seq: u64,
}

impl ProposalIds {
    /// Draws a fresh boot id: two processes of the same node never share one.
    pub fn new(node: u64) -> Self {
        Self {
            node,
            boot: rand::random::<u64>(),
            next_seq: 1,
        }
    }

    /// The next id.
    pub fn next_id(&mut self) -> ProposalId {
        let seq = self.next_seq;
        self.next_seq += 1;
        ProposalId {
            node: self.node,
            boot: self.boot,
            seq,
        }
    }
}

/// Why an entry's data could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("log entry is not a wraft envelope: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("log entry has envelope version {found}; this build reads up to {ENVELOPE_VERSION}: upgrade this node")]
    TooNew { found: u32 },
}

/// Encodes an entry's data.
pub fn encode(entry: &LogEntry) -> Vec<u8> {
    entry.encode_to_vec()
}

/// Decodes an entry's data, refusing envelopes newer than this build understands: applying
/// them partially would make this replica diverge.
pub fn decode(data: &[u8]) -> Result<LogEntry, EnvelopeError> {
    let entry = LogEntry::decode(data)?;
    if entry.version > ENVELOPE_VERSION {
        return Err(EnvelopeError::TooNew {
            found: entry.version,
        });
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wraft_proto::log::{op, Command, Op};

    #[test]
    fn ids_are_unique_across_boots() {
        let mut a = ProposalIds::new(1);
        let mut b = ProposalIds::new(1);
        let (x, y) = (a.next_id(), b.next_id());
        assert_eq!(x.seq, y.seq);
        assert_ne!(x, y, "two boots of one node must not share ids");
        assert_ne!(a.next_id(), x);
    }

    #[test]
    fn round_trip_and_version_check() {
        let entry = LogEntry {
            version: ENVELOPE_VERSION,
            timestamp_ms: 0,
            ops: vec![Op {
                id: Some(ProposalIds::new(2).next_id()),
                tenant: "t".into(),
                kind: Some(op::Kind::Command(Command {
                    payload: b"x".to_vec(),
                    client_id: String::new(),
                    seq: 0,
                })),
                request_id: "r1".into(),
            }],
        };
        assert_eq!(decode(&encode(&entry)).unwrap(), entry);
        let newer = LogEntry {
            version: ENVELOPE_VERSION + 1,
            ..entry
        };
        assert!(matches!(
            decode(&encode(&newer)),
            Err(EnvelopeError::TooNew { .. })
        ));
        assert!(decode(&[0xff, 0xff, 0xff]).is_err());
    }
}
