use serde::{Deserialize, Serialize};
use wraft_guest_sdk::{context, storage, Json, TypedStoreStateMachine};

/// The greeter, version 2: it also counts greetings. Storage: `greeted/<name>` holds a
/// 16-byte record, the first greeting's time and the count (both u64 LE). Version 1 wrote
/// only the time; `migrate` converts its records.
pub struct Hello;

const GREETED: &[u8] = b"greeted/";

struct Record {
    since_ms: u64,
    times: u64,
}

impl Record {
    fn decode(bytes: &[u8]) -> Result<Record, String> {
        let bytes: [u8; 16] = bytes.try_into().map_err(|_| "bad record")?;
        let (since, times) = bytes.split_at(8);
        Ok(Record {
            since_ms: u64::from_le_bytes(since.try_into().map_err(|_| "bad record")?),
            times: u64::from_le_bytes(times.try_into().map_err(|_| "bad record")?),
        })
    }

    fn encode(&self) -> Vec<u8> {
        [self.since_ms.to_le_bytes(), self.times.to_le_bytes()].concat()
    }
}

#[derive(Deserialize)]
pub struct Greet {
    pub name: String,
}

/// Version 1's output plus a field: clients that only read `greeting` see no change.
#[derive(Serialize, Debug, PartialEq)]
pub struct Greeting {
    pub greeting: String,
    pub times: u64,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct Greeted {
    pub name: String,
    pub since_ms: u64,
    pub times: u64,
}

impl TypedStoreStateMachine for Hello {
    type Codec = Json;
    type Command = Greet;
    type Output = Greeting;
    type Query = ();
    type QueryOutput = Vec<Greeted>;

    fn apply(Greet { name }: Greet) -> Result<Greeting, String> {
        if name.is_empty() {
            return Err("name is empty".to_string());
        }
        let key = [GREETED, name.as_bytes()].concat();
        let record = match storage::get(&key)? {
            Some(bytes) => {
                let old = Record::decode(&bytes)?;
                Record {
                    times: old.times.saturating_add(1),
                    ..old
                }
            }
            None => Record {
                since_ms: context().timestamp_ms,
                times: 1,
            },
        };
        storage::put(&key, &record.encode())?;
        Ok(Greeting {
            greeting: format!("hello, {name}"),
            times: record.times,
        })
    }

    fn query((): ()) -> Result<Vec<Greeted>, String> {
        let mut everyone = Vec::new();
        for pair in storage::scan_prefix(GREETED) {
            let (key, value) = pair?;
            let Record { since_ms, times } = Record::decode(&value)?;
            let name = String::from_utf8_lossy(&key[GREETED.len()..]).into_owned();
            everyone.push(Greeted {
                name,
                since_ms,
                times,
            });
        }
        Ok(everyone)
    }

    /// Runs once, when this version is deployed over the tenant: version 1's 8-byte records
    /// become 16-byte ones with a count of 1. If it returns `Err`, the deploy fails and the
    /// tenant stays on version 1.
    fn migrate(from_version: u64) -> Result<(), String> {
        if from_version >= 2 {
            return Ok(()); // a redeploy of version 2: the records are already ours
        }
        for pair in storage::scan_prefix(GREETED) {
            let (key, value) = pair?;
            let since = value.try_into().map_err(|_| "not a version 1 record")?;
            let record = Record {
                since_ms: u64::from_le_bytes(since),
                times: 1,
            };
            storage::put(&key, &record.encode())?;
        }
        Ok(())
    }
}

wraft_guest_sdk::export_store_state_machine!(Hello);
