//! The snapshot chunk decoder (`wraft_proto::chunks::ChunkDecoder`), fed chunk sequences three
//! ways: chunks built directly (their checksum and count optionally the right ones for what
//! they carry, so the checks after the last chunk are passed and what lies past them is
//! reached), chunks decoded from raw protobuf bytes as they come off the network, and real
//! streams (cut as the sender cuts them) with corruptions applied.
//!
//! Every chunk is pushed, even after an error (a careless caller). Nothing may panic, and the
//! decoder's verdict must match a separate model of the format: a stream is accepted (every
//! push `Ok` and `finished()`) exactly when it is well formed, its count and checksum match,
//! and no value is over the bound; then the records handed out are exactly the stream's
//! records. `finished()` must never be true for a stream that was refused. A corrupted real
//! stream is accepted only if its records are still exactly the sender's.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use sha2::{Digest as _, Sha256};
use wraft_proto::chunks::{hash_record, ChunkDecoder, Record};
use wraft_proto::peer::{SnapshotChunk, SnapshotRecord};

#[derive(Arbitrary, Debug)]
enum Input {
    Built {
        max_value: u8,
        chunks: Vec<BuiltChunk>,
    },
    Encoded {
        max_value: u8,
        chunks: Vec<Vec<u8>>,
    },
    Real {
        max_value: u8,
        records: Vec<(Vec<u8>, Vec<u8>)>,
        chunk_bytes: u8,
        corruptions: Vec<Corruption>,
    },
}

#[derive(Arbitrary, Debug)]
struct BuiltChunk {
    records: Vec<(Vec<u8>, Vec<u8>, bool)>,
    last: bool,
    /// `None`: the count of the records the model assembled so far.
    records_total: Option<u64>,
    /// `None`: the checksum of the records the model assembled so far.
    checksum: Option<Vec<u8>>,
}

#[derive(Arbitrary, Debug)]
enum Corruption {
    FlipKeyByte {
        chunk: u8,
        record: u8,
        at: u8,
    },
    FlipValueByte {
        chunk: u8,
        record: u8,
        at: u8,
    },
    /// Moves the last byte of a key to the front of its value.
    KeyByteToValue {
        chunk: u8,
        record: u8,
    },
    ToggleMore {
        chunk: u8,
        record: u8,
    },
    DropRecord {
        chunk: u8,
        record: u8,
    },
    DuplicateRecord {
        chunk: u8,
        record: u8,
    },
    SwapRecords {
        chunk: u8,
        a: u8,
        b: u8,
    },
    DropChunk {
        chunk: u8,
    },
    DuplicateChunk {
        chunk: u8,
    },
    SwapChunks {
        a: u8,
        b: u8,
    },
    ToggleLast {
        chunk: u8,
    },
    SetTotal {
        chunk: u8,
        total: u64,
    },
    FlipChecksumByte {
        chunk: u8,
        at: u8,
    },
    TruncateChecksum {
        chunk: u8,
        len: u8,
    },
    /// Another chunk after the last one.
    Append {
        records: Vec<(Vec<u8>, Vec<u8>, bool)>,
    },
}

fn record((key, value, more): &(Vec<u8>, Vec<u8>, bool)) -> SnapshotRecord {
    SnapshotRecord {
        key: key.clone(),
        value: value.clone(),
        more: *more,
    }
}

/// The format, written out again from its description (not from the decoder's code): records
/// start with a non-empty key; a part with `more` is followed by parts with an empty key until
/// one without `more`; a value is at most `max_value` bytes; the stream ends with one chunk with
/// `last`, which carries the record count and the SHA-256 of every record as (key length, key,
/// value length, value).
#[derive(Default)]
struct Model {
    max_value: usize,
    /// The records so far; `None` once the stream broke the format.
    records: Option<Vec<Record>>,
    pending: Option<Record>,
    ended: bool,
}

impl Model {
    fn new(max_value: usize) -> Self {
        Model {
            max_value,
            records: Some(Vec::new()),
            ..Model::default()
        }
    }

    fn checksum(&self) -> Vec<u8> {
        let mut hasher = Sha256::new();
        for (k, v) in self.records.iter().flatten() {
            hash_record(&mut hasher, k, v);
        }
        hasher.finalize().to_vec()
    }

    fn count(&self) -> u64 {
        self.records.as_ref().map_or(0, |r| r.len() as u64)
    }

