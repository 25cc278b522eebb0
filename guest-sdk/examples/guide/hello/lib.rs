use serde::{Deserialize, Serialize};
use wraft_guest_sdk::{context, storage, Json, TypedStoreStateMachine};

/// The greeter. It keeps nothing in memory: everyone greeted is in the tenant's storage, under
/// `greeted/<name>`, with the time of their first greeting (u64 LE milliseconds).
pub struct Hello;

const GREETED: &[u8] = b"greeted/";

/// A command: `{"name":"ann"}`.
#[derive(Deserialize)]
pub struct Greet {
    pub name: String,
}

/// What a command returns: `{"greeting":"hello, ann"}`.
#[derive(Serialize, Debug, PartialEq)]
pub struct Greeting {
    pub greeting: String,
}

/// One entry of the query's answer: `{"name":"ann","since_ms":1767225600000}`.
#[derive(Serialize, Debug, PartialEq)]
pub struct Greeted {
    pub name: String,
    pub since_ms: u64,
}

impl TypedStoreStateMachine for Hello {
    type Codec = Json;
    type Command = Greet;
    type Output = Greeting;
    type Query = (); // the query is `null`
    type QueryOutput = Vec<Greeted>; // everyone greeted, in name order

    fn apply(Greet { name }: Greet) -> Result<Greeting, String> {
        if name.is_empty() {
            return Err("name is empty".to_string());
        }
        let key = [GREETED, name.as_bytes()].concat();
        if storage::get(&key)?.is_none() {
            // The leader's clock, stamped into the log entry: the same on every replica.
            let now = context().timestamp_ms;
            storage::put(&key, &now.to_le_bytes())?;
        }
        Ok(Greeting {
            greeting: format!("hello, {name}"),
        })
    }

    fn query((): ()) -> Result<Vec<Greeted>, String> {
        let mut everyone = Vec::new();
        // Keys come in byte order; the iterator fetches them from the host page by page.
        for pair in storage::scan_prefix(GREETED) {
            let (key, value) = pair?;
            let name = String::from_utf8_lossy(&key[GREETED.len()..]).into_owned();
            let since_ms = u64::from_le_bytes(value.try_into().map_err(|_| "bad record")?);
            everyone.push(Greeted { name, since_ms });
        }
        Ok(everyone)
    }
}

wraft_guest_sdk::export_store_state_machine!(Hello);

#[cfg(test)]
mod tests {
    use super::*;
    use wraft_guest_sdk::testing::StoreHarness;

    #[test]
    fn greets() {
        let mut sm = StoreHarness::<Hello>::new();
        // The harness plays the leader's clock.
        sm.set_timestamp_ms(1_000);
        // Typed: values in, values out.
        let ann = Greet { name: "ann".into() };
        let greeting = Greeting {
            greeting: "hello, ann".into(),
        };
        assert_eq!(sm.apply_typed(ann), Ok(greeting));
        // Bytes: exactly what a client sends and gets back.
        sm.set_timestamp_ms(2_000);
        assert_eq!(
            sm.apply(br#"{"name":"bob"}"#).unwrap(),
            br#"{"greeting":"hello, bob"}"#
        );
        sm.apply(br#"{"name":"ann"}"#).unwrap();
        let everyone = br#"[{"name":"ann","since_ms":1000},{"name":"bob","since_ms":2000}]"#;
        assert_eq!(sm.query(b"null").unwrap(), everyone);
        // Input that does not decode is the module's own error, never a panic.
        let err = sm.apply(br#"{"nom":"x"}"#).unwrap_err();
        assert!(err.starts_with("bad command: "), "{err}");
        assert_eq!(
            sm.apply(br#"{"name":""}"#),
            Err("name is empty".to_string())
        );
        // The storage itself, byte for byte.
        assert_eq!(
            sm.get(b"greeted/ann"),
            Some(1_000u64.to_le_bytes().to_vec())
        );
    }
}
