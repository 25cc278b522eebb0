//! Typed commands, queries and outputs: serde decodes and encodes, you write `apply` on values.
//!
//! Implement [`TypedStateMachine`] instead of [`StateMachine`]: declare what a command, a query
//! and their outputs are, pick a [`Codec`] ([`Json`] or [`Postcard`]), and write `apply` and
//! `query` on those types. Every `TypedStateMachine` *is* a `StateMachine` (a blanket impl
//! here), so [`crate::export_state_machine!`] exports it and [`crate::testing::Harness`] drives it
//! unchanged; `snapshot` and `restore` stay on bytes, because a snapshot format outlives the
//! code that wrote it (see the README on upgrades).
//!
//! [`TypedStoreStateMachine`] is the same for the store model: every one is a
//! [`StoreStateMachine`], exported by [`crate::export_store_state_machine!`] and driven by
//! [`crate::testing::StoreHarness`].
//!
//! Keeps true:
//! - input that does not decode is the module's own error, `bad command: ...` or
//!   `bad query: ...` (status 1, delivered to the client), never a panic, and your `apply`
//!   is not called, so the state is untouched;
//! - an `Err` your code returns reaches the client verbatim;
//! - both codecs are deterministic: equal values encode to equal bytes on every replica.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use wraft_guest_sdk::{Json, TypedStateMachine};
//!
//! #[derive(Default)]
//! pub struct Tally {
//!     total: u64,
//! }
//!
//! #[derive(Deserialize)]
//! #[serde(tag = "op", rename_all = "lowercase")]
//! pub enum Command {
//!     Add { n: u64 },
//! }
//!
//! #[derive(Serialize, Debug, PartialEq)]
//! pub struct Total {
//!     total: u64,
//! }
//!
//! impl TypedStateMachine for Tally {
//!     type Codec = Json;
//!     type Command = Command;
//!     type Output = Total;
//!     type Query = (); // the JSON `null`
//!     type QueryOutput = Total;
//!
//!     fn apply(&mut self, Command::Add { n }: Command) -> Result<Total, String> {
//!         self.total = self.total.checked_add(n).ok_or("overflow")?;
//!         Ok(Total { total: self.total })
//!     }
//!     fn query(&self, (): ()) -> Result<Total, String> {
//!         Ok(Total { total: self.total })
//!     }
//!     fn snapshot(&self) -> Vec<u8> {
//!         self.total.to_le_bytes().to_vec()
//!     }
//!     fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
//!         let bytes = snapshot.try_into().map_err(|_| "snapshot is not 8 bytes")?;
//!         self.total = u64::from_le_bytes(bytes);
//!         Ok(())
//!     }
//! }
//!
//! wraft_guest_sdk::export_state_machine!(Tally);
//!
//! fn main() {
//!     let mut sm = wraft_guest_sdk::testing::Harness::<Tally>::new();
//!     // Typed, for assertions on values...
//!     assert_eq!(sm.apply_typed(Command::Add { n: 2 }), Ok(Total { total: 2 }));
//!     // ...or bytes, exactly what a client sends and gets back.
//!     assert_eq!(sm.apply(br#"{"op":"add","n":3}"#), Ok(br#"{"total":5}"#.to_vec()));
//!     assert_eq!(sm.query(b"null"), Ok(br#"{"total":5}"#.to_vec()));
//!     let err = sm.apply(br#"{"op":"add","n":-1}"#).unwrap_err();
//!     assert!(err.starts_with("bad command: "), "{err}");
//! }
//! ```

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{StateMachine, StoreStateMachine};

/// How commands, queries and outputs travel as bytes.
///
/// An implementation must be deterministic (equal values give equal bytes) and must return
/// `Err`, never panic, on any input. Its error messages are shown to clients after
/// `bad command: ` or `bad query: `, so they should name the codec.
pub trait Codec: 'static {
    /// Encodes a value.
    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String>;

    /// Decodes a value that must take up all of `bytes`.
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String>;
}

/// JSON (`serde_json`): readable with `wraft exec`/`wraft query`, the choice for commands
/// that people type.
///
/// Decoding refuses trailing characters and nesting deeper than 128 levels (serde_json's
/// limit), so hostile input cannot exhaust the guest's stack. Encoding fails only for values
/// JSON cannot represent, e.g. a map whose keys are neither strings nor numbers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl Codec for Json {
    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
        serde_json::to_vec(value).map_err(|e| format!("json: {e}"))
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("json: {e}"))
    }
}

