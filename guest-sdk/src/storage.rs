//! Host storage, for store-model state machines ([`crate::StoreStateMachine`]).
//!
//! A store-model module keeps its whole state in the tenant's storage on the host, an ordered
//! map from byte keys to byte values, and nothing in linear memory (every call runs on a fresh
//! instance). These functions are its only way to reach that map.
//!
//! ```
//! use wraft_guest_sdk::{storage, testing::StoreHarness, StoreStateMachine};
//!
//! /// Remembers who visited, and counts visits.
//! pub struct Visits;
//!
//! impl StoreStateMachine for Visits {
//!     fn apply(name: &[u8]) -> Result<Vec<u8>, String> {
//!         let key = [b"visit/", name].concat();
//!         let count = match storage::get(&key)? {
//!             Some(bytes) => u64::from_le_bytes(bytes.try_into().map_err(|_| "bad count")?),
//!             None => 0,
//!         } + 1;
//!         storage::put(&key, &count.to_le_bytes())?;
//!         Ok(count.to_string().into_bytes())
//!     }
//!
//!     fn query(_: &[u8]) -> Result<Vec<u8>, String> {
//!         // Everyone, in key order; the iterator pages through the host's scan for us.
//!         let mut names = Vec::new();
//!         for pair in storage::scan_prefix(b"visit/") {
//!             let (key, _count) = pair?;
//!             names.push(String::from_utf8_lossy(&key[6..]).into_owned());
//!         }
//!         Ok(names.join(",").into_bytes())
//!     }
//! }
//!
//! wraft_guest_sdk::export_store_state_machine!(Visits);
//!
//! fn main() {
//!     let mut sm = StoreHarness::<Visits>::new();
//!     assert_eq!(sm.apply(b"bob"), Ok(b"1".to_vec()));
//!     assert_eq!(sm.apply(b"ann"), Ok(b"1".to_vec()));
//!     assert_eq!(sm.apply(b"bob"), Ok(b"2".to_vec()));
//!     assert_eq!(sm.query(b""), Ok(b"ann,bob".to_vec()));
//!     assert_eq!(sm.get(b"visit/bob"), Some(2u64.to_le_bytes().to_vec()));
//! }
//! ```
//!
//! # What a call sees and keeps
//!
//! - A call reads its own writes: `get` and the scans see what this call put and deleted.
//! - Writes are buffered by the host and committed when the call **returns**, with its output
//!   *or with its own error* (`Err`); they are discarded only if the call **traps** (a
//!   panic, running out of fuel or memory). So, as in the memory model, a failed `apply`
//!   should check everything before it writes anything.
//! - `query` and `snapshot` are read-only: [`put`] and [`delete`] return an error there.
//! - Keys are at most [`MAX_KEY_BYTES`], values at most [`MAX_VALUE_BYTES`]: the SDK refuses
//!   larger ones with an error before the host sees them (the host would trap).
//! - Every host call costs fuel (a fixed amount plus one unit per byte moved), so prefer one
//!   scan over many gets.
//! - Natively (in `cargo test`) these functions work inside [`crate::testing::StoreHarness`]
//!   calls and return an error anywhere else.

use crate::host::{self, Mode};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 4096;
/// Longest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Most bytes of encoded pairs one host scan returns (see [`scan`]).
pub const MAX_SCAN_BYTES: usize = 4 << 20;
/// How many pairs [`Scan`] asks the host for at a time, unless told otherwise.
pub const DEFAULT_PAGE_SIZE: u32 = 1024;
/// The first byte of a store snapshot (see [`encode_snapshot`]).
pub const SNAPSHOT_V1: u8 = 1;

/// A key and its value.
pub type Pair = (Vec<u8>, Vec<u8>);

