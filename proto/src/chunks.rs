//! Reassembling a snapshot's records from `FetchSnapshot` chunks, and the checksum over them.
//!
//! Pure (no network, no disk) so that it can be tested and fuzzed alone; the transfer itself is
//! in the host's `snapshot.rs`, which re-exports these.

use sha2::{Digest as _, Sha256};

use crate::peer::SnapshotChunk;

/// The checksum covers each record as (key length, key, value length, value), so moving bytes
/// between a key and its value changes it.
pub fn hash_record(hasher: &mut Sha256, key: &[u8], value: &[u8]) {
    hasher.update((key.len() as u64).to_be_bytes());
    hasher.update(key);
    hasher.update((value.len() as u64).to_be_bytes());
    hasher.update(value);
}

/// A state record: key (relative to its generation) and value.
pub type Record = (Vec<u8>, Vec<u8>);

/// Reassembles records from chunks, checking their shape, and computes the checksum. Separate
/// from the network and the disk so it can be tested (and fuzzed) alone.
#[derive(Default)]
pub struct ChunkDecoder {
    hasher: Sha256,
    /// A value whose further parts are still to come.
    pending: Option<(Vec<u8>, Vec<u8>)>,
    records: u64,
    finished: bool,
    /// Set by the first error: the stream is refused, whatever arrives after it.
    failed: bool,
    /// Bound on one value's size (a tenant's checkpoint).
    max_value_bytes: usize,
}

impl ChunkDecoder {
    pub fn new(max_value_bytes: usize) -> Self {
        Self {
            max_value_bytes,
            ..Default::default()
        }
    }

