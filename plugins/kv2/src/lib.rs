//! `kv2`: version 2 of `kv` (plugins/kv), written with the SDK's typed API. Deploy it over a
//! running `kv` tenant: it takes over kv's state and keeps kv's contract.
//!
//! Owns a `BTreeMap` from key to value and version. Keeps true: every command and query of `kv`
//! gets the same reply, byte for byte (clients and tests rely on the exact JSON); malformed
//! input is an `Err` (`bad command: ...` / `bad query: ...`), never a panic, and a failed
//! command changes nothing; snapshots follow key order, so replicas agree byte for byte.
//!
//! Commands (`apply`), exactly as `kv`:
//! - `{"op":"put","key":K,"value":V}` → `{"prev":V|null}`
//! - `{"op":"delete","key":K}` → `{"prev":V|null}`
//! - `{"op":"cas","key":K,"expect":V|null,"value":V}` → `{"ok":bool,"current":V|null}`, where
//!   `current` is the value after the operation and `expect: null` means "key absent".
//!
//! Queries (`query`): `kv`'s, plus two new ones:
//! - `{"op":"get","key":K}` → `{"value":V|null}`
//! - `{"op":"scan","prefix":P,"limit":N}` → `{"items":[[K,V],...]}` in key order; without
//!   `limit` at most [`DEFAULT_SCAN_LIMIT`] items.
//! - new: `{"op":"count"}` → `{"count":N}`, the number of keys.
//! - new: `{"op":"version","key":K}` → `{"version":N|null}`: how many times the key was written
//!   (a put, or a cas that succeeded) since it was created; `null` if absent. A delete ends the
//!   key's history. Keys taken over from `kv` start at version 1: kv kept no history.
//!
//! Snapshots: see [`Kv2::restore`] for the two formats it reads.

use std::collections::BTreeMap;
use std::ops::Bound;

use serde::{Deserialize, Serialize};
use wraft_guest_sdk::{Codec, Json, Postcard, TypedStateMachine};

/// How many items a scan without `limit` returns at most (as in `kv`).
pub const DEFAULT_SCAN_LIMIT: usize = 1000;

/// The first byte of every `kv` (v1) snapshot: its format version.
const KV1_SNAPSHOT: u8 = 1;

/// The first bytes of every kv2 snapshot: "wkv" (a wraft kv snapshot), then the format
/// version. Its first byte, `w`, is never kv v1's `1`, so the first byte alone tells the two
/// apart; the rest guards against the snapshot of some other plugin that starts with `w`. A
/// future format takes the next version number (`wkv\x03`) and keeps reading this one.
const KV2_SNAPSHOT_TAG: &[u8; 4] = b"wkv\x02";

/// The replicated map, version 2.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Kv2 {
    map: BTreeMap<String, Entry>,
}

/// One key's value and version (writes since the key was created, starting at 1).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct Entry {
    value: String,
    version: u64,
}

/// A command, as `kv` defines it.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Command {
    /// Sets a key.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: String,
    },
    /// Removes a key.
    Delete {
        /// The key.
        key: String,
    },
    /// Sets a key if its current value is `expect` (`None`: if it is absent).
    Cas {
        /// The key.
        key: String,
        /// `deserialize_with` turns off serde's "a missing `Option` field is `None`": kv
        /// requires `expect` and reads `null` as "absent", and so must we.
        #[serde(deserialize_with = "Option::deserialize")]
        expect: Option<String>,
        /// The value to set.
        value: String,
    },
}

/// A query: `kv`'s `get` and `scan`, and the new `count` and `version`.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Query {
    /// A key's value.
    Get {
        /// The key.
        key: String,
    },
    /// Keys with a prefix, in key order.
    Scan {
        /// The prefix ("" for every key).
        prefix: String,
        /// At most this many items ([`DEFAULT_SCAN_LIMIT`] if absent).
        limit: Option<usize>,
    },
    /// The number of keys.
    Count,
    /// A key's version.
    Version {
        /// The key.
        key: String,
    },
}

/// What a command returns. `untagged`: each variant is encoded as its bare fields, which is
/// kv's reply shape.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(untagged)]
pub enum Output {
    /// `put` and `delete`: the value before.
    Prev {
        /// The value before, `None` if absent.
        prev: Option<String>,
    },
    /// `cas`: whether it swapped, and the value after.
    Cas {
        /// Whether the value was set.
        ok: bool,
        /// The value after the operation.
        current: Option<String>,
    },
}