fn check_readable() -> Result<(), String> {
    match host::mode() {
        Mode::Read | Mode::Write => Ok(()),
        Mode::Memory => Err("wraft SDK: storage is only for store-model state machines \
                             (export_store_state_machine!); this one keeps its state in memory"
            .to_string()),
        #[cfg(target_arch = "wasm32")]
        Mode::Idle => Err("wraft SDK: storage used outside a call".to_string()),
        #[cfg(not(target_arch = "wasm32"))]
        Mode::Idle => Err(
            "wraft SDK: storage used outside a call: drive a store-model state \
                           machine with testing::StoreHarness"
                .to_string(),
        ),
    }
}

fn check_writable(function: &str) -> Result<(), String> {
    check_readable()?;
    if host::mode() == Mode::Read {
        return Err(format!(
            "wraft SDK: storage::{function}: storage is read-only in query and snapshot"
        ));
    }
    Ok(())
}

fn check_key(what: &str, key: &[u8]) -> Result<(), String> {
    if key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "storage {what} is {} bytes; the limit is {MAX_KEY_BYTES}",
            key.len()
        ));
    }
    Ok(())
}

fn check_value(value: &[u8]) -> Result<(), String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "storage value is {} bytes; the limit is {MAX_VALUE_BYTES}",
            value.len()
        ));
    }
    Ok(())
}

/// The value stored under `key`, `None` if there is none.
///
/// Errors: the key is longer than [`MAX_KEY_BYTES`], or this is not a store-model call.
pub fn get(key: &[u8]) -> Result<Option<Vec<u8>>, String> {
    check_readable()?;
    check_key("key", key)?;
    host::get(key)
}

/// Stores `value` under `key` (replacing any value), committed when the call returns.
///
/// Errors: the key or the value is too long ([`MAX_KEY_BYTES`], [`MAX_VALUE_BYTES`]), or this
/// is a `query`/`snapshot` or not a store-model call.
pub fn put(key: &[u8], value: &[u8]) -> Result<(), String> {
    check_writable("put")?;
    check_key("key", key)?;
    check_value(value)?;
    host::put(key, value)
}

/// Removes `key` (nothing happens if it is absent), committed when the call returns.
///
/// Errors as [`put`].
pub fn delete(key: &[u8]) -> Result<(), String> {
    check_writable("delete")?;
    check_key("key", key)?;
    host::delete(key)
}

/// One host scan: pairs with `start <= key < end` (`end: None`: no upper bound;
/// `Some(b"")`: nothing) in ascending byte order, at most `limit` of them.
///
/// The host may return fewer than `limit` pairs even when more exist (it stops before 4 MiB
/// of encoded pairs, [`MAX_SCAN_BYTES`]); an empty result means there are none left. To
/// visit a whole range use [`scan_all`] or [`scan_prefix`], which page for you. `limit` 0
/// returns nothing without asking the host; above `i32::MAX` it is `i32::MAX`.
pub fn scan(start: &[u8], end: Option<&[u8]>, limit: u32) -> Result<Vec<Pair>, String> {
    check_readable()?;
    check_key("scan start key", start)?;
    if let Some(end) = end {
        check_key("scan end key", end)?;
        if end <= start {
            return Ok(Vec::new());
        }
    }
    if limit == 0 {
        return Ok(Vec::new());
    }
    let page = host::scan(start, end, limit.min(i32::MAX as u32))?;
    let mut out = Vec::new();
    let mut previous: Option<&[u8]> = None;
    for pair in Pairs::new(&page, "the host's storage_scan output") {
        let (key, value) = pair?;
        check_order(previous, key, start, end)?;
        previous = Some(key);
        out.push((key.to_vec(), value.to_vec()));
    }
    if out.len() > limit as usize {
        return Err(format!(
            "wraft SDK: the host's storage_scan returned {} pairs, more than the limit {limit}",
            out.len()
        ));
    }
    Ok(out)
}

