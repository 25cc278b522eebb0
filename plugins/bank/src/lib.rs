//! `bank`: named accounts holding non-negative balances, and transfers between them, as a
//! wraft state machine.
//!
//! Owns a `BTreeMap<String, u64>` of balances and its JSON command language (the contract below
//! is stable: clients and tests rely on the exact field names).
//!
//! Commands (`apply`):
//! - `{"op":"open","account":A,"balance":N}` → `{"ok":bool}`; `ok` is false (and nothing
//!   changes) if the account already exists. N is a non-negative integer (a u64).
//! - `{"op":"transfer","from":A,"to":B,"amount":N}` → `{"ok":bool}`; `ok` is false (and
//!   nothing changes) if either account is missing, `from == to`, or `from` holds less than N.
//!
//! Queries (`query`):
//! - `{"op":"balance","account":A}` → `{"balance":N|null}` (`null`: no such account)
//! - `{"op":"total"}` → `{"total":N}`, the sum of all balances
//!
//! Keeps true:
//! - Money is only created by `open`; a transfer moves it and never creates, destroys or
//!   overdraws (balances are unsigned, every sum is checked).
//! - The total of all balances fits in a u64: an `open` that would push it past `u64::MAX` is
//!   the module's own error. Hence no transfer can overflow its destination, and `total` is
//!   always exact.
//! - Every input, however malformed, yields a reply or an `Err`, never a panic; a failed or
//!   rejected command changes nothing.
//! - Snapshots list accounts in key order, so replicas with equal state agree byte for byte.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use wraft_guest_sdk::StateMachine;

/// Snapshot format version; the first byte of every snapshot.
const SNAPSHOT_V1: u8 = 1;