/// What a query returns (`untagged`, as [`Output`]).
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(untagged)]
pub enum QueryOutput {
    /// `get`.
    Value {
        /// The value, `None` if absent.
        value: Option<String>,
    },
    /// `scan`: `[key, value]` pairs.
    Items {
        /// The pairs, in key order.
        items: Vec<(String, String)>,
    },
    /// `count`.
    Count {
        /// The number of keys.
        count: u64,
    },
    /// `version`.
    Version {
        /// The version, `None` if absent.
        version: Option<u64>,
    },
}

impl Kv2 {
    /// Sets `key`, one version up (1 for a new key); returns the previous value.
    fn write(&mut self, key: String, value: String) -> Option<String> {
        match self.map.get_mut(&key) {
            Some(entry) => {
                // Saturating: 2^64 writes of one key cannot happen, but this keeps apply free of
                // any overflow panic.
                entry.version = entry.version.saturating_add(1);
                Some(std::mem::replace(&mut entry.value, value))
            }
            None => {
                self.map.insert(key, Entry { value, version: 1 });
                None
            }
        }
    }

    fn value(&self, key: &str) -> Option<String> {
        self.map.get(key).map(|e| e.value.clone())
    }
}

impl TypedStateMachine for Kv2 {
    type Codec = Json;
    type Command = Command;
    type Output = Output;
    type Query = Query;
    type QueryOutput = QueryOutput;

    fn apply(&mut self, command: Command) -> Result<Output, String> {
        Ok(match command {
            Command::Put { key, value } => Output::Prev {
                prev: self.write(key, value),
            },
            Command::Delete { key } => Output::Prev {
                prev: self.map.remove(&key).map(|e| e.value),
            },
            Command::Cas { key, expect, value } => {
                let ok = self.map.get(&key).map(|e| &e.value) == expect.as_ref();
                if ok {
                    self.write(key.clone(), value);
                }
                Output::Cas {
                    ok,
                    current: self.value(&key),
                }
            }
        })
    }

    fn query(&self, query: Query) -> Result<QueryOutput, String> {
        Ok(match query {
            Query::Get { key } => QueryOutput::Value {
                value: self.value(&key),
            },
            Query::Scan { prefix, limit } => QueryOutput::Items {
                items: self
                    .map
                    .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
                    .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                    .take(limit.unwrap_or(DEFAULT_SCAN_LIMIT))
                    .map(|(k, e)| (k.clone(), e.value.clone()))
                    .collect(),
            },
            Query::Count => QueryOutput::Count {
                count: self.map.len() as u64,
            },
            Query::Version { key } => QueryOutput::Version {
                version: self.map.get(&key).map(|e| e.version),
            },
        })
    }

    /// [`KV2_SNAPSHOT_TAG`], then the map in postcard: a varint count, then per entry in key
    /// order the key, the value and the version.
    fn snapshot(&self) -> Vec<u8> {
        // postcard fails only on a sequence of unknown length or a full fixed buffer; a
        // BTreeMap has a length and the buffer is a Vec, so this cannot fail.
        let body = Postcard::encode(&self.map).expect("postcard encodes a BTreeMap into a Vec");
        [&KV2_SNAPSHOT_TAG[..], &body].concat()
    }

    /// Reads two formats, told apart by their first bytes:
    /// - kv2's own (starts with [`KV2_SNAPSHOT_TAG`]): what a restart or a redeploy of kv2
    ///   hands back to it;
    /// - kv v1's (starts with byte 1, then per entry `u32 LE length, key, u32 LE length,
    ///   value`): what the upgrade from kv hands over, and what the host's checkpoint still
    ///   holds after that upgrade until the next checkpoint, so this path must stay.
    ///
    /// Anything else is refused, so deploying kv2 over a tenant of another plugin fails (the
    /// tenant stays on its version) instead of inventing a state.
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.map = if let Some(body) = snapshot.strip_prefix(&KV2_SNAPSHOT_TAG[..]) {
            restore_v2(body)?
        } else if let Some((&KV1_SNAPSHOT, body)) = snapshot.split_first() {
            migrate_v1(body)?
        } else {
            let head = &snapshot[..snapshot.len().min(KV2_SNAPSHOT_TAG.len())];
            return Err(format!(
                "kv2: unknown snapshot format (first bytes {head:02x?}): expected kv2's \
                 (\"wkv\\x02\") or kv v1's (01)"
            ));
        };
        Ok(())
    }
}