/// [postcard](https://docs.rs/postcard): a compact binary format (varint integers, no field
/// names) with a specified wire format that is stable across postcard 1.x.
///
/// For programs that talk to the cluster, and for snapshots. It is not self-describing, so
/// `#[serde(tag = ...)]`, `#[serde(untagged)]` and `#[serde(flatten)]` do not work with it:
/// use plain enums, whose variant is encoded by index (so only ever add variants at the end).
/// Decoding refuses trailing bytes, so a truncated or padded message is an error rather than
/// a silently different value.
#[derive(Debug, Clone, Copy, Default)]
pub struct Postcard;

impl Codec for Postcard {
    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
        postcard::to_allocvec(value).map_err(|e| format!("postcard: {e}"))
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
        let (value, rest) =
            postcard::take_from_bytes(bytes).map_err(|e| format!("postcard: {e}"))?;
        if !rest.is_empty() {
            return Err(format!(
                "postcard: {} trailing bytes after the value",
                rest.len()
            ));
        }
        Ok(value)
    }
}

/// A [`StateMachine`] whose commands, queries and outputs are Rust types, decoded and encoded
/// by [`Self::Codec`].
///
/// The rules of [`StateMachine`] hold unchanged: deterministic, `Err` rather than panic, a
/// failed `apply` changes nothing, `query` changes nothing, `restore` replaces everything.
///
/// Import this trait, not [`StateMachine`] as well: every `TypedStateMachine` also implements
/// `StateMachine`, so with both in scope `value.apply(..)` is ambiguous (write
/// `TypedStateMachine::apply(&mut value, ..)` if you must have both).
pub trait TypedStateMachine: Default + 'static {
    /// The codec of commands, queries and both outputs: [`Json`] or [`Postcard`].
    type Codec: Codec;

    /// A command, decoded from what the client sent; input that does not decode is answered
    /// with `bad command: ...` and never reaches [`Self::apply`].
    type Command: DeserializeOwned;

    /// What [`Self::apply`] returns to the client.
    ///
    /// Pick a type that always encodes (with [`Json`]: no maps keyed by tuples or structs). A failed
    /// encoding is reported as an error, but only after `apply` has run, so its changes stay;
    /// [`crate::testing::Harness::apply_typed`] checks the encoding in your tests.
    type Output: Serialize;

    /// A query, decoded like [`Self::Command`] (`bad query: ...` when it does not decode).
    type Query: DeserializeOwned;

    /// What [`Self::query`] returns to the client.
    type QueryOutput: Serialize;

    /// Applies one committed command. On `Err`, leave the state unchanged.
    fn apply(&mut self, command: Self::Command) -> Result<Self::Output, String>;

    /// Answers a read-only query.
    fn query(&self, query: Self::Query) -> Result<Self::QueryOutput, String>;

    /// Serializes the whole state deterministically, as [`StateMachine::snapshot`]. The
    /// codecs work here too, e.g. `Postcard::encode(&self.map)` after a version tag.
    fn snapshot(&self) -> Vec<u8>;

    /// Replaces the whole state, as [`StateMachine::restore`]. After an upgrade this receives
    /// the *previous version's* snapshot bytes, also at every restart until the next checkpoint,
    /// so keep accepting every format that may still be stored.
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String>;

    /// The upgrade step after `restore`, as [`StateMachine::migrate`]; the default does
    /// nothing.
    fn migrate(&mut self, from_version: u64) -> Result<(), String> {
        let _ = from_version;
        Ok(())
    }
}

/// The bridge to the ABI: decode, call the typed method, encode.
impl<T: TypedStateMachine> StateMachine for T {
    fn apply(&mut self, command: &[u8]) -> Result<Vec<u8>, String> {
        let command = T::Codec::decode(command).map_err(|e| format!("bad command: {e}"))?;
        let output = TypedStateMachine::apply(self, command)?;
        encode_output::<T::Codec, _>(&output)
    }

    fn query(&self, query: &[u8]) -> Result<Vec<u8>, String> {
        let query = T::Codec::decode(query).map_err(|e| format!("bad query: {e}"))?;
        let output = TypedStateMachine::query(self, query)?;
        encode_output::<T::Codec, _>(&output)
    }

    fn snapshot(&self) -> Vec<u8> {
        TypedStateMachine::snapshot(self)
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        TypedStateMachine::restore(self, snapshot)
    }

    fn migrate(&mut self, from_version: u64) -> Result<(), String> {
        TypedStateMachine::migrate(self, from_version)
    }
}