/// Checks that a key of a scan page is in range and after the previous one, which is what
/// guarantees that paging terminates.
fn check_order(
    previous: Option<&[u8]>,
    key: &[u8],
    start: &[u8],
    end: Option<&[u8]>,
) -> Result<(), String> {
    let in_order = match previous {
        Some(previous) => previous < key,
        None => start <= key,
    };
    if !in_order || end.is_some_and(|end| key >= end) {
        return Err(
            "wraft SDK: the host's storage_scan returned keys out of order or out of range"
                .to_string(),
        );
    }
    Ok(())
}

/// Every pair with `start <= key < end` (`end: None`: no upper bound), in ascending order,
/// fetched from the host a page at a time; see [`Scan`].
pub fn scan_all(start: &[u8], end: Option<&[u8]>) -> Scan {
    Scan::new(start.to_vec(), end.map(<[u8]>::to_vec), None)
}

/// Every pair whose key starts with `prefix`, in ascending order; see [`Scan`].
pub fn scan_prefix(prefix: &[u8]) -> Scan {
    Scan::new(prefix.to_vec(), prefix_end(prefix), None)
}

/// The smallest key after every key that starts with `prefix`: the exclusive end of a prefix
/// scan. `None` when there is none (the prefix is empty or all `0xff` bytes): scan to the end.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let last = prefix.iter().rposition(|&b| b != 0xff)?;
    let mut end = prefix[..=last].to_vec();
    end[last] += 1;
    Some(end)
}

/// The first key after `key` that a key of at most [`MAX_KEY_BYTES`] can be, `None` if none.
fn successor(key: &[u8]) -> Option<Vec<u8>> {
    if key.len() < MAX_KEY_BYTES {
        let mut next = key.to_vec();
        next.push(0);
        Some(next)
    } else {
        // No longer key exists, so nothing sorts between `key` and its prefix end.
        prefix_end(key)
    }
}

/// An iterator over a key range that pages through the host's scan: each page is one host
/// call of at most [`DEFAULT_PAGE_SIZE`] pairs (or [`Scan::page_size`]) and 4 MiB.
///
/// Yields `Err` once (then ends) if the range is invalid (a bound longer than
/// [`MAX_KEY_BYTES`]) or the call may not use storage. Collect it with
/// `.collect::<Result<Vec<_>, String>>()`. Within an `apply`, it sees the call's own writes
/// made before each page is fetched.
#[derive(Debug)]
pub struct Scan {
    /// Where the next page starts; `None` when the range is exhausted.
    next: Option<Vec<u8>>,
    end: Option<Vec<u8>>,
    remaining: Option<usize>,
    page_size: u32,
    page: std::vec::IntoIter<Pair>,
}

impl Scan {
    fn new(start: Vec<u8>, end: Option<Vec<u8>>, remaining: Option<usize>) -> Scan {
        Scan {
            next: Some(start),
            end,
            remaining,
            page_size: DEFAULT_PAGE_SIZE,
            page: Vec::new().into_iter(),
        }
    }

    /// Yields at most `n` pairs, and asks the host for no more than that: better than
    /// `.take(n)`, whose pages would be full-sized.
    pub fn limit(mut self, n: usize) -> Scan {
        self.remaining = Some(self.remaining.map_or(n, |r| r.min(n)));
        self
    }

    /// Pairs per host call (at least 1). Larger pages mean fewer host calls (each costs fuel)
    /// and more memory per page (at most 4 MiB of pairs whatever the size).
    pub fn page_size(mut self, n: u32) -> Scan {
        self.page_size = n.clamp(1, i32::MAX as u32);
        self
    }
}

impl Iterator for Scan {
    type Item = Result<Pair, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == Some(0) {
            return None;
        }
        if let Some(pair) = self.page.next() {
            if let Some(r) = self.remaining.as_mut() {
                *r -= 1;
            }
            return Some(Ok(pair));
        }
        let start = self.next.take()?;
        let want = match self.remaining {
            Some(r) => (r.min(u32::MAX as usize) as u32).min(self.page_size),
            None => self.page_size,
        };
        let page = match scan(&start, self.end.as_deref(), want) {
            Ok(page) => page,
            // `next` stays `None`: the error ends the iteration.
            Err(e) => return Some(Err(e)),
        };
        let (last, _) = page.last()?;
        self.next = successor(last);
        self.page = page.into_iter();
        self.next()
    }
}