/// Decodes kv2's format. Read as a list rather than a map so that a list out of key order or
/// with a key twice (never written by [`Kv2::snapshot`]: a corrupt snapshot) is refused rather
/// than silently merged; postcard encodes a map and a list of pairs alike.
fn restore_v2(body: &[u8]) -> Result<BTreeMap<String, Entry>, String> {
    let entries: Vec<(String, Entry)> =
        Postcard::decode(body).map_err(|e| format!("kv2 snapshot: {e}"))?;
    if let Some(pair) = entries.windows(2).find(|pair| pair[0].0 >= pair[1].0) {
        return Err(format!(
            "kv2 snapshot: keys out of order ({:?} then {:?})",
            pair[0].0, pair[1].0
        ));
    }
    Ok(entries.into_iter().collect())
}

/// Reads kv v1's format after its version byte, as kv's own `restore` does (a later duplicate
/// key wins there too, so both versions see the same state). Every key starts at version 1.
fn migrate_v1(mut rest: &[u8]) -> Result<BTreeMap<String, Entry>, String> {
    let mut map = BTreeMap::new();
    while !rest.is_empty() {
        let key = take_string(&mut rest)?;
        let value = take_string(&mut rest)?;
        map.insert(key, Entry { value, version: 1 });
    }
    Ok(map)
}

fn take_string(rest: &mut &[u8]) -> Result<String, String> {
    let (len, tail) = rest
        .split_first_chunk::<4>()
        .ok_or("kv v1 snapshot is truncated (in a length)")?;
    let len = u32::from_le_bytes(*len) as usize;
    if tail.len() < len {
        return Err("kv v1 snapshot is truncated (in a string)".to_string());
    }
    let (bytes, tail) = tail.split_at(len);
    *rest = tail;
    String::from_utf8(bytes.to_vec())
        .map_err(|e| format!("kv v1 snapshot holds invalid UTF-8: {e}"))
}

wraft_guest_sdk::export_state_machine!(Kv2);

#[cfg(test)]
mod tests {
    use super::*;
    use kv::Kv;
    use wraft_guest_sdk::testing::Harness;

    /// Sends JSON as a client would, through the byte-level ABI path.
    fn exec<T: wraft_guest_sdk::StateMachine>(sm: &mut Harness<T>, json: &str) -> String {
        String::from_utf8(sm.apply(json.as_bytes()).unwrap()).unwrap()
    }

    fn ask<T: wraft_guest_sdk::StateMachine>(sm: &Harness<T>, json: &str) -> String {
        String::from_utf8(sm.query(json.as_bytes()).unwrap()).unwrap()
    }