    /// Takes one chunk and returns the records it completed. After the last chunk, checks the
    /// record count and the checksum. After an error every further chunk is refused too, and
    /// [`ChunkDecoder::finished`] stays false: a refused stream never turns valid.
    pub fn push(&mut self, chunk: SnapshotChunk) -> Result<Vec<Record>, String> {
        if self.failed {
            return Err("a chunk arrived after the stream was refused".into());
        }
        let result = self.take(chunk);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn take(&mut self, chunk: SnapshotChunk) -> Result<Vec<Record>, String> {
        if self.finished {
            return Err("a chunk arrived after the last one".into());
        }
        let mut complete = Vec::new();
        for record in chunk.records {
            let (key, mut value) = match self.pending.take() {
                Some((key, value)) => {
                    if !record.key.is_empty() {
                        return Err("a new key arrived before the previous value ended".into());
                    }
                    (key, value)
                }
                None => {
                    if record.key.is_empty() {
                        return Err("a record without a key".into());
                    }
                    (record.key, Vec::new())
                }
            };
            if value.len() + record.value.len() > self.max_value_bytes {
                return Err(format!("a value exceeds {} bytes", self.max_value_bytes));
            }
            value.extend_from_slice(&record.value);
            if record.more {
                self.pending = Some((key, value));
            } else {
                hash_record(&mut self.hasher, &key, &value);
                self.records += 1;
                complete.push((key, value));
            }
        }
        if chunk.last {
            self.finished = true;
            if self.pending.is_some() {
                return Err("the stream ended inside a value".into());
            }
            if chunk.records_total != self.records {
                return Err(format!(
                    "the sender counted {} records, {} arrived",
                    chunk.records_total, self.records
                ));
            }
            let digest = std::mem::take(&mut self.hasher).finalize();
            if digest.as_slice() != chunk.checksum.as_slice() {
                return Err("checksum mismatch".into());
            }
        }
        Ok(complete)
    }

    /// Whether the last chunk arrived and checked out (and no chunk was refused).
    pub fn finished(&self) -> bool {
        self.finished && !self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::SnapshotRecord;

    fn chunk(records: Vec<(&[u8], &[u8], bool)>) -> SnapshotChunk {
        SnapshotChunk {
            records: records
                .into_iter()
                .map(|(k, v, more)| SnapshotRecord {
                    key: k.to_vec(),
                    value: v.to_vec(),
                    more,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn checksum(records: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut h = Sha256::new();
        for (k, v) in records {
            hash_record(&mut h, k, v);
        }
        h.finalize().to_vec()
    }

    #[test]
    fn values_in_parts_reassemble_and_the_checksum_checks() {
        let mut d = ChunkDecoder::new(1024);
        let out = d
            .push(chunk(vec![(b"a", b"1", false), (b"b", b"xy", true)]))
            .unwrap();
        assert_eq!(out, vec![(b"a".to_vec(), b"1".to_vec())]);
        let mut last = chunk(vec![(b"", b"z", false)]);
        last.last = true;
        last.records_total = 2;
        last.checksum = checksum(&[(b"a", b"1"), (b"b", b"xyz")]);
        let out = d.push(last).unwrap();
        assert_eq!(out, vec![(b"b".to_vec(), b"xyz".to_vec())]);
        assert!(d.finished());
    }

    #[test]
    fn damaged_streams_are_refused() {
        // A wrong checksum.
        let mut d = ChunkDecoder::new(1024);
        let mut last = chunk(vec![(b"a", b"1", false)]);
        last.last = true;
        last.records_total = 1;
        last.checksum = checksum(&[(b"a", b"2")]);
        assert!(d.push(last).is_err());
        // A part without its key, a key inside a value, an oversized value, a missing count.
        assert!(ChunkDecoder::new(1024)
            .push(chunk(vec![(b"", b"1", false)]))
            .is_err());
        assert!(ChunkDecoder::new(1024)
            .push(chunk(vec![(b"a", b"1", true), (b"b", b"2", false)]))
            .is_err());
        assert!(ChunkDecoder::new(2)
            .push(chunk(vec![(b"a", b"123", false)]))
            .is_err());
        let mut d = ChunkDecoder::new(1024);
        let mut last = chunk(vec![(b"a", b"1", true)]);
        last.last = true;
        assert!(d.push(last).is_err());
    }

    /// Found by the `snapshot_chunks` fuzz target (input `3c5bffff00ff285bbcfb`): a stream
    /// refused at its last chunk (here: a value over the bound, then a part without its key,
    /// then a wrong count) left `finished()` true, so a caller that went on after an error
    /// would have taken a refused stream for a complete one.
    #[test]
    fn a_refused_stream_never_finishes() {
        let mut d = ChunkDecoder::new(0);
        assert!(d.push(chunk(vec![(b"\0", b"\xbc", true)])).is_err());
        assert!(d.push(chunk(vec![(b"", b"\0", false)])).is_err());
        let mut last = chunk(vec![]);
        last.last = true;
        last.records_total = 1;
        last.checksum = checksum(&[(b"\0", b"\xbc\0")]);
        assert!(d.push(last).is_err());
        assert!(!d.finished());

        // A wrong checksum in the last chunk, then a chunk that would be fine on its own.
        let mut d = ChunkDecoder::new(1024);
        let mut last = chunk(vec![(b"a", b"1", false)]);
        last.last = true;
        last.records_total = 1;
        assert!(d.push(last).is_err());
        assert!(!d.finished());
        assert!(d.push(chunk(vec![])).is_err());
        assert!(!d.finished());

        // An error in the middle, then a valid-looking rest: still refused.
        let mut d = ChunkDecoder::new(1024);
        assert!(d
            .push(chunk(vec![(b"a", b"1", true), (b"b", b"2", false)]))
            .is_err());
        let mut last = chunk(vec![(b"c", b"3", false)]);
        last.last = true;
        last.records_total = 1;
        last.checksum = checksum(&[(b"c", b"3")]);
        assert!(d.push(last).is_err());
        assert!(!d.finished());

        // A chunk after a good last one: the stream is refused from then on.
        let mut d = ChunkDecoder::new(1024);
        let mut last = chunk(vec![(b"a", b"1", false)]);
        last.last = true;
        last.records_total = 1;
        last.checksum = checksum(&[(b"a", b"1")]);
        assert_eq!(d.push(last).unwrap().len(), 1);
        assert!(d.finished());
        assert!(d.push(chunk(vec![])).is_err());
        assert!(!d.finished());
    }
}