    /// Takes the chunk's records (the count and checksum in `chunk` are then checked as given).
    fn push_records(&mut self, chunk: &SnapshotChunk) {
        if self.ended {
            self.records = None;
        }
        for r in &chunk.records {
            let Some(records) = self.records.as_mut() else {
                return;
            };
            let (key, mut value) = match (self.pending.take(), r.key.is_empty()) {
                (Some(pending), true) => pending,
                (None, false) => (r.key.clone(), Vec::new()),
                _ => {
                    self.records = None;
                    return;
                }
            };
            value.extend_from_slice(&r.value);
            if value.len() > self.max_value {
                self.records = None;
                return;
            }
            if r.more {
                self.pending = Some((key, value));
            } else {
                records.push((key, value));
            }
        }
    }

    fn push_end(&mut self, chunk: &SnapshotChunk) {
        if !chunk.last || self.records.is_none() {
            return;
        }
        self.ended = true;
        if self.pending.is_some()
            || chunk.records_total != self.count()
            || chunk.checksum != self.checksum()
        {
            self.records = None;
        }
    }

    /// The records, if the stream ended and is valid.
    fn verdict(self) -> Option<Vec<Record>> {
        if self.ended {
            self.records
        } else {
            None
        }
    }
}

/// Pushes every chunk into a decoder and the model; checks they agree and returns the verdict.
fn run(max_value: usize, chunks: Vec<SnapshotChunk>) -> Option<Vec<Record>> {
    let mut decoder = ChunkDecoder::new(max_value);
    let mut model = Model::new(max_value);
    let mut out = Vec::new();
    let mut all_ok = true;
    for chunk in chunks {
        model.push_records(&chunk);
        model.push_end(&chunk);
        match decoder.push(chunk) {
            Ok(records) => out.extend(records),
            Err(_) => all_ok = false,
        }
    }
    let finished = decoder.finished();
    let accepted = all_ok && finished;
    let expected = model.verdict();
    match &expected {
        Some(records) => {
            assert!(accepted, "a valid stream was refused");
            assert_eq!(&out, records, "the records handed out are not the stream's");
        }
        None => {
            assert!(!accepted, "an invalid stream was accepted: {out:?}");
            assert!(!finished, "finished() is true for a refused stream");
        }
    }
    expected
}

/// Cuts records into chunks as the sender (`snapshot::serve` in the host) does.
fn cut(records: &[Record], chunk_bytes: usize) -> Vec<SnapshotChunk> {
    let mut chunks = Vec::new();
    let mut chunk = SnapshotChunk::default();
    let mut size = 0usize;
    let mut hasher = Sha256::new();
    for (key, value) in records {
        hash_record(&mut hasher, key, value);
        let mut rest = value.as_slice();
        let mut first = true;
        loop {
            let room = chunk_bytes.saturating_sub(size).max(1);
            let (part, tail) = rest.split_at(rest.len().min(room));
            chunk.records.push(SnapshotRecord {
                key: if first { key.clone() } else { Vec::new() },
                value: part.to_vec(),
                more: !tail.is_empty(),
            });
            size += part.len() + if first { key.len() } else { 0 } + 16;
            first = false;
            rest = tail;
            if size >= chunk_bytes {
                chunks.push(std::mem::take(&mut chunk));
                size = 0;
            }
            if rest.is_empty() {
                break;
            }
        }
    }
    chunk.last = true;
    chunk.checksum = hasher.finalize().to_vec();
    chunk.records_total = records.len() as u64;
    chunks.push(chunk);
    chunks
}

fn pick<T>(items: &mut [T], i: u8) -> Option<&mut T> {
    let n = items.len();
    if n == 0 {
        None
    } else {
        items.get_mut(i as usize % n)
    }
}

