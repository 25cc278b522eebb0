//! `kvstore`: the `kv` plugin (plugins/kv) as a store-model state machine: the same replicated
//! string key-value map and the same JSON contract, with the map in the tenant's host storage
//! instead of the module's memory.
//!
//! Owns nothing in memory (every call runs on a fresh instance); each key is stored under its
//! own UTF-8 bytes, its value as UTF-8 bytes. Keeps true: every command and query gets `kv`'s
//! reply byte for byte, errors included; every input, however malformed, yields a reply or an
//! `Err`, never a panic; a failed command writes nothing (each command writes at most once,
//! after every check); scans follow key order.
//!
//! Commands (`apply`), exactly as `kv`:
//! - `{"op":"put","key":K,"value":V}` → `{"prev":V|null}`
//! - `{"op":"delete","key":K}` → `{"prev":V|null}`
//! - `{"op":"cas","key":K,"expect":V|null,"value":V}` → `{"ok":bool,"current":V|null}`, where
//!   `current` is the value after the operation and `expect: null` means "key absent".
//!
//! Queries (`query`), exactly as `kv`:
//! - `{"op":"get","key":K}` → `{"value":V|null}`
//! - `{"op":"scan","prefix":P,"limit":N}` → `{"items":[[K,V],...]}` in key order; without
//!   `limit` at most [`DEFAULT_SCAN_LIMIT`] items.
//!
//! The one difference: host storage caps keys at 4096 bytes and values at 1 MiB
//! ([`storage::MAX_KEY_BYTES`], [`storage::MAX_VALUE_BYTES`]), where `kv` has no per-entry cap.
//! A write beyond them is the error `kv: storage key is N bytes; the limit is 4096` (or
//! `value`, `1048576`), and changes nothing. Reads of such a key find nothing, as they must.
//!
//! Upgrades: the SDK's store snapshot format is `kv`'s snapshot format (a version byte 1, then
//! length-prefixed key and value per entry in key order), so `kvstore` can be deployed over a
//! running `kv` tenant (the host hands kv's snapshot to kvstore's generated restore), and `kv`
//! over `kvstore`.

use serde::{Deserialize, Deserializer, Serialize};
use wraft_guest_sdk::{storage, StoreStateMachine};

/// How many items a scan without `limit` returns at most (as in `kv`).
pub const DEFAULT_SCAN_LIMIT: usize = 1000;

/// The state machine; its state is the tenant's storage.
pub struct KvStore;

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

/// A storage error, in kv's words.
fn kv_err(e: String) -> String {
    format!("kv: {e}")
}

/// Stored bytes as a string. Only a restore of a foreign snapshot can store anything else.
fn text(bytes: Vec<u8>, what: &str) -> Result<String, String> {
    String::from_utf8(bytes).map_err(|e| format!("kv: a stored {what} is not UTF-8: {e}"))
}

/// The value of `key`. A key over the cap cannot be stored, so it has none.
fn lookup(key: &str) -> Result<Option<String>, String> {
    if key.len() > storage::MAX_KEY_BYTES {
        return Ok(None);
    }
    storage::get(key.as_bytes())
        .map_err(kv_err)?
        .map(|v| text(v, "value"))
        .transpose()
}

fn store(key: &str, value: &str) -> Result<(), String> {
    storage::put(key.as_bytes(), value.as_bytes()).map_err(kv_err)
}

impl StoreStateMachine for KvStore {
    fn apply(command: &[u8]) -> Result<Vec<u8>, String> {
        let command: Command =
            serde_json::from_slice(command).map_err(|e| format!("invalid kv command: {e}"))?;
        match command {
            Command::Put { key, value } => {
                let prev = lookup(&key)?;
                store(&key, &value)?;
                encode(&Prev {
                    prev: prev.as_deref(),
                })
            }
            Command::Delete { key } => {
                let prev = lookup(&key)?;
                if prev.is_some() {
                    storage::delete(key.as_bytes()).map_err(kv_err)?;
                }
                encode(&Prev {
                    prev: prev.as_deref(),
                })
            }
            Command::Cas { key, expect, value } => {
                let expect = expect.ok_or("invalid kv command: missing field `expect`")?;
                let current = lookup(&key)?;
                let ok = current == expect;
                let current = if ok {
                    store(&key, &value)?;
                    Some(value)
                } else {
                    current
                };
                encode(&CasReply {
                    ok,
                    current: current.as_deref(),
                })
            }
        }
    }

