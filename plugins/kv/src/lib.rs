//! `kv`: a replicated string key-value map, as a wraft state machine.
//!
//! Owns a `BTreeMap<String, String>` and its JSON command language (the contract below is
//! stable: clients and tests rely on the exact field names). Keeps true: every input, however
//! malformed, yields a reply or an `Err` with a clear message, never a panic; a failed command
//! changes nothing; iteration and snapshots follow key order, so replicas agree byte for byte.
//!
//! Commands (`apply`):
//! - `{"op":"put","key":K,"value":V}` → `{"prev":V|null}`
//! - `{"op":"delete","key":K}` → `{"prev":V|null}`
//! - `{"op":"cas","key":K,"expect":V|null,"value":V}` → `{"ok":bool,"current":V|null}`, where
//!   `current` is the value after the operation and `expect: null` means "key absent".
//!
//! Queries (`query`):
//! - `{"op":"get","key":K}` → `{"value":V|null}`
//! - `{"op":"scan","prefix":P,"limit":N}` → `{"items":[[K,V],...]}` in key order; without
//!   `limit` at most [`DEFAULT_SCAN_LIMIT`] items.

use std::collections::BTreeMap;
use std::ops::Bound;

use serde::{Deserialize, Deserializer, Serialize};
use wraft_guest_sdk::{Codec as _, StateMachine};

/// How kv2's snapshots start (see `restore`).
const KV2_SNAPSHOT_TAG: &[u8] = b"wkv\x02";

/// How many items a scan without `limit` returns at most.
pub const DEFAULT_SCAN_LIMIT: usize = 1000;

/// Snapshot format version; the first byte of every snapshot.
const SNAPSHOT_V1: u8 = 1;

/// The replicated map.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Kv {
    map: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Command {
    Put {
        key: String,
        value: String,
    },
    Delete {
        key: String,
    },
    Cas {
        key: String,
        // `Option<Option<_>>` so that a missing `expect` is an error while `null` is a value.
        #[serde(default, deserialize_with = "present")]
        expect: Option<Option<String>>,
        value: String,
    },
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Query {
    Get {
        key: String,
    },
    Scan {
        prefix: String,
        limit: Option<usize>,
    },
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[derive(Serialize)]
struct Prev<'a> {
    prev: Option<&'a str>,
}

#[derive(Serialize)]
struct CasReply<'a> {
    ok: bool,
    current: Option<&'a str>,
}

#[derive(Serialize)]
struct GetReply<'a> {
    value: Option<&'a str>,
}

#[derive(Serialize)]
struct ScanReply<'a> {
    items: Vec<(&'a str, &'a str)>,
}

fn encode<T: Serialize>(reply: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(reply).map_err(|e| format!("kv: cannot encode reply: {e}"))
}

impl StateMachine for Kv {
    fn apply(&mut self, command: &[u8]) -> Result<Vec<u8>, String> {
        let command: Command =
            serde_json::from_slice(command).map_err(|e| format!("invalid kv command: {e}"))?;
        match command {
            Command::Put { key, value } => {
                let prev = self.map.insert(key, value);
                encode(&Prev {
                    prev: prev.as_deref(),
                })
            }
            Command::Delete { key } => {
                let prev = self.map.remove(&key);
                encode(&Prev {
                    prev: prev.as_deref(),
                })
            }
            Command::Cas { key, expect, value } => {
                let expect = expect.ok_or("invalid kv command: missing field `expect`")?;
                let ok = self.map.get(&key) == expect.as_ref();
                if ok {
                    self.map.insert(key.clone(), value);
                }
                encode(&CasReply {
                    ok,
                    current: self.map.get(&key).map(String::as_str),
                })
            }
        }
    }

    fn query(&self, query: &[u8]) -> Result<Vec<u8>, String> {
        let query: Query =
            serde_json::from_slice(query).map_err(|e| format!("invalid kv query: {e}"))?;
        match query {
            Query::Get { key } => encode(&GetReply {
                value: self.map.get(&key).map(String::as_str),
            }),
            Query::Scan { prefix, limit } => {
                let items = self
                    .map
                    .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
                    .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                    .take(limit.unwrap_or(DEFAULT_SCAN_LIMIT))
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                encode(&ScanReply { items })
            }
        }
    }

    /// Binary rather than JSON so that encoding has no failure path: a version byte, then per
    /// entry in key order `u32 LE key length, key, u32 LE value length, value`.
    fn snapshot(&self) -> Vec<u8> {
        let size: usize = self.map.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
        let mut out = Vec::with_capacity(1 + size);
        out.push(SNAPSHOT_V1);
        for (k, v) in &self.map {
            for s in [k, v] {
                // Strings on wasm32 are far below 4 GiB, so the length always fits.
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
        out
    }

    /// Reads kv's own format, and kv2's (what a rollback from kv2 to kv hands over): the same
    /// keys and values, without kv2's per-key versions, which kv does not keep.
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        if let Some(body) = snapshot.strip_prefix(KV2_SNAPSHOT_TAG) {
            let entries: Vec<(String, (String, u64))> = wraft_guest_sdk::Postcard::decode(body)
                .map_err(|e| format!("kv2 snapshot (a rollback from kv2): {e}"))?;
            self.map = entries
                .into_iter()
                .map(|(key, (value, _version))| (key, value))
                .collect();
            return Ok(());
        }
        let (&version, mut rest) = snapshot
            .split_first()
            .ok_or("kv snapshot is empty (expected at least the version byte)")?;
        if version != SNAPSHOT_V1 {
            return Err(format!(
                "kv snapshot has version {version}, expected {SNAPSHOT_V1}"
            ));
        }
        let mut map = BTreeMap::new();
        while !rest.is_empty() {
            let key = take_string(&mut rest)?;
            let value = take_string(&mut rest)?;
            map.insert(key, value);
        }
        self.map = map;
        Ok(())
    }
}

fn take_string(rest: &mut &[u8]) -> Result<String, String> {
    let (len, tail) = rest
        .split_first_chunk::<4>()
        .ok_or("kv snapshot is truncated (in a length)")?;
    let len = u32::from_le_bytes(*len) as usize;
    if tail.len() < len {
        return Err("kv snapshot is truncated (in a string)".to_string());
    }
    let (bytes, tail) = tail.split_at(len);
    *rest = tail;
    String::from_utf8(bytes.to_vec()).map_err(|e| format!("kv snapshot holds invalid UTF-8: {e}"))
}

wraft_guest_sdk::export_state_machine!(Kv);

#[cfg(test)]
mod tests {
    use super::*;
    use wraft_guest_sdk::testing::Harness;