/// Iterates over encoded pairs: repeated (key_len u32 LE, key, value_len u32 LE, value).
struct Pairs<'a> {
    rest: &'a [u8],
    what: &'static str,
    failed: bool,
}

impl<'a> Pairs<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Pairs<'a> {
        Pairs {
            rest: bytes,
            what,
            failed: false,
        }
    }

    fn take(&mut self) -> Result<&'a [u8], String> {
        let (len, tail) = self
            .rest
            .split_first_chunk::<4>()
            .ok_or_else(|| format!("{} is truncated (in a length)", self.what))?;
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(format!("{} is truncated (in a key or value)", self.what));
        }
        let (bytes, tail) = tail.split_at(len);
        self.rest = tail;
        Ok(bytes)
    }
}

impl<'a> Iterator for Pairs<'a> {
    type Item = Result<PairRef<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let pair = self.take().and_then(|key| Ok((key, self.take()?)));
        self.failed = pair.is_err();
        Some(pair)
    }
}

fn encode_pair(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // Both lengths were checked against the caps, far below 4 GiB.
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

/// Encodes pairs as a store snapshot, the format of the snapshots that
/// [`crate::export_store_state_machine!`] generates: the byte [`SNAPSHOT_V1`], then per pair in
/// strictly ascending key order `key_len u32 LE, key, value_len u32 LE, value`.
///
/// A memory-model state machine returns this from `snapshot` to hand its state to a
/// store-model next version (whose generated `restore` puts the pairs). It is also exactly the
/// snapshot format of `plugins/kv`, so `kv` and `kvstore` upgrade into each other.
///
/// Errors: keys not strictly ascending (which includes duplicates), or a key or value beyond
/// the caps (the store could not hold it).
pub fn encode_snapshot<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Result<Vec<u8>, String>
where
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let mut out = vec![SNAPSHOT_V1];
    let mut previous: Option<Vec<u8>> = None;
    for (key, value) in pairs {
        let (key, value) = (key.as_ref(), value.as_ref());
        check_snapshot_pair(previous.as_deref(), key, value)?;
        encode_pair(&mut out, key, value);
        previous = Some(key.to_vec());
    }
    Ok(out)
}

fn check_snapshot_pair(previous: Option<&[u8]>, key: &[u8], value: &[u8]) -> Result<(), String> {
    if previous.is_some_and(|previous| previous >= key) {
        return Err("store snapshot: keys are not in strictly ascending order".to_string());
    }
    check_key("key", key)
        .and_then(|()| check_value(value))
        .map_err(|e| format!("store snapshot: {e}"))
}

/// Decodes a store snapshot (format on [`encode_snapshot`]), checking everything that
/// function checks. A memory-model state machine's `restore` uses it to take over the state
/// of a store-model previous version.
pub fn decode_snapshot(snapshot: &[u8]) -> Result<Vec<Pair>, String> {
    Ok(decode_snapshot_ref(snapshot)?
        .into_iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect())
}

/// A pair borrowed from encoded bytes.
type PairRef<'a> = (&'a [u8], &'a [u8]);