    fn query(query: &[u8]) -> Result<Vec<u8>, String> {
        let query: Query =
            serde_json::from_slice(query).map_err(|e| format!("invalid kv query: {e}"))?;
        match query {
            Query::Get { key } => encode(&GetReply {
                value: lookup(&key)?.as_deref(),
            }),
            Query::Scan { prefix, limit } => {
                let limit = limit.unwrap_or(DEFAULT_SCAN_LIMIT);
                let mut items = Vec::new();
                // A prefix over the key cap matches no key.
                if prefix.len() <= storage::MAX_KEY_BYTES {
                    for pair in storage::scan_prefix(prefix.as_bytes()).limit(limit) {
                        let (key, value) = pair.map_err(kv_err)?;
                        items.push((text(key, "key")?, text(value, "value")?));
                    }
                }
                encode(&ScanReply {
                    items: items
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect(),
                })
            }
        }
    }
}

wraft_guest_sdk::export_store_state_machine!(KvStore);

#[cfg(test)]
mod tests {
    use kv::Kv;
    use wraft_guest_sdk::testing::{Harness, StoreHarness};

    use super::*;

    /// kv and kvstore side by side: every command and query goes to both and must get the same
    /// reply, errors included.
    struct Both {
        kv: Harness<Kv>,
        store: StoreHarness<KvStore>,
    }

    impl Both {
        fn new() -> Both {
            Both {
                kv: Harness::new(),
                store: StoreHarness::new(),
            }
        }

        fn exec(&mut self, json: &str) -> Result<String, String> {
            let expected = self.kv.apply(json.as_bytes());
            let got = self.store.apply(json.as_bytes());
            assert_eq!(got, expected, "apply {json}");
            got.map(|r| String::from_utf8(r).unwrap())
        }

        fn ask(&self, json: &str) -> Result<String, String> {
            let expected = self.kv.query(json.as_bytes());
            let got = self.store.query(json.as_bytes());
            assert_eq!(got, expected, "query {json}");
            got.map(|r| String::from_utf8(r).unwrap())
        }

        /// The two states are the same: kv's snapshot is byte for byte the store snapshot.
        fn same_state(&self) {
            assert_eq!(self.store.snapshot().unwrap(), self.kv.snapshot());
        }
    }

    fn put(key: &str, value: &str) -> String {
        serde_json::json!({"op": "put", "key": key, "value": value}).to_string()
    }