/// A [`StoreStateMachine`] whose commands, queries and outputs are Rust types, decoded and
/// encoded by [`Self::Codec`] exactly as for [`TypedStateMachine`] (`bad command: ...` /
/// `bad query: ...` for input that does not decode; the function is then not called).
///
/// The rules of [`StoreStateMachine`] hold: no `self`, state only in [`crate::storage`],
/// writes committed when the call returns (also with `Err`), so validate before writing.
///
/// Import this trait, not [`StoreStateMachine`] as well (as with [`TypedStateMachine`]): with
/// both in scope `T::apply(..)` is ambiguous.
pub trait TypedStoreStateMachine: 'static {
    /// The codec of commands, queries and both outputs: [`Json`] or [`Postcard`].
    type Codec: Codec;
    /// A command, decoded from what the client sent.
    type Command: DeserializeOwned;
    /// What [`Self::apply`] returns to the client (encoded after `apply` ran: its writes stay
    /// even if the output does not encode).
    type Output: Serialize;
    /// A query, decoded like [`Self::Command`].
    type Query: DeserializeOwned;
    /// What [`Self::query`] returns to the client.
    type QueryOutput: Serialize;

    /// Applies one committed command, reading and writing [`crate::storage`].
    fn apply(command: Self::Command) -> Result<Self::Output, String>;

    /// Answers a read-only query.
    fn query(query: Self::Query) -> Result<Self::QueryOutput, String>;

    /// The upgrade step, as [`StoreStateMachine::migrate`]; the default does nothing.
    fn migrate(from_version: u64) -> Result<(), String> {
        let _ = from_version;
        Ok(())
    }
}

/// The bridge to the ABI for the store model: decode, call the typed function, encode.
impl<T: TypedStoreStateMachine> StoreStateMachine for T {
    fn apply(command: &[u8]) -> Result<Vec<u8>, String> {
        let command = T::Codec::decode(command).map_err(|e| format!("bad command: {e}"))?;
        let output = <T as TypedStoreStateMachine>::apply(command)?;
        encode_output::<T::Codec, _>(&output)
    }

    fn query(query: &[u8]) -> Result<Vec<u8>, String> {
        let query = T::Codec::decode(query).map_err(|e| format!("bad query: {e}"))?;
        let output = <T as TypedStoreStateMachine>::query(query)?;
        encode_output::<T::Codec, _>(&output)
    }

    fn migrate(from_version: u64) -> Result<(), String> {
        <T as TypedStoreStateMachine>::migrate(from_version)
    }
}