    fn exec(sm: &mut Harness<Kv>, json: &str) -> String {
        String::from_utf8(sm.apply(json.as_bytes()).unwrap()).unwrap()
    }

    fn ask(sm: &Harness<Kv>, json: &str) -> String {
        String::from_utf8(sm.query(json.as_bytes()).unwrap()).unwrap()
    }

    #[test]
    fn put_get_delete() {
        let mut sm = Harness::<Kv>::new();
        assert_eq!(
            exec(&mut sm, r#"{"op":"put","key":"a","value":"1"}"#),
            r#"{"prev":null}"#
        );
        assert_eq!(
            exec(&mut sm, r#"{"op":"put","key":"a","value":"2"}"#),
            r#"{"prev":"1"}"#
        );
        assert_eq!(ask(&sm, r#"{"op":"get","key":"a"}"#), r#"{"value":"2"}"#);
        assert_eq!(ask(&sm, r#"{"op":"get","key":"zz"}"#), r#"{"value":null}"#);
        assert_eq!(
            exec(&mut sm, r#"{"op":"delete","key":"a"}"#),
            r#"{"prev":"2"}"#
        );
        assert_eq!(
            exec(&mut sm, r#"{"op":"delete","key":"a"}"#),
            r#"{"prev":null}"#
        );
        assert_eq!(ask(&sm, r#"{"op":"get","key":"a"}"#), r#"{"value":null}"#);
    }

    #[test]
    fn cas() {
        let mut sm = Harness::<Kv>::new();
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
    fn scan_in_key_order_with_prefix_and_limit() {
        let mut sm = Harness::<Kv>::new();
        for key in ["b2", "a", "b1", "c", "b3", "b"] {
            exec(
                &mut sm,
                &format!(r#"{{"op":"put","key":"{key}","value":"v{key}"}}"#),
            );
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
    }

    #[test]
    fn scan_default_limit() {
        let mut sm = Harness::<Kv>::new();
        for i in 0..1005 {
            exec(
                &mut sm,
                &format!(r#"{{"op":"put","key":"k{i:05}","value":""}}"#),
            );
        }
        let reply: serde_json::Value =
            serde_json::from_str(&ask(&sm, r#"{"op":"scan","prefix":"k"}"#)).unwrap();
        assert_eq!(reply["items"].as_array().unwrap().len(), DEFAULT_SCAN_LIMIT);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let mut sm = Harness::<Kv>::new();
        let bad_commands = [
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
        ];
        for bad in bad_commands {
            let err = sm.apply(bad.as_bytes()).unwrap_err();
            assert!(err.starts_with("invalid kv command"), "{bad}: {err}");
        }
        let err = sm
            .apply(br#"{"op":"cas","key":"a","value":"b"}"#)
            .unwrap_err();
        assert!(err.contains("expect"), "{err}");
        for bad in [
            "{",
            r#"{"op":"put","key":"a","value":"b"}"#,
            r#"{"op":"get"}"#,
            r#"{"op":"scan","prefix":"a","limit":-1}"#,
            r#"{"op":"scan","prefix":"a","limit":"ten"}"#,
        ] {
            let err = sm.query(bad.as_bytes()).unwrap_err();
            assert!(err.starts_with("invalid kv query"), "{bad}: {err}");
        }
        assert_eq!(
            sm.state(),
            &Kv::default(),
            "failed commands must change nothing"
        );
    }

    #[test]
    fn snapshot_round_trip_and_restore_replaces() {
        let mut sm = Harness::<Kv>::new();
        exec(&mut sm, r#"{"op":"put","key":"x","value":"1"}"#);
        exec(&mut sm, r#"{"op":"put","key":"ünï","value":""}"#);
        let snap = sm.round_trip();

        let mut other = Harness::<Kv>::new();
        exec(&mut other, r#"{"op":"put","key":"gone","value":"soon"}"#);
        other.restore(&snap).unwrap();
        assert_eq!(other.state(), sm.state());
        assert_eq!(
            ask(&other, r#"{"op":"get","key":"gone"}"#),
            r#"{"value":null}"#
        );

        Harness::<Kv>::new().round_trip();
        for bad in [
            &b""[..],
            &[2],
            &[1, 5, 0, 0],
            &[1, 1, 0, 0, 0, b'a', 1, 0, 0, 0],
        ] {
            assert!(Harness::<Kv>::new().restore(bad).is_err(), "{bad:?}");
        }
    }
}