    #[test]
    fn put_get_delete_cas_like_kv() {
        let mut both = Both::new();
        assert_eq!(both.exec(&put("a", "1")).unwrap(), r#"{"prev":null}"#);
        assert_eq!(both.exec(&put("a", "2")).unwrap(), r#"{"prev":"1"}"#);
        assert_eq!(
            both.ask(r#"{"op":"get","key":"a"}"#).unwrap(),
            r#"{"value":"2"}"#
        );
        both.ask(r#"{"op":"get","key":"zz"}"#).unwrap();
        assert_eq!(
            both.exec(r#"{"op":"delete","key":"a"}"#).unwrap(),
            r#"{"prev":"2"}"#
        );
        both.exec(r#"{"op":"delete","key":"a"}"#).unwrap();
        let create = r#"{"op":"cas","key":"k","expect":null,"value":"v1"}"#;
        assert_eq!(both.exec(create).unwrap(), r#"{"ok":true,"current":"v1"}"#);
        assert_eq!(both.exec(create).unwrap(), r#"{"ok":false,"current":"v1"}"#);
        let swap = r#"{"op":"cas","key":"k","expect":"v1","value":"v2"}"#;
        assert_eq!(both.exec(swap).unwrap(), r#"{"ok":true,"current":"v2"}"#);
        both.exec(swap).unwrap();
        both.exec(r#"{"op":"cas","key":"other","expect":"x","value":"y"}"#)
            .unwrap();
        both.exec(r#"{"op":"cas","key":"k","expect":"v2","value":"v2"}"#)
            .unwrap();
        both.exec(&put("ünï", "")).unwrap();
        both.exec(&put("", "empty key")).unwrap();
        both.same_state();
        // Only `k`, `ünï` and the empty key are stored, under their own bytes.
        let store = both.store.store();
        let keys: Vec<&[u8]> = store.keys().map(Vec::as_slice).collect();
        assert_eq!(keys, [&b""[..], b"k", "ünï".as_bytes()]);
    }

    #[test]
    fn scans_like_kv() {
        let mut both = Both::new();
        for key in ["b2", "a", "b1", "c", "b3", "b", "b\u{10ffff}", "ba"] {
            both.exec(&put(key, &format!("v{key}"))).unwrap();
        }
        let last_char = serde_json::json!({"op":"scan","prefix":"b\u{10ffff}"}).to_string();
        for query in [
            r#"{"op":"scan","prefix":"b"}"#,
            r#"{"op":"scan","prefix":"b1","limit":5}"#,
            r#"{"op":"scan","prefix":"","limit":2}"#,
            r#"{"op":"scan","prefix":"","limit":0}"#,
            r#"{"op":"scan","prefix":""}"#,
            r#"{"op":"scan","prefix":"x"}"#,
            &last_char,
            r#"{"op":"scan","prefix":"b","limit":18446744073709551615}"#,
        ] {
            both.ask(query).unwrap();
        }
        assert_eq!(
            both.ask(r#"{"op":"scan","prefix":"b","limit":3}"#).unwrap(),
            r#"{"items":[["b","vb"],["b1","vb1"],["b2","vb2"]]}"#
        );
    }

    #[test]
    fn scan_default_limit_pages_through_the_host() {
        let mut both = Both::new();
        for i in 0..1005 {
            both.exec(&put(&format!("k{i:05}"), "")).unwrap();
        }
        let reply: serde_json::Value =
            serde_json::from_str(&both.ask(r#"{"op":"scan","prefix":"k"}"#).unwrap()).unwrap();
        assert_eq!(reply["items"].as_array().unwrap().len(), DEFAULT_SCAN_LIMIT);
        both.ask(r#"{"op":"scan","prefix":"k","limit":1005}"#)
            .unwrap();
        both.same_state();
    }

    #[test]
    fn big_values_page_at_4_mib() {
        let mut both = Both::new();
        let big = "x".repeat(900 * 1024);
        for i in 0..7 {
            both.exec(&put(&format!("big{i}"), &big)).unwrap();
        }
        // 7 × 900 KiB: more than one 4 MiB host page, so the scan pages.
        let reply: serde_json::Value =
            serde_json::from_str(&both.ask(r#"{"op":"scan","prefix":"big"}"#).unwrap()).unwrap();
        assert_eq!(reply["items"].as_array().unwrap().len(), 7);
        both.same_state();
    }

    #[test]
    fn malformed_input_gets_kvs_errors() {
        let mut both = Both::new();
        both.exec(&put("a", "1")).unwrap();
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
        ] {
            let err = both.exec(bad).unwrap_err();
            assert!(err.starts_with("invalid kv command"), "{bad}: {err}");
        }
        for bad in [
            "{",
            r#"{"op":"put","key":"a","value":"b"}"#,
            r#"{"op":"get"}"#,
            r#"{"op":"scan","prefix":"a","limit":-1}"#,
            r#"{"op":"scan","prefix":"a","limit":"ten"}"#,
        ] {
            let err = both.ask(bad).unwrap_err();
            assert!(err.starts_with("invalid kv query"), "{bad}: {err}");
        }
        both.same_state();
    }

    /// The documented difference: the host's caps. Over them, an error and no write; reads of
    /// such keys find nothing.
    #[test]
    fn keys_and_values_over_the_caps_are_refused() {
        let mut sm = StoreHarness::<KvStore>::new();
        let long_key = "k".repeat(storage::MAX_KEY_BYTES + 1);
        assert_eq!(
            sm.apply(put(&long_key, "v").as_bytes()),
            Err("kv: storage key is 4097 bytes; the limit is 4096".to_string())
        );
        let cas = serde_json::json!({"op":"cas","key":long_key,"expect":null,"value":"v"});
        assert!(sm.apply(cas.to_string().as_bytes()).is_err());
        let big = "v".repeat(storage::MAX_VALUE_BYTES + 1);
        assert_eq!(
            sm.apply(put("k", &big).as_bytes()),
            Err("kv: storage value is 1048577 bytes; the limit is 1048576".to_string())
        );
        let get = serde_json::json!({"op":"get","key":long_key}).to_string();
        assert_eq!(sm.query(get.as_bytes()), Ok(br#"{"value":null}"#.to_vec()));
        let delete = serde_json::json!({"op":"delete","key":long_key}).to_string();
        assert_eq!(
            sm.apply(delete.as_bytes()),
            Ok(br#"{"prev":null}"#.to_vec())
        );
        let scan = serde_json::json!({"op":"scan","prefix":long_key}).to_string();
        assert_eq!(sm.query(scan.as_bytes()), Ok(br#"{"items":[]}"#.to_vec()));
        assert!(sm.store().is_empty(), "failed commands wrote nothing");
        // At the caps exactly, fine.
        let max_key = "k".repeat(storage::MAX_KEY_BYTES);
        let max_value = "v".repeat(storage::MAX_VALUE_BYTES);
        sm.apply(put(&max_key, &max_value).as_bytes()).unwrap();
        assert_eq!(sm.get(max_key.as_bytes()), Some(max_value.into_bytes()));
    }

    /// A long pseudo-random command sequence: kv and kvstore agree on every reply and on the
    /// final state.
    #[test]
    fn random_sequences_agree_with_kv() {
        let mut both = Both::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let keys = ["", "a", "ab", "abc", "b", "ba", "é", "z"];
        let values = ["", "1", "2", "ü"];
        for _ in 0..3000 {
            let key = keys[next(keys.len() as u64) as usize];
            let value = values[next(values.len() as u64) as usize];
            let expect = match next(3) {
                0 => serde_json::Value::Null,
                _ => values[next(values.len() as u64) as usize].into(),
            };
            let json = match next(6) {
                0 | 1 => put(key, value),
                2 => serde_json::json!({"op":"delete","key":key}).to_string(),
                3 => serde_json::json!({"op":"cas","key":key,"expect":expect,"value":value})
                    .to_string(),
                4 => {
                    both.ask(&serde_json::json!({"op":"get","key":key}).to_string())
                        .unwrap();
                    continue;
                }
                _ => {
                    let limit = next(5);
                    both.ask(
                        &serde_json::json!({"op":"scan","prefix":key,"limit":limit}).to_string(),
                    )
                    .unwrap();
                    continue;
                }
            };
            both.exec(&json).unwrap();
        }
        both.same_state();
    }

    /// kv's snapshot is the store snapshot format, so kv upgrades to kvstore (memory to store:
    /// kv's snapshot goes to kvstore's generated restore) and back, keeping every entry.
    #[test]
    fn upgrades_from_and_to_kv() {
        let mut kv = Harness::<Kv>::new();
        for (k, v) in [("x", "1"), ("ünï", ""), ("a", "2")] {
            kv.apply(put(k, v).as_bytes()).unwrap();
        }
        let mut store = kv
            .upgrade_to_store::<KvStore>()
            .expect("kvstore restores kv");
        assert_eq!(store.version(), 2);
        assert_eq!(
            store.query(br#"{"op":"scan","prefix":""}"#),
            kv.query(br#"{"op":"scan","prefix":""}"#)
        );
        store.apply(put("b", "3").as_bytes()).unwrap();
        store.round_trip();
        let back = store
            .upgrade_to_memory::<Kv>()
            .expect("kv restores kvstore");
        assert_eq!(
            back.query(br#"{"op":"get","key":"b"}"#),
            Ok(br#"{"value":"3"}"#.to_vec())
        );
        assert_eq!(back.snapshot(), store.snapshot().unwrap());
        // A redeploy of kvstore over itself: store to store, storage untouched.
        let again = store.upgrade_to::<KvStore>().unwrap();
        assert_eq!(*again.store(), *store.store());
    }

    #[test]
    fn restore_replaces_everything_and_refuses_bad_snapshots() {
        let mut sm = StoreHarness::<KvStore>::new();
        sm.apply(put("gone", "soon").as_bytes()).unwrap();
        sm.apply(put("x", "old").as_bytes()).unwrap();
        let mut kv = Harness::<Kv>::new();
        kv.apply(put("x", "1").as_bytes()).unwrap();
        sm.restore(&kv.snapshot()).unwrap();
        assert_eq!(
            sm.query(br#"{"op":"scan","prefix":""}"#),
            Ok(br#"{"items":[["x","1"]]}"#.to_vec())
        );
        for bad in [
            &b""[..],
            &[2],
            &[1, 5, 0, 0],
            &[1, 1, 0, 0, 0, b'a', 1, 0, 0, 0],
        ] {
            assert!(sm.restore(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            sm.get(b"x"),
            Some(b"1".to_vec()),
            "a failed restore changes nothing"
        );
    }

    /// Bytes that are not UTF-8 can only arrive through a foreign snapshot: an error, not a
    /// panic.
    #[test]
    fn foreign_bytes_are_an_error() {
        let sm = StoreHarness::<KvStore>::with_entries([(b"k".to_vec(), vec![0xff])]);
        let err = sm.query(br#"{"op":"get","key":"k"}"#).unwrap_err();
        assert!(err.starts_with("kv: a stored value is not UTF-8"), "{err}");
        let err = sm.query(br#"{"op":"scan","prefix":""}"#).unwrap_err();
        assert!(err.contains("not UTF-8"), "{err}");
    }
}