/// Encodes an output, with the message the client sees when that fails. Shared with the
/// harness so that a test reports exactly what the cluster would.
pub(crate) fn encode_output<C: Codec, O: Serialize + ?Sized>(
    output: &O,
) -> Result<Vec<u8>, String> {
    C::encode(output).map_err(|e| format!("cannot encode the output: {e}"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::testing::Harness;

    /// A binary-codec machine: numbered registers.
    #[derive(Default, Debug, PartialEq)]
    struct Registers {
        regs: BTreeMap<u8, i64>,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum Op {
        Set(u8, i64),
        Add(u8, i64),
        Fail(String),
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum Ask {
        Get(u8),
        All,
    }

    impl TypedStateMachine for Registers {
        type Codec = Postcard;
        type Command = Op;
        type Output = i64;
        type Query = Ask;
        type QueryOutput = BTreeMap<u8, i64>;

        fn apply(&mut self, command: Op) -> Result<i64, String> {
            match command {
                Op::Set(r, v) => {
                    self.regs.insert(r, v);
                    Ok(v)
                }
                Op::Add(r, n) => {
                    let current = self.regs.get(&r).copied().unwrap_or(0);
                    let next = current.checked_add(n).ok_or("overflow")?;
                    self.regs.insert(r, next);
                    Ok(next)
                }
                Op::Fail(why) => Err(why),
            }
        }

        fn query(&self, query: Ask) -> Result<BTreeMap<u8, i64>, String> {
            Ok(match query {
                Ask::Get(r) => self
                    .regs
                    .get_key_value(&r)
                    .map(|(&k, &v)| (k, v))
                    .into_iter()
                    .collect(),
                Ask::All => self.regs.clone(),
            })
        }

        fn snapshot(&self) -> Vec<u8> {
            Postcard::encode(&self.regs).expect("a map of integers always encodes")
        }

        fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
            self.regs = Postcard::decode(snapshot)?;
            Ok(())
        }
    }

    fn bytes<T: Serialize>(value: &T) -> Vec<u8> {
        Postcard::encode(value).unwrap()
    }

    #[test]
    fn postcard_commands_round_trip_through_the_byte_api() {
        let mut sm = Harness::<Registers>::new();
        assert_eq!(sm.apply(&bytes(&Op::Set(1, 40))), Ok(bytes(&40i64)));
        assert_eq!(sm.apply(&bytes(&Op::Add(1, 2))), Ok(bytes(&42i64)));
        assert_eq!(sm.apply_typed(Op::Add(7, -1)), Ok(-1));
        let all: BTreeMap<u8, i64> =
            Postcard::decode(&sm.query(&bytes(&Ask::All)).unwrap()).unwrap();
        assert_eq!(all, BTreeMap::from([(1, 42), (7, -1)]));
        assert_eq!(sm.query_typed(Ask::Get(1)), Ok(BTreeMap::from([(1, 42)])));
        sm.round_trip();
    }

    #[test]
    fn undecodable_input_is_a_bad_command_and_changes_nothing() {
        let mut sm = Harness::<Registers>::new();
        sm.apply_typed(Op::Set(3, 3)).unwrap();
        let before = sm.snapshot();
        let mut padded = bytes(&Op::Set(3, 9));
        padded.push(0);
        let truncated = &bytes(&Op::Set(3, 1_000_000))[..3];
        // Empty, an unknown variant, a missing field, cut short, one byte too many, garbage.
        for bad in [&b""[..], &[9], &[0, 3], truncated, &padded, &[0xff; 16]] {
            let err = sm.apply(bad).unwrap_err();
            assert!(err.starts_with("bad command: postcard: "), "{bad:?}: {err}");
        }
        let mut padded_query = bytes(&Ask::All);
        padded_query.push(1);
        for bad in [&b""[..], &[2], &[0], &padded_query] {
            let err = sm.query(bad).unwrap_err();
            assert!(err.starts_with("bad query: postcard: "), "{bad:?}: {err}");
        }
        assert!(sm.apply(&padded).unwrap_err().contains("1 trailing bytes"));
        assert_eq!(
            sm.snapshot(),
            before,
            "a command that did not decode changed the state"
        );
    }

    #[test]
    fn errors_of_the_machine_reach_the_caller_verbatim() {
        let mut sm = Harness::<Registers>::new();
        assert_eq!(
            sm.apply(&bytes(&Op::Fail("no such thing".into()))),
            Err("no such thing".into())
        );
        assert_eq!(
            sm.apply_typed(Op::Fail("again".into())),
            Err("again".into())
        );
        sm.apply_typed(Op::Set(0, i64::MAX)).unwrap();
        assert_eq!(sm.apply_typed(Op::Add(0, 1)), Err("overflow".into()));
    }

    /// The same machine under JSON, with a query output JSON cannot encode (tuple map keys):
    /// an error, never a panic, and the typed harness reports the very same error.
    #[derive(Default)]
    struct JsonRegisters(Registers);

    impl TypedStateMachine for JsonRegisters {
        type Codec = Json;
        type Command = Op;
        type Output = i64;
        type Query = Ask;
        type QueryOutput = BTreeMap<(u8, u8), i64>;

        fn apply(&mut self, command: Op) -> Result<i64, String> {
            TypedStateMachine::apply(&mut self.0, command)
        }
        fn query(&self, query: Ask) -> Result<BTreeMap<(u8, u8), i64>, String> {
            let regs = TypedStateMachine::query(&self.0, query)?;
            Ok(regs.into_iter().map(|(r, v)| ((r, r), v)).collect())
        }
        fn snapshot(&self) -> Vec<u8> {
            TypedStateMachine::snapshot(&self.0)
        }
        fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
            TypedStateMachine::restore(&mut self.0, snapshot)
        }
    }

    #[test]
    fn json_codec_and_encode_failures() {
        let mut sm = Harness::<JsonRegisters>::new();
        assert_eq!(sm.apply(br#"{"Set":[1,5]}"#), Ok(b"5".to_vec()));
        assert_eq!(
            sm.apply(br#" {"Add":[1,1]} "#),
            Ok(b"6".to_vec()),
            "whitespace is fine"
        );
        for bad in [
            &b""[..],
            b"{",
            br#"{"Set":[1,5]} x"#,
            br#"{"Nope":1}"#,
            br#"{"Set":1}"#,
        ] {
            let err = sm.apply(bad).unwrap_err();
            assert!(err.starts_with("bad command: json: "), "{err}");
        }
        // Hostile nesting is refused before it can exhaust the guest's stack.
        let deep = Json::decode::<serde_json::Value>(&[b'['; 200]).unwrap_err();
        assert!(deep.contains("recursion limit"), "{deep}");
        // An output JSON cannot represent: the same error through bytes and through the harness.
        let expected = "cannot encode the output: json: key must be a string".to_string();
        assert_eq!(sm.query(br#""All""#), Err(expected.clone()));
        assert_eq!(sm.query_typed(Ask::All).unwrap_err(), expected);
    }

    #[test]
    fn postcard_is_deterministic_and_compact() {
        let map = BTreeMap::from([(2u8, 300i64), (1, -1)]);
        // Length 2, then (key, zigzag varint) in key order: 1 → -1 = 0x01, 2 → 300 = 0xd8 0x04.
        assert_eq!(Postcard::encode(&map).unwrap(), [2, 1, 1, 2, 0xd8, 0x04]);
    }
}
