//! `counter`: one replicated signed 64-bit counter, as a wraft state machine.
//!
//! Owns the counter value and its JSON command language (stable contract):
//! - command `{"op":"add","n":N}` (N an i64) → `{"value":NEW}`
//! - query `{"op":"get"}` → `{"value":V}`
//!
//! Keeps true: overflow and malformed input are the module's own errors (never a panic or a
//! wrap-around), and a failed command leaves the value unchanged.

use serde::{Deserialize, Serialize};
use wraft_guest_sdk::StateMachine;

/// The replicated counter.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Counter {
    value: i64,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Command {
    Add { n: i64 },
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Query {
    Get,
}

#[derive(Serialize)]
struct Reply {
    value: i64,
}

fn encode(value: i64) -> Result<Vec<u8>, String> {
    serde_json::to_vec(&Reply { value }).map_err(|e| format!("counter: cannot encode reply: {e}"))
}

impl StateMachine for Counter {
    fn apply(&mut self, command: &[u8]) -> Result<Vec<u8>, String> {
        let Command::Add { n } =
            serde_json::from_slice(command).map_err(|e| format!("invalid counter command: {e}"))?;
        self.value = self.value.checked_add(n).ok_or_else(|| {
            format!(
                "counter overflow: {} + {n} does not fit in an i64",
                self.value
            )
        })?;
        encode(self.value)
    }

    fn query(&self, query: &[u8]) -> Result<Vec<u8>, String> {
        let Query::Get =
            serde_json::from_slice(query).map_err(|e| format!("invalid counter query: {e}"))?;
        encode(self.value)
    }

    /// The value as 8 little-endian bytes.
    fn snapshot(&self) -> Vec<u8> {
        self.value.to_le_bytes().to_vec()
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        let bytes: [u8; 8] = snapshot
            .try_into()
            .map_err(|_| format!("counter snapshot is {} bytes, expected 8", snapshot.len()))?;
        self.value = i64::from_le_bytes(bytes);
        Ok(())
    }
}

wraft_guest_sdk::export_state_machine!(Counter);

#[cfg(test)]
mod tests {
    use super::*;
    use wraft_guest_sdk::testing::Harness;

    fn reply(r: Result<Vec<u8>, String>) -> String {
        String::from_utf8(r.unwrap()).unwrap()
    }

    #[test]
    fn add_and_get() {
        let mut sm = Harness::<Counter>::new();
        assert_eq!(reply(sm.query(br#"{"op":"get"}"#)), r#"{"value":0}"#);
        assert_eq!(reply(sm.apply(br#"{"op":"add","n":5}"#)), r#"{"value":5}"#);
        assert_eq!(
            reply(sm.apply(br#"{"op":"add","n":-7}"#)),
            r#"{"value":-2}"#
        );
        assert_eq!(reply(sm.query(br#"{"op":"get"}"#)), r#"{"value":-2}"#);
    }

    #[test]
    fn overflow_is_an_error_and_changes_nothing() {
        let mut sm = Harness::<Counter>::new();
        sm.apply(format!(r#"{{"op":"add","n":{}}}"#, i64::MAX).as_bytes())
            .unwrap();
        let err = sm.apply(br#"{"op":"add","n":1}"#).unwrap_err();
        assert!(err.contains("overflow"), "{err}");
        assert_eq!(sm.state(), &Counter { value: i64::MAX });
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let mut sm = Harness::<Counter>::new();
        for bad in [
            "",
            "nope",
            r#"{"op":"add"}"#,
            r#"{"op":"add","n":"1"}"#,
            r#"{"op":"add","n":1.5}"#,
            r#"{"op":"add","n":9223372036854775808}"#,
            r#"{"op":"sub","n":1}"#,
            r#"{"op":"get"}"#,
        ] {
            let err = sm.apply(bad.as_bytes()).unwrap_err();
            assert!(err.starts_with("invalid counter command"), "{bad}: {err}");
        }
        for bad in ["", r#"{"op":"add","n":1}"#, r#"{"n":1}"#] {
            let err = sm.query(bad.as_bytes()).unwrap_err();
            assert!(err.starts_with("invalid counter query"), "{bad}: {err}");
        }
        assert_eq!(sm.state(), &Counter::default());
    }

    #[test]
    fn snapshot_round_trip() {
        let mut sm = Harness::<Counter>::new();
        sm.apply(br#"{"op":"add","n":-42}"#).unwrap();
        let snap = sm.round_trip();
        let mut other = Harness::<Counter>::new();
        other.restore(&snap).unwrap();
        assert_eq!(other.state(), &Counter { value: -42 });
        assert!(other.restore(b"short").is_err());
        assert_eq!(other.state(), &Counter { value: -42 });
    }
}
