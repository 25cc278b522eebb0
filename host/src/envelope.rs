//! The envelope of every log entry wraft proposes, and proposal ids.
//!
//! An entry carries a versioned [`LogEntry`](wraft_proto::log::LogEntry) with one or more ops.
//! A [`ProposalId`] names an op uniquely across nodes and restarts (node id, a random id drawn
//! at process start, a sequence number), so a waiter is never woken by another node's entry
//! that happens to land at the index it expected.

use wraft_proto::log::ProposalId;

// Encoding and decoding live in the proto crate (pure, so the fuzz targets reach them without
// the node); re-exported here so the rest of the host is unchanged.
pub use wraft_proto::envelope::{decode, encode, EnvelopeError};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_across_boots() {
        let mut a = ProposalIds::new(1);
        let mut b = ProposalIds::new(1);
        let (x, y) = (a.next_id(), b.next_id());
        assert_eq!(x.seq, y.seq);
        assert_ne!(x, y, "two boots of one node must not share ids");
        assert_ne!(a.next_id(), x);
    }
}