fn decode_snapshot_ref(snapshot: &[u8]) -> Result<Vec<PairRef<'_>>, String> {
    let (&version, body) = snapshot
        .split_first()
        .ok_or("store snapshot is empty (expected at least the version byte)")?;
    if version != SNAPSHOT_V1 {
        return Err(format!(
            "store snapshot has version {version}, expected {SNAPSHOT_V1}"
        ));
    }
    let mut pairs: Vec<PairRef<'_>> = Vec::new();
    for pair in Pairs::new(body, "store snapshot") {
        let (key, value) = pair?;
        check_snapshot_pair(pairs.last().map(|(k, _)| *k), key, value)?;
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// The generated `wraft_snapshot` of a store-model module: every pair, in the format of
/// [`encode_snapshot`], paged through the host's scan at the largest page size.
pub(crate) fn snapshot_store() -> Result<Vec<u8>, String> {
    let mut out = vec![SNAPSHOT_V1];
    for pair in scan_all(&[], None).page_size(i32::MAX as u32) {
        let (key, value) = pair?;
        encode_pair(&mut out, &key, &value);
    }
    Ok(out)
}

/// The generated `wraft_restore` of a store-model module: the store afterwards holds exactly
/// the snapshot's pairs. Equivalent to deleting every key and then putting the pairs; it
/// deletes only the keys the snapshot does not have. Checks the whole snapshot before it
/// writes anything.
pub(crate) fn restore_store(snapshot: &[u8]) -> Result<(), String> {
    check_writable("restore")?;
    let pairs = decode_snapshot_ref(snapshot)?;
    let mut stale = Vec::new();
    for pair in scan_all(&[], None).page_size(i32::MAX as u32) {
        let (key, _) = pair?;
        if pairs
            .binary_search_by(|(k, _)| (*k).cmp(key.as_slice()))
            .is_err()
        {
            stale.push(key);
        }
    }
    for key in &stale {
        delete(key)?;
    }
    for (key, value) in pairs {
        put(key, value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::context::Context;
    use crate::host::fake::{self, Call, Store};

    fn store_of(pairs: &[(&[u8], &[u8])]) -> Store {
        let map: BTreeMap<Vec<u8>, Vec<u8>> = pairs
            .iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        std::rc::Rc::new(std::cell::RefCell::new(map))
    }

    /// Runs `f` as one call of `mode` on `store`; commits its writes unless it panicked.
    fn in_call<R>(mode: Mode, store: &Store, f: impl FnOnce() -> R) -> R {
        let (result, call) = fake::run(mode, Context::default(), Some(Call::new(store.clone())), f);
        let result = result.unwrap_or_else(|p| std::panic::resume_unwind(p));
        call.unwrap().commit();
        result
    }

    fn keys(pairs: &[Pair]) -> Vec<Vec<u8>> {
        pairs.iter().map(|(k, _)| k.clone()).collect()
    }

    #[test]
    fn storage_outside_a_store_call_is_an_error() {
        let err = get(b"k").unwrap_err();
        assert!(err.contains("outside a call"), "{err}");
        let store = store_of(&[]);
        let (result, _) = fake::run(Mode::Memory, Context::default(), None, || put(b"k", b"v"));
        let err = result.unwrap().unwrap_err();
        assert!(err.contains("only for store-model"), "{err}");
        // Read-only calls refuse writes, before the host would trap.
        in_call(Mode::Read, &store, || {
            assert!(put(b"k", b"v").unwrap_err().contains("read-only"));
            assert!(delete(b"k").unwrap_err().contains("read-only"));
            assert_eq!(get(b"k"), Ok(None));
        });
        assert!(store.borrow().is_empty());
    }

    #[test]
    fn caps_are_errors_not_traps() {
        let store = store_of(&[]);
        in_call(Mode::Write, &store, || {
            let long = vec![b'k'; MAX_KEY_BYTES + 1];
            let expected = "storage key is 4097 bytes; the limit is 4096".to_string();
            assert_eq!(get(&long), Err(expected.clone()));
            assert_eq!(put(&long, b""), Err(expected.clone()));
            assert_eq!(delete(&long), Err(expected));
            assert!(scan(&long, None, 1).unwrap_err().contains("scan start key"));
            assert!(scan(b"", Some(&long), 1)
                .unwrap_err()
                .contains("scan end key"));
            let first = scan_prefix(&long).next().unwrap();
            assert!(first.is_err());
            let big = vec![0; MAX_VALUE_BYTES + 1];
            assert_eq!(
                put(b"k", &big),
                Err("storage value is 1048577 bytes; the limit is 1048576".to_string())
            );
            put(&long[1..], &big[1..]).unwrap();
        });
        assert_eq!(store.borrow().len(), 1, "the write at the caps, only");
    }

    #[test]
    fn a_call_reads_its_own_writes() {
        let store = store_of(&[(b"a", b"1"), (b"b", b"2"), (b"c", b"3")]);
        in_call(Mode::Write, &store, || {
            put(b"b", b"two").unwrap();
            delete(b"c").unwrap();
            put(b"d", b"4").unwrap();
            assert_eq!(get(b"b"), Ok(Some(b"two".to_vec())));
            assert_eq!(get(b"c"), Ok(None));
            let all: Vec<Pair> = scan_all(b"", None).collect::<Result<_, _>>().unwrap();
            assert_eq!(keys(&all), [&b"a"[..], b"b", b"d"]);
            assert_eq!(all[1].1, b"two");
        });
        assert_eq!(store.borrow().get(&b"c"[..]), None);
        assert_eq!(
            store.borrow().get(&b"d"[..]).map(Vec::as_slice),
            Some(&b"4"[..])
        );
    }

    #[test]
    fn scan_bounds_and_limits() {
        let store = store_of(&[(b"a", b""), (b"b", b""), (b"ba", b""), (b"c", b"")]);
        in_call(Mode::Read, &store, || {
            assert_eq!(
                keys(&scan(b"", None, 10).unwrap()),
                [&b"a"[..], b"b", b"ba", b"c"]
            );
            assert_eq!(
                keys(&scan(b"b", Some(b"c"), 10).unwrap()),
                [&b"b"[..], b"ba"]
            );
            assert_eq!(keys(&scan(b"", None, 2).unwrap()), [&b"a"[..], b"b"]);
            assert!(scan(b"", None, 0).unwrap().is_empty());
            assert!(
                scan(b"", Some(b""), 5).unwrap().is_empty(),
                "Some(empty) is no keys"
            );
            assert!(
                scan(b"c", Some(b"b"), 5).unwrap().is_empty(),
                "an inverted range"
            );
            assert!(scan(b"b", Some(b"b"), 5).unwrap().is_empty());
            assert_eq!(scan(b"", None, u32::MAX).unwrap().len(), 4);
            let prefix: Vec<Pair> = scan_prefix(b"b").collect::<Result<_, _>>().unwrap();
            assert_eq!(keys(&prefix), [&b"b"[..], b"ba"]);
            let limited: Vec<Pair> = scan_all(b"", None)
                .limit(3)
                .page_size(2)
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(keys(&limited), [&b"a"[..], b"b", b"ba"]);
            assert_eq!(scan_all(b"", None).limit(0).count(), 0);
        });
    }

    /// With many buffered deletes the host returns short pages (it leaves out what it cannot
    /// order exactly); paging must still visit every pair exactly once.
    #[test]
    fn paging_survives_short_pages() {
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..500u32)
            .map(|i| (format!("k{i:04}").into_bytes(), i.to_le_bytes().to_vec()))
            .collect();
        let refs: Vec<(&[u8], &[u8])> = pairs.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        let store = store_of(&refs);
        in_call(Mode::Write, &store, || {
            for i in (0..500u32).filter(|i| i % 3 == 0) {
                delete(format!("k{i:04}").as_bytes()).unwrap();
            }
            for i in 0..50u32 {
                put(format!("k{i:04}x").as_bytes(), b"new").unwrap();
            }
            for page_size in [1, 2, 7, 64, 1000] {
                let seen: Vec<Pair> = scan_all(b"", None)
                    .page_size(page_size)
                    .collect::<Result<_, _>>()
                    .unwrap();
                let mut expected: Vec<Vec<u8>> = (0..500u32)
                    .filter(|i| i % 3 != 0)
                    .map(|i| format!("k{i:04}").into_bytes())
                    .chain((0..50u32).map(|i| format!("k{i:04}x").into_bytes()))
                    .collect();
                expected.sort();
                assert_eq!(keys(&seen), expected, "page size {page_size}");
            }
        });
    }

    #[test]
    fn paging_steps_over_keys_of_the_maximum_length() {
        let max = vec![b'm'; MAX_KEY_BYTES];
        let last = vec![0xff; MAX_KEY_BYTES];
        let store = store_of(&[(b"a", b""), (&max, b""), (b"n", b""), (&last, b"")]);
        in_call(Mode::Read, &store, || {
            let all: Vec<Pair> = scan_all(b"", None)
                .page_size(1)
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(
                keys(&all),
                [b"a".to_vec(), max.clone(), b"n".to_vec(), last.clone()]
            );
        });
        assert_eq!(
            successor(&max),
            Some([&max[..MAX_KEY_BYTES - 1], b"n"].concat())
        );
        assert_eq!(successor(&vec![0xff; MAX_KEY_BYTES]), None);
        assert_eq!(successor(b"a"), Some(b"a\0".to_vec()));
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"abc"), Some(b"abd".to_vec()));
        assert_eq!(prefix_end(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn snapshot_format() {
        let bytes = encode_snapshot([(&b"a"[..], &b"1"[..]), (b"bc", b"")]).unwrap();
        assert_eq!(
            bytes,
            [1, 1, 0, 0, 0, b'a', 1, 0, 0, 0, b'1', 2, 0, 0, 0, b'b', b'c', 0, 0, 0, 0]
        );
        assert_eq!(
            decode_snapshot(&bytes).unwrap(),
            [(b"a".to_vec(), b"1".to_vec()), (b"bc".to_vec(), vec![])]
        );
        assert_eq!(
            encode_snapshot(Vec::<(Vec<u8>, Vec<u8>)>::new()).unwrap(),
            [1]
        );
        assert!(encode_snapshot([(b"b", b""), (b"a", b"")]).is_err());
        assert!(encode_snapshot([(b"a", b""), (b"a", b"")]).is_err());
        let long = vec![0; MAX_KEY_BYTES + 1];
        assert!(encode_snapshot([(long.as_slice(), &b""[..])]).is_err());
        for bad in [
            &b""[..],
            &[2],
            &[1, 1, 0, 0],
            &[1, 1, 0, 0, 0, b'a'],
            &[1, 1, 0, 0, 0, b'a', 9, 0, 0, 0],
            // Out of order.
            &[
                1, 1, 0, 0, 0, b'b', 0, 0, 0, 0, 1, 0, 0, 0, b'a', 0, 0, 0, 0,
            ],
        ] {
            assert!(decode_snapshot(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn generated_snapshot_and_restore() {
        let store = store_of(&[(b"keep", b"old"), (b"stale", b"x"), (b"z", b"")]);
        let snapshot = in_call(Mode::Read, &store, snapshot_store).unwrap();
        assert_eq!(decode_snapshot(&snapshot).unwrap().len(), 3, "every pair");
        let target = store_of(&[(b"a", b"gone"), (b"keep", b"older")]);
        let input = encode_snapshot([(&b"keep"[..], &b"new"[..]), (b"m", b"1")]).unwrap();
        in_call(Mode::Write, &target, || restore_store(&input)).unwrap();
        let expected: BTreeMap<Vec<u8>, Vec<u8>> = [
            (b"keep".to_vec(), b"new".to_vec()),
            (b"m".to_vec(), b"1".to_vec()),
        ]
        .into();
        assert_eq!(*target.borrow(), expected);
        // A bad snapshot writes nothing; restore is refused in a read-only call.
        in_call(Mode::Write, &target, || restore_store(&[1, 1])).unwrap_err();
        in_call(Mode::Read, &target, || restore_store(&input)).unwrap_err();
        assert_eq!(*target.borrow(), expected);
    }
}