    fn put<T: wraft_guest_sdk::StateMachine>(sm: &mut Harness<T>, key: &str, value: &str) {
        exec(
            sm,
            &format!(r#"{{"op":"put","key":"{key}","value":"{value}"}}"#),
        );
    }

    #[test]
    fn kv_contract_put_get_delete_cas() {
        let mut sm = Harness::<Kv2>::new();
        let put_a = |v: &str| format!(r#"{{"op":"put","key":"a","value":"{v}"}}"#);
        assert_eq!(exec(&mut sm, &put_a("1")), r#"{"prev":null}"#);
        assert_eq!(exec(&mut sm, &put_a("2")), r#"{"prev":"1"}"#);
        assert_eq!(ask(&sm, r#"{"op":"get","key":"a"}"#), r#"{"value":"2"}"#);
        assert_eq!(ask(&sm, r#"{"op":"get","key":"zz"}"#), r#"{"value":null}"#);
        let delete = r#"{"op":"delete","key":"a"}"#;
        assert_eq!(exec(&mut sm, delete), r#"{"prev":"2"}"#);
        assert_eq!(exec(&mut sm, delete), r#"{"prev":null}"#);

        let create = r#"{"op":"cas","key":"k","expect":null,"value":"v1"}"#;
        assert_eq!(exec(&mut sm, create), r#"{"ok":true,"current":"v1"}"#);
        assert_eq!(exec(&mut sm, create), r#"{"ok":false,"current":"v1"}"#);
        let swap = r#"{"op":"cas","key":"k","expect":"v1","value":"v2"}"#;
        assert_eq!(exec(&mut sm, swap), r#"{"ok":true,"current":"v2"}"#);
        assert_eq!(exec(&mut sm, swap), r#"{"ok":false,"current":"v2"}"#);
        let absent = r#"{"op":"cas","key":"other","expect":"x","value":"y"}"#;
        assert_eq!(exec(&mut sm, absent), r#"{"ok":false,"current":null}"#);
    }

    #[test]
    fn kv_contract_scan() {
        let mut sm = Harness::<Kv2>::new();
        for key in ["b2", "a", "b1", "c", "b3", "b"] {
            put(&mut sm, key, &format!("v{key}"));
        }
        assert_eq!(
            ask(&sm, r#"{"op":"scan","prefix":"b"}"#),
            r#"{"items":[["b","vb"],["b1","vb1"],["b2","vb2"],["b3","vb3"]]}"#
        );
        assert_eq!(
            ask(&sm, r#"{"op":"scan","prefix":"b1","limit":5}"#),
            r#"{"items":[["b1","vb1"]]}"#
        );
        assert_eq!(
            ask(&sm, r#"{"op":"scan","prefix":"","limit":2}"#),
            r#"{"items":[["a","va"],["b","vb"]]}"#
        );
        assert_eq!(ask(&sm, r#"{"op":"scan","prefix":"x"}"#), r#"{"items":[]}"#);
        for i in 0..1005 {
            put(&mut sm, &format!("k{i:05}"), "");
        }
        match sm.query_typed(Query::Scan {
            prefix: "k".into(),
            limit: None,
        }) {
            Ok(QueryOutput::Items { items }) => assert_eq!(items.len(), DEFAULT_SCAN_LIMIT),
            other => panic!("scan: {other:?}"),
        }
    }

    /// kv and kv2 side by side on the same commands and queries: every reply is the same
    /// bytes, every refusal a refusal. A fixed pseudo-random sequence over a few keys, so that
    /// puts, deletes and cas hit present and absent keys alike.
    #[test]
    fn same_replies_as_kv_byte_for_byte() {
        let (mut v1, mut v2) = (Harness::<Kv>::new(), Harness::<Kv2>::new());
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for step in 0..3000 {
            let key = format!("k{}", next(6));
            let value = format!("v{}", next(4));
            let command = match next(8) {
                0..=2 => format!(r#"{{"op":"put","key":"{key}","value":"{value}"}}"#),
                3 => format!(r#"{{"op":"delete","key":"{key}"}}"#),
                4 => format!(r#"{{"op":"cas","key":"{key}","expect":null,"value":"{value}"}}"#),
                5 => format!(r#"{{"op":"cas","key":"{key}","expect":"{value}","value":"x"}}"#),
                6 => format!(r#"{{"op":"cas","key":"{key}","value":"{value}"}}"#),
                _ => r#"{"op":"put","key":"k1"}"#.to_string(),
            };
            let (a, b) = (v1.apply(command.as_bytes()), v2.apply(command.as_bytes()));
            match (&a, &b) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "step {step}: {command}"),
                (Err(_), Err(_)) => {}
                _ => panic!("step {step}: {command}: kv says {a:?}, kv2 says {b:?}"),
            }
            let query = match next(3) {
                0 => format!(r#"{{"op":"get","key":"{key}"}}"#),
                1 => format!(r#"{{"op":"scan","prefix":"k","limit":{}}}"#, next(8)),
                _ => r#"{"op":"scan","prefix":""}"#.to_string(),
            };
            assert_eq!(
                v1.query(query.as_bytes()),
                v2.query(query.as_bytes()),
                "step {step}: {query}"
            );
        }
    }

    #[test]
    fn count_and_versions() {
        let mut sm = Harness::<Kv2>::new();
        assert_eq!(ask(&sm, r#"{"op":"count"}"#), r#"{"count":0}"#);
        put(&mut sm, "a", "1");
        put(&mut sm, "a", "2");
        put(&mut sm, "b", "1");
        assert_eq!(ask(&sm, r#"{"op":"count"}"#), r#"{"count":2}"#);
        assert_eq!(
            ask(&sm, r#"{"op":"version","key":"a"}"#),
            r#"{"version":2}"#
        );
        assert_eq!(
            ask(&sm, r#"{"op":"version","key":"nope"}"#),
            r#"{"version":null}"#
        );
        // A successful cas is a write; a failed one is not.
        exec(
            &mut sm,
            r#"{"op":"cas","key":"b","expect":"1","value":"2"}"#,
        );
        exec(
            &mut sm,
            r#"{"op":"cas","key":"b","expect":"1","value":"3"}"#,
        );
        let version = |sm: &Harness<Kv2>, key: &str| {
            sm.query_typed(Query::Version { key: key.into() }).unwrap()
        };
        assert_eq!(version(&sm, "b"), QueryOutput::Version { version: Some(2) });
        // A delete ends the history: the key starts again at 1.
        exec(&mut sm, r#"{"op":"delete","key":"a"}"#);
        assert_eq!(version(&sm, "a"), QueryOutput::Version { version: None });
        put(&mut sm, "a", "again");
        assert_eq!(version(&sm, "a"), QueryOutput::Version { version: Some(1) });
        assert_eq!(
            sm.query_typed(Query::Count),
            Ok(QueryOutput::Count { count: 2 })
        );
    }

    #[test]
    fn malformed_input_is_a_bad_command_not_a_panic() {
        let mut sm = Harness::<Kv2>::new();
        for bad in [
            "",
            "not json",
            "[]",
            r#"{"key":"a","value":"b"}"#,
            r#"{"op":"frobnicate","key":"a"}"#,
            r#"{"op":"put","key":"a"}"#,
            r#"{"op":"put","key":1,"value":"b"}"#,
            r#"{"op":"put","key":"a","value":null}"#,
            r#"{"op":"cas","key":"a","value":"b"}"#,
            r#"{"op":"get","key":"a"}"#,
            r#"{"op":"count"}"#,
        ] {
            let err = sm.apply(bad.as_bytes()).unwrap_err();
            assert!(err.starts_with("bad command: "), "{bad}: {err}");
        }
        let err = sm
            .apply(br#"{"op":"cas","key":"a","value":"b"}"#)
            .unwrap_err();
        assert!(err.contains("missing field `expect`"), "{err}");
        for bad in [
            "{",
            r#"{"op":"put","key":"a","value":"b"}"#,
            r#"{"op":"get"}"#,
            r#"{"op":"version"}"#,
            r#"{"op":"scan","prefix":"a","limit":-1}"#,
            r#"{"op":"scan","prefix":"a","limit":"ten"}"#,
        ] {
            let err = sm.query(bad.as_bytes()).unwrap_err();
            assert!(err.starts_with("bad query: "), "{bad}: {err}");
        }
        assert_eq!(
            sm.state(),
            &Kv2::default(),
            "failed commands must change nothing"
        );
    }

    /// The upgrade the cluster performs: kv v1's state, snapshotted by kv's own code, restored
    /// into kv2; then kv2 keeps working on it.
    #[test]
    fn upgrade_from_kv_v1_keeps_every_key() {
        let mut v1 = Harness::<Kv>::new();
        for i in 0..500 {
            put(&mut v1, &format!("key-{i:03}"), &format!("value-{i}"));
        }
        put(&mut v1, "ünïcödé", "");
        put(&mut v1, "", "empty key");
        exec(&mut v1, r#"{"op":"delete","key":"key-007"}"#);

        let mut v2 = v1.upgrade_to::<Kv2>().expect("kv2 restores kv's snapshot");
        for i in (0..500).filter(|&i| i != 7) {
            let key = format!("key-{i:03}");
            assert_eq!(
                ask(&v2, &format!(r#"{{"op":"get","key":"{key}"}}"#)),
                format!(r#"{{"value":"value-{i}"}}"#),
                "{key}"
            );
            assert_eq!(
                ask(&v2, &format!(r#"{{"op":"version","key":"{key}"}}"#)),
                r#"{"version":1}"#,
                "{key}: taken over from v1, so version 1"
            );
        }
        assert_eq!(
            ask(&v2, r#"{"op":"get","key":"key-007"}"#),
            r#"{"value":null}"#
        );
        assert_eq!(
            ask(&v2, r#"{"op":"get","key":"ünïcödé"}"#),
            r#"{"value":""}"#
        );
        assert_eq!(
            ask(&v2, r#"{"op":"get","key":""}"#),
            r#"{"value":"empty key"}"#
        );
        assert_eq!(ask(&v2, r#"{"op":"count"}"#), r#"{"count":501}"#);
        // Every key was written once, so the result is exactly as if kv2 had run all along:
        // replicas that upgraded and replicas that (hypothetically) never ran v1 agree.
        let mut native = Harness::<Kv2>::new();
        for (key, value) in v2
            .state()
            .map
            .iter()
            .map(|(k, e)| (k.clone(), e.value.clone()))
        {
            native.apply_typed(Command::Put { key, value }).unwrap();
        }
        assert_eq!(v2.snapshot(), native.snapshot());

        // The scan still answers exactly as v1 did.
        let scan = r#"{"op":"scan","prefix":"key-0","limit":20}"#;
        assert_eq!(ask(&v2, scan), ask(&v1, scan));
        v2.round_trip();
        put(&mut v2, "key-001", "new");
        assert_eq!(
            ask(&v2, r#"{"op":"version","key":"key-001"}"#),
            r#"{"version":2}"#
        );
    }

    /// A restart or a second deploy of kv2 hands kv2 its own snapshot: nothing is lost, and the
    /// versions (which kv v1's format cannot carry) survive, proving the v2 path was taken.
    #[test]
    fn upgrade_from_kv2_to_kv2_keeps_keys_and_versions() {
        let mut first = Harness::<Kv2>::new();
        for i in 0..100 {
            put(&mut first, &format!("k{i}"), "a");
        }
        put(&mut first, "k5", "b");
        put(&mut first, "k5", "c");
        let second = first
            .upgrade_to::<Kv2>()
            .expect("kv2 restores its own snapshot");
        assert_eq!(second.state(), first.state());
        assert_eq!(
            ask(&second, r#"{"op":"version","key":"k5"}"#),
            r#"{"version":3}"#
        );
        assert_eq!(ask(&second, r#"{"op":"count"}"#), r#"{"count":100}"#);
        assert!(second.snapshot().starts_with(KV2_SNAPSHOT_TAG));
    }

    /// kv v1 reads kv2's format (keys and values; it keeps no versions), so a rollback from
    /// kv2 to kv keeps every key.
    #[test]
    fn rollback_to_kv_v1_keeps_every_key() {
        let mut v2 = Harness::<Kv2>::new();
        put(&mut v2, "a", "1");
        put(&mut v2, "b", "2");
        put(&mut v2, "a", "3");
        let v1 = v2.upgrade_to::<Kv>().expect("kv restores kv2's snapshot");
        assert_eq!(
            v1.query(br#"{"op":"get","key":"a"}"#)
                .map(String::from_utf8),
            Ok(Ok(r#"{"value":"3"}"#.to_string()))
        );
        assert_eq!(
            v1.query(br#"{"op":"get","key":"b"}"#)
                .map(String::from_utf8),
            Ok(Ok(r#"{"value":"2"}"#.to_string()))
        );
    }

    /// Hand-written kv v1 snapshots (the format is frozen, so these bytes are a fixture that
    /// does not depend on kv's code), then corrupt input of both formats.
    #[test]
    fn restore_detects_the_format_and_refuses_garbage() {
        let v1_bytes = [
            &[KV1_SNAPSHOT][..],
            &1u32.to_le_bytes(),
            b"a",
            &2u32.to_le_bytes(),
            b"xy",
            &0u32.to_le_bytes(),
            &0u32.to_le_bytes(),
        ]
        .concat();
        let sm = Harness::<Kv2>::from_snapshot(&v1_bytes).unwrap();
        assert_eq!(
            ask(&sm, r#"{"op":"scan","prefix":""}"#),
            r#"{"items":[["",""],["a","xy"]]}"#
        );
        assert_eq!(
            Harness::<Kv2>::from_snapshot(&[KV1_SNAPSHOT])
                .unwrap()
                .state(),
            &Kv2::default(),
            "kv v1's empty map"
        );
        Harness::<Kv2>::new().round_trip();

        let good = sm.snapshot();
        let mut padded = good.clone();
        padded.push(0);
        // Two entries with keys swapped: decodable, but never written by kv2.
        let swapped = [
            &KV2_SNAPSHOT_TAG[..],
            &Postcard::encode(&vec![
                (
                    "b",
                    Entry {
                        value: "1".into(),
                        version: 1,
                    },
                ),
                (
                    "a",
                    Entry {
                        value: "2".into(),
                        version: 1,
                    },
                ),
            ])
            .unwrap(),
        ]
        .concat();
        for bad in [
            &b""[..],
            &[0],
            &[2, 0, 0, 0],
            b"wkv",
            b"wkv\x03",
            b"wkv\x02",
            &good[..good.len() - 1],
            &padded,
            &swapped,
            &v1_bytes[..v1_bytes.len() - 1],
            &[KV1_SNAPSHOT, 1, 0, 0, 0, 0xff, 0, 0, 0, 0],
            // A counter's snapshot (an i64): must not be mistaken for a map.
            &2i64.to_le_bytes(),
        ] {
            assert!(
                Harness::<Kv2>::from_snapshot(bad).is_err(),
                "accepted {bad:?}"
            );
        }
        let err = Harness::<Kv2>::from_snapshot(b"wkv\x03")
            .map(|_| ())
            .unwrap_err();
        assert!(err.contains("unknown snapshot format"), "{err}");
    }
}