fn corrupt(chunks: &mut Vec<SnapshotChunk>, c: &Corruption) {
    let n = chunks.len();
    match c {
        Corruption::FlipKeyByte { chunk, record, at } => {
            if let Some(r) = pick(chunks, *chunk).and_then(|c| pick(&mut c.records, *record)) {
                if let Some(b) = pick(&mut r.key, *at) {
                    *b ^= 1;
                }
            }
        }
        Corruption::FlipValueByte { chunk, record, at } => {
            if let Some(r) = pick(chunks, *chunk).and_then(|c| pick(&mut c.records, *record)) {
                if let Some(b) = pick(&mut r.value, *at) {
                    *b ^= 0x80;
                }
            }
        }
        Corruption::KeyByteToValue { chunk, record } => {
            if let Some(r) = pick(chunks, *chunk).and_then(|c| pick(&mut c.records, *record)) {
                if let Some(b) = r.key.pop() {
                    r.value.insert(0, b);
                }
            }
        }
        Corruption::ToggleMore { chunk, record } => {
            if let Some(r) = pick(chunks, *chunk).and_then(|c| pick(&mut c.records, *record)) {
                r.more = !r.more;
            }
        }
        Corruption::DropRecord { chunk, record } => {
            if let Some(c) = pick(chunks, *chunk) {
                if !c.records.is_empty() {
                    let i = *record as usize % c.records.len();
                    c.records.remove(i);
                }
            }
        }
        Corruption::DuplicateRecord { chunk, record } => {
            if let Some(c) = pick(chunks, *chunk) {
                if !c.records.is_empty() {
                    let i = *record as usize % c.records.len();
                    let r = c.records[i].clone();
                    c.records.insert(i, r);
                }
            }
        }
        Corruption::SwapRecords { chunk, a, b } => {
            if let Some(c) = pick(chunks, *chunk) {
                let len = c.records.len();
                if len > 0 {
                    c.records.swap(*a as usize % len, *b as usize % len);
                }
            }
        }
        Corruption::DropChunk { chunk } => {
            if n > 0 {
                chunks.remove(*chunk as usize % n);
            }
        }
        Corruption::DuplicateChunk { chunk } => {
            if n > 0 {
                let i = *chunk as usize % n;
                let c = chunks[i].clone();
                chunks.insert(i, c);
            }
        }
        Corruption::SwapChunks { a, b } => {
            if n > 0 {
                chunks.swap(*a as usize % n, *b as usize % n);
            }
        }
        Corruption::ToggleLast { chunk } => {
            if let Some(c) = pick(chunks, *chunk) {
                c.last = !c.last;
            }
        }
        Corruption::SetTotal { chunk, total } => {
            if let Some(c) = pick(chunks, *chunk) {
                c.records_total = *total;
            }
        }
        Corruption::FlipChecksumByte { chunk, at } => {
            if let Some(c) = pick(chunks, *chunk) {
                if let Some(b) = pick(&mut c.checksum, *at) {
                    *b ^= 1;
                }
            }
        }
        Corruption::TruncateChecksum { chunk, len } => {
            if let Some(c) = pick(chunks, *chunk) {
                c.checksum.truncate(*len as usize);
            }
        }
        Corruption::Append { records } => chunks.push(SnapshotChunk {
            records: records.iter().take(4).map(record).collect(),
            ..SnapshotChunk::default()
        }),
    }
}

fuzz_target!(|input: Input| match input {
    Input::Built { max_value, chunks } => {
        // Built against a running model so that the count and checksum can be the right ones.
        let mut model = Model::new(max_value as usize);
        let mut built = Vec::new();
        for c in chunks.iter().take(16) {
            let mut chunk = SnapshotChunk {
                records: c.records.iter().take(16).map(record).collect(),
                last: c.last,
                ..SnapshotChunk::default()
            };
            model.push_records(&chunk);
            chunk.records_total = c.records_total.unwrap_or_else(|| model.count());
            chunk.checksum = c.checksum.clone().unwrap_or_else(|| model.checksum());
            model.push_end(&chunk);
            built.push(chunk);
        }
        run(max_value as usize, built);
    }
    Input::Encoded { max_value, chunks } => {
        let decoded = chunks
            .iter()
            .take(16)
            .filter_map(|bytes| SnapshotChunk::decode(bytes.as_slice()).ok())
            .collect();
        run(max_value as usize, decoded);
    }
    Input::Real {
        max_value,
        records,
        chunk_bytes,
        corruptions,
    } => {
        let records: Vec<Record> = records
            .into_iter()
            .take(32)
            .map(|(mut key, value)| {
                // The sender's keys are never empty.
                if key.is_empty() {
                    key.push(0);
                }
                (key, value)
            })
            .collect();
        let max_value = max_value as usize;
        let fits = records.iter().all(|(_, v)| v.len() <= max_value);
        let mut chunks = cut(&records, chunk_bytes as usize + 1);
        let intact = corruptions.is_empty();
        for c in corruptions.iter().take(4) {
            corrupt(&mut chunks, c);
        }
        match run(max_value, chunks) {
            Some(accepted) => assert_eq!(
                accepted, records,
                "a corrupted stream was accepted with other records than the sender's"
            ),
            None => assert!(!(intact && fits), "an intact stream was refused"),
        }
    }
});