/// The replicated accounts.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Bank {
    accounts: BTreeMap<String, u64>,
    /// The sum of every balance, kept so that `open` can refuse an overflow in O(1) and `total`
    /// need not walk the map. Invariant: equals the sum of `accounts`' values.
    total: u64,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Command {
    Open {
        account: String,
        balance: u64,
    },
    Transfer {
        from: String,
        to: String,
        amount: u64,
    },
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Query {
    Balance { account: String },
    Total,
}

#[derive(Serialize)]
struct OkReply {
    ok: bool,
}

#[derive(Serialize)]
struct BalanceReply {
    balance: Option<u64>,
}

#[derive(Serialize)]
struct TotalReply {
    total: u64,
}

fn encode<T: Serialize>(reply: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(reply).map_err(|e| format!("bank: cannot encode reply: {e}"))
}

impl Bank {
    /// Opens `account` with `balance`; `Ok(false)` if it exists.
    fn open(&mut self, account: String, balance: u64) -> Result<bool, String> {
        if self.accounts.contains_key(&account) {
            return Ok(false);
        }
        let total = self.total.checked_add(balance).ok_or_else(|| {
            format!(
                "bank overflow: opening {account:?} with {balance} would make the total exceed \
                 {} (it is {})",
                u64::MAX,
                self.total
            )
        })?;
        self.accounts.insert(account, balance);
        self.total = total;
        Ok(true)
    }

    /// Moves `amount` from `from` to `to`; `Ok(false)` (nothing changes) if the transfer is
    /// refused by the rules of the contract.
    fn transfer(&mut self, from: &str, to: &str, amount: u64) -> Result<bool, String> {
        if from == to {
            return Ok(false);
        }
        let (Some(&from_balance), Some(&to_balance)) =
            (self.accounts.get(from), self.accounts.get(to))
        else {
            return Ok(false);
        };
        let Some(new_from) = from_balance.checked_sub(amount) else {
            return Ok(false);
        };
        // Cannot fail while the total fits in a u64 (the invariant), but an error is still
        // better than a wrap if it ever did.
        let new_to = to_balance.checked_add(amount).ok_or_else(|| {
            format!("bank overflow: {to:?} holds {to_balance}, cannot receive {amount}")
        })?;
        self.accounts.insert(from.to_string(), new_from);
        self.accounts.insert(to.to_string(), new_to);
        Ok(true)
    }
}

impl StateMachine for Bank {
    fn apply(&mut self, command: &[u8]) -> Result<Vec<u8>, String> {
        let command: Command =
            serde_json::from_slice(command).map_err(|e| format!("invalid bank command: {e}"))?;
        let ok = match command {
            Command::Open { account, balance } => self.open(account, balance)?,
            Command::Transfer { from, to, amount } => self.transfer(&from, &to, amount)?,
        };
        encode(&OkReply { ok })
    }

    fn query(&self, query: &[u8]) -> Result<Vec<u8>, String> {
        let query: Query =
            serde_json::from_slice(query).map_err(|e| format!("invalid bank query: {e}"))?;
        match query {
            Query::Balance { account } => encode(&BalanceReply {
                balance: self.accounts.get(&account).copied(),
            }),
            Query::Total => encode(&TotalReply { total: self.total }),
        }
    }

    /// Binary rather than JSON so that encoding has no failure path: a version byte, then per
    /// account in key order `u32 LE name length, name, u64 LE balance`.
    fn snapshot(&self) -> Vec<u8> {
        let size: usize = self.accounts.keys().map(|k| 12 + k.len()).sum();
        let mut out = Vec::with_capacity(1 + size);
        out.push(SNAPSHOT_V1);
        for (account, balance) in &self.accounts {
            // Strings on wasm32 are far below 4 GiB, so the length always fits.
            out.extend_from_slice(&(account.len() as u32).to_le_bytes());
            out.extend_from_slice(account.as_bytes());
            out.extend_from_slice(&balance.to_le_bytes());
        }
        out
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        let (&version, mut rest) = snapshot
            .split_first()
            .ok_or("bank snapshot is empty (expected at least the version byte)")?;
        if version != SNAPSHOT_V1 {
            return Err(format!(
                "bank snapshot has version {version}, expected {SNAPSHOT_V1}"
            ));
        }
        let mut accounts = BTreeMap::new();
        let mut total = 0u64;
        while !rest.is_empty() {
            let account = take_string(&mut rest)?;
            let balance = take_u64(&mut rest)?;
            // A snapshot lists accounts in strictly increasing order; anything else (a
            // duplicate would silently drop money) is corruption.
            if let Some((last, _)) = accounts.last_key_value() {
                if *last >= account {
                    return Err(format!(
                        "bank snapshot is not in key order: {account:?} after {last:?}"
                    ));
                }
            }
            total = total
                .checked_add(balance)
                .ok_or("bank snapshot's balances sum past u64::MAX")?;
            accounts.insert(account, balance);
        }
        self.accounts = accounts;
        self.total = total;
        Ok(())
    }
}

fn take_string(rest: &mut &[u8]) -> Result<String, String> {
    let (len, tail) = rest
        .split_first_chunk::<4>()
        .ok_or("bank snapshot is truncated (in a name length)")?;
    let len = u32::from_le_bytes(*len) as usize;
    if tail.len() < len {
        return Err("bank snapshot is truncated (in a name)".to_string());
    }
    let (bytes, tail) = tail.split_at(len);
    *rest = tail;
    String::from_utf8(bytes.to_vec()).map_err(|e| format!("bank snapshot holds invalid UTF-8: {e}"))
}

fn take_u64(rest: &mut &[u8]) -> Result<u64, String> {
    let (bytes, tail) = rest
        .split_first_chunk::<8>()
        .ok_or("bank snapshot is truncated (in a balance)")?;
    *rest = tail;
    Ok(u64::from_le_bytes(*bytes))
}

wraft_guest_sdk::export_state_machine!(Bank);

#[cfg(test)]
mod tests {
    use super::*;
    use wraft_guest_sdk::testing::Harness;

    fn exec(sm: &mut Harness<Bank>, json: &str) -> String {
        String::from_utf8(sm.apply(json.as_bytes()).unwrap()).unwrap()
    }

    fn ask(sm: &Harness<Bank>, json: &str) -> String {
        String::from_utf8(sm.query(json.as_bytes()).unwrap()).unwrap()
    }

    fn open(sm: &mut Harness<Bank>, account: &str, balance: u64) -> String {
        exec(
            sm,
            &format!(r#"{{"op":"open","account":"{account}","balance":{balance}}}"#),
        )
    }

    fn transfer(sm: &mut Harness<Bank>, from: &str, to: &str, amount: u64) -> String {
        exec(
            sm,
            &format!(r#"{{"op":"transfer","from":"{from}","to":"{to}","amount":{amount}}}"#),
        )
    }

    fn balance(sm: &Harness<Bank>, account: &str) -> String {
        ask(sm, &format!(r#"{{"op":"balance","account":"{account}"}}"#))
    }

    const OK: &str = r#"{"ok":true}"#;
    const REFUSED: &str = r#"{"ok":false}"#;

    #[test]
    fn open_balance_total() {
        let mut sm = Harness::<Bank>::new();
        assert_eq!(ask(&sm, r#"{"op":"total"}"#), r#"{"total":0}"#);
        assert_eq!(balance(&sm, "a"), r#"{"balance":null}"#);
        assert_eq!(open(&mut sm, "a", 100), OK);
        assert_eq!(open(&mut sm, "b", 0), OK);
        assert_eq!(balance(&sm, "a"), r#"{"balance":100}"#);
        assert_eq!(balance(&sm, "b"), r#"{"balance":0}"#);
        assert_eq!(ask(&sm, r#"{"op":"total"}"#), r#"{"total":100}"#);
    }

    #[test]
    fn open_twice_is_refused_and_changes_nothing() {
        let mut sm = Harness::<Bank>::new();
        assert_eq!(open(&mut sm, "a", 100), OK);
        assert_eq!(open(&mut sm, "a", 7), REFUSED);
        assert_eq!(balance(&sm, "a"), r#"{"balance":100}"#);
        assert_eq!(ask(&sm, r#"{"op":"total"}"#), r#"{"total":100}"#);
    }

    #[test]
    fn transfer_moves_money() {
        let mut sm = Harness::<Bank>::new();
        open(&mut sm, "a", 100);
        open(&mut sm, "b", 5);
        assert_eq!(transfer(&mut sm, "a", "b", 30), OK);
        assert_eq!(balance(&sm, "a"), r#"{"balance":70}"#);
        assert_eq!(balance(&sm, "b"), r#"{"balance":35}"#);
        // The whole balance, and nothing at all, are both fine.
        assert_eq!(transfer(&mut sm, "b", "a", 35), OK);
        assert_eq!(transfer(&mut sm, "b", "a", 0), OK);
        assert_eq!(balance(&sm, "a"), r#"{"balance":105}"#);
        assert_eq!(balance(&sm, "b"), r#"{"balance":0}"#);
        assert_eq!(ask(&sm, r#"{"op":"total"}"#), r#"{"total":105}"#);
    }

    #[test]
    fn insufficient_funds_is_refused_and_changes_nothing() {
        let mut sm = Harness::<Bank>::new();
        open(&mut sm, "a", 10);
        open(&mut sm, "b", 0);
        let before = sm.snapshot();
        assert_eq!(transfer(&mut sm, "a", "b", 11), REFUSED);
        assert_eq!(transfer(&mut sm, "b", "a", 1), REFUSED);
        assert_eq!(transfer(&mut sm, "a", "b", u64::MAX), REFUSED);
        assert_eq!(sm.snapshot(), before);
    }

    #[test]
    fn missing_accounts_and_self_transfer_are_refused() {
        let mut sm = Harness::<Bank>::new();
        open(&mut sm, "a", 10);
        let before = sm.snapshot();
        assert_eq!(transfer(&mut sm, "a", "nobody", 1), REFUSED);
        assert_eq!(transfer(&mut sm, "nobody", "a", 1), REFUSED);
        assert_eq!(transfer(&mut sm, "x", "y", 0), REFUSED);
        assert_eq!(transfer(&mut sm, "a", "a", 1), REFUSED);
        assert_eq!(transfer(&mut sm, "a", "a", 0), REFUSED);
        assert_eq!(sm.snapshot(), before);
        assert_eq!(balance(&sm, "nobody"), r#"{"balance":null}"#);
    }

    #[test]
    fn total_beyond_u64_is_an_error_not_a_wrap() {
        let mut sm = Harness::<Bank>::new();
        assert_eq!(open(&mut sm, "a", u64::MAX - 1), OK);
        assert_eq!(open(&mut sm, "b", 1), OK);
        let before = sm.snapshot();
        let err = sm
            .apply(br#"{"op":"open","account":"c","balance":1}"#)
            .unwrap_err();
        assert!(err.contains("overflow"), "{err}");
        assert_eq!(sm.snapshot(), before);
        assert_eq!(balance(&sm, "c"), r#"{"balance":null}"#);
        // Everything can still move: no destination can overflow.
        assert_eq!(transfer(&mut sm, "a", "b", u64::MAX - 1), OK);
        assert_eq!(balance(&sm, "b"), format!(r#"{{"balance":{}}}"#, u64::MAX));
        assert_eq!(
            ask(&sm, r#"{"op":"total"}"#),
            format!(r#"{{"total":{}}}"#, u64::MAX)
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let mut sm = Harness::<Bank>::new();
        open(&mut sm, "a", 10);
        open(&mut sm, "b", 10);
        let before = sm.snapshot();
        let bad_commands = [
            "",
            "not json",
            "[]",
            "null",
            r#"{"account":"a","balance":1}"#,
            r#"{"op":"close","account":"a"}"#,
            r#"{"op":"OPEN","account":"c","balance":1}"#,
            r#"{"op":"open","account":"c"}"#,
            r#"{"op":"open","balance":1}"#,
            r#"{"op":"open","account":"c","balance":-1}"#,
            r#"{"op":"open","account":"c","balance":1.5}"#,
            r#"{"op":"open","account":"c","balance":"1"}"#,
            r#"{"op":"open","account":"c","balance":18446744073709551616}"#,
            r#"{"op":"open","account":7,"balance":1}"#,
            r#"{"op":"open","account":null,"balance":1}"#,
            r#"{"op":"transfer","from":"a","to":"b"}"#,
            r#"{"op":"transfer","from":"a","amount":1}"#,
            r#"{"op":"transfer","to":"b","amount":1}"#,
            r#"{"op":"transfer","from":"a","to":"b","amount":-1}"#,
            r#"{"op":"transfer","from":"a","to":"b","amount":1e3}"#,
            r#"{"op":"transfer","from":["a"],"to":"b","amount":1}"#,
            r#"{"op":"balance","account":"a"}"#,
            r#"{"op":"total"}"#,
        ];
        for bad in bad_commands {
            let err = sm.apply(bad.as_bytes()).unwrap_err();
            assert!(err.starts_with("invalid bank command"), "{bad}: {err}");
        }
        let bad_queries = [
            "",
            "{",
            r#"{"op":"balance"}"#,
            r#"{"op":"balance","account":1}"#,
            r#"{"op":"sum"}"#,
            r#"{"op":"open","account":"c","balance":1}"#,
            r#"{"op":"transfer","from":"a","to":"b","amount":1}"#,
        ];
        for bad in bad_queries {
            let err = sm.query(bad.as_bytes()).unwrap_err();
            assert!(err.starts_with("invalid bank query"), "{bad}: {err}");
        }
        assert_eq!(sm.snapshot(), before, "failed commands must change nothing");
    }

    #[test]
    fn snapshot_round_trip_and_restore_replaces() {
        let mut sm = Harness::<Bank>::new();
        // Opened out of key order: the snapshot is in key order regardless.
        for (account, amount) in [("zed", 3), ("ann", 40), ("ünï", 0), ("", 2)] {
            open(&mut sm, account, amount);
        }
        transfer(&mut sm, "ann", "zed", 15);
        let snap = sm.round_trip();

        let mut other = Harness::<Bank>::new();
        open(&mut other, "gone", 99);
        other.restore(&snap).unwrap();
        assert_eq!(other.state(), sm.state());
        assert_eq!(balance(&other, "gone"), r#"{"balance":null}"#);
        assert_eq!(balance(&other, "zed"), r#"{"balance":18}"#);
        assert_eq!(ask(&other, r#"{"op":"total"}"#), r#"{"total":45}"#);

        // The same accounts opened in another order give the same bytes.
        let mut reordered = Harness::<Bank>::new();
        for (account, amount) in [("", 2), ("ünï", 0), ("zed", 18), ("ann", 25)] {
            open(&mut reordered, account, amount);
        }
        assert_eq!(reordered.snapshot(), snap);

        Harness::<Bank>::new().round_trip();
    }

    #[test]
    fn corrupt_snapshots_are_errors() {
        let entry = |name: &[u8], balance: u64| {
            let mut v = (name.len() as u32).to_le_bytes().to_vec();
            v.extend_from_slice(name);
            v.extend_from_slice(&balance.to_le_bytes());
            v
        };
        let with = |entries: &[Vec<u8>]| {
            let mut v = vec![SNAPSHOT_V1];
            for e in entries {
                v.extend_from_slice(e);
            }
            v
        };
        let good = with(&[entry(b"a", 1), entry(b"b", 2)]);
        let mut sm = Harness::<Bank>::new();
        sm.restore(&good).unwrap();
        assert_eq!(ask(&sm, r#"{"op":"total"}"#), r#"{"total":3}"#);

        let bad = [
            vec![],
            vec![2],
            vec![SNAPSHOT_V1, 1, 0],
            vec![SNAPSHOT_V1, 5, 0, 0, 0, b'a'],
            good[..good.len() - 1].to_vec(),
            with(&[entry(&[0xff, 0xfe], 1)]),
            with(&[entry(b"b", 1), entry(b"a", 1)]),
            with(&[entry(b"a", 1), entry(b"a", 1)]),
            with(&[entry(b"a", u64::MAX), entry(b"b", 1)]),
        ];
        for snapshot in bad {
            assert!(
                sm.restore(&snapshot).is_err(),
                "restored a corrupt snapshot {snapshot:?}"
            );
        }
        // A failed restore keeps the state (the harness restores into a fresh instance).
        assert_eq!(ask(&sm, r#"{"op":"total"}"#), r#"{"total":3}"#);
    }
}
