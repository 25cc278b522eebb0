//! Encoding and decoding the envelope of every log entry ([`LogEntry`]). Pure, so that the
//! fuzz targets reach it without the node; the host re-exports it as `wraft::envelope`.

use prost::Message as _;

use crate::log::LogEntry;
use crate::ENVELOPE_VERSION;

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
    use crate::log::{op, Command, Op, ProposalId};

    #[test]
    fn round_trip_and_version_check() {
        let entry = LogEntry {
            version: ENVELOPE_VERSION,
            timestamp_ms: 0,
            ops: vec![Op {
                id: Some(ProposalId {
                    node: 1,
                    boot: 2,
                    seq: 3,
                }),
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
            Err(EnvelopeError::TooNew { found }) if found == ENVELOPE_VERSION + 1
        ));
        assert!(matches!(
            decode(&[0xff, 0xff, 0xff]),
            Err(EnvelopeError::Decode(_))
        ));
    }
}
