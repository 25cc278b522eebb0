//! Recording a concurrent history for the [linearizability checker](crate::linearizability).
//!
//! A [`History`] is shared by the client tasks of a test: each call is recorded by
//! [`History::invoke`] just before the request is sent and [`History::complete`] just after the
//! answer (or its absence) is known, with times from one monotonic clock
//! (`std::time::Instant`), so the real-time order the checker relies on is the one the clients
//! saw. An operation invoked but never completed counts as unknown. Faults injected by the
//! test's scheduler are recorded on the same clock, so a failing run can be read as one story:
//! [`History::write`] saves operations and faults as JSON lines.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::json;

use crate::linearizability::{Op, Operation, Outcome, Ret};

/// A handle on an invoked operation, to complete it.
#[must_use = "an invoked operation must be completed (or it counts as unknown)"]
#[derive(Debug)]
pub struct Invocation(usize);

/// Counts of operations by outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub ok: usize,
    pub fail: usize,
    pub unknown: usize,
}

/// Operations and faults, on one clock.
pub struct History {
    start: Instant,
    /// A std mutex: held only to push or update, never across an await.
    ops: Mutex<Vec<Recorded>>,
    faults: Mutex<Vec<(u64, String)>>,
}

struct Recorded {
    op: Operation,
    /// Whether `complete` was called (an uncompleted operation is unknown).
    completed: bool,
    /// Free text for the file: the node asked, the gRPC error.
    note: String,
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

impl History {
    pub fn new() -> History {
        History {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
        }
    }

    /// Nanoseconds since the history started.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Records that `process` is calling `op` on `key` now.
    pub fn invoke(&self, process: u64, key: &str, op: Op) -> Invocation {
        let call = self.now();
        let mut ops = self.ops.lock().unwrap();
        ops.push(Recorded {
            op: Operation {
                process,
                key: key.into(),
                op,
                call,
                ret: None,
                outcome: Outcome::Unknown,
            },
            completed: false,
            note: String::new(),
        });
        Invocation(ops.len() - 1)
    }

    /// Records how an invoked operation ended, now. An unknown outcome keeps no return time:
    /// the operation may take effect at any moment after its call.
    pub fn complete(&self, inv: Invocation, outcome: Outcome, note: impl Into<String>) {
        let ret = self.now();
        let mut ops = self.ops.lock().unwrap();
        let rec = &mut ops[inv.0];
        rec.op.ret = match outcome {
            Outcome::Unknown => None,
            _ => Some(ret),
        };
        rec.op.outcome = outcome;
        rec.completed = true;
        rec.note = note.into();
    }

    /// Records a fault (or its end) injected now.
    pub fn fault(&self, description: impl Into<String>) {
        let at = self.now();
        let description = description.into();
        self.faults.lock().unwrap().push((at, description));
    }

    /// The faults so far, one line each with its time.
    pub fn fault_schedule(&self) -> String {
        self.faults
            .lock()
            .unwrap()
            .iter()
            .map(|(at, d)| format!("  {:>10.3}s {d}", *at as f64 / 1e9))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn fault_count(&self) -> usize {
        self.faults.lock().unwrap().len()
    }

    /// Every operation, for the checker (uncompleted ones as unknown).
    pub fn operations(&self) -> Vec<Operation> {
        self.ops
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.op.clone())
            .collect()
    }

    pub fn counts(&self) -> Counts {
        let mut counts = Counts::default();
        for r in self.ops.lock().unwrap().iter() {
            match r.op.outcome {
                Outcome::Ok(_) => counts.ok += 1,
                Outcome::Fail => counts.fail += 1,
                Outcome::Unknown => counts.unknown += 1,
            }
        }
        counts
    }

    /// Writes the history as JSON lines (operations and faults, in time order), with `header`
    /// (seed, test name) as the first line.
    pub fn write(&self, path: &Path, header: serde_json::Value) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut lines: Vec<(u64, serde_json::Value)> = Vec::new();
        for r in self.ops.lock().unwrap().iter() {
            lines.push((r.op.call, op_json(r)));
        }
        for (at, d) in self.faults.lock().unwrap().iter() {
            lines.push((*at, json!({"type": "fault", "time_ns": at, "fault": d})));
        }
        lines.sort_by_key(|(at, _)| *at);
        let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
        writeln!(file, "{header}")?;
        for (_, line) in lines {
            writeln!(file, "{line}")?;
        }
        file.flush()
    }
}

fn op_json(r: &Recorded) -> serde_json::Value {
    let o = &r.op;
    let op = match &o.op {
        Op::Put { value } => json!({"f": "put", "value": value}),
        Op::Get => json!({"f": "get"}),
        Op::Cas { expect, value } => json!({"f": "cas", "expect": expect, "value": value}),
    };
    let (kind, result) = match &o.outcome {
        Outcome::Ok(Ret::Put { prev }) => ("ok", json!({"prev": prev})),
        Outcome::Ok(Ret::Get { value }) => ("ok", json!({"value": value})),
        Outcome::Ok(Ret::Cas { ok, current }) => ("ok", json!({"ok": ok, "current": current})),
        Outcome::Fail => ("fail", json!(null)),
        Outcome::Unknown if r.completed => ("info", json!(null)),
        Outcome::Unknown => ("never-completed", json!(null)),
    };
    json!({
        "type": kind,
        "process": o.process,
        "key": o.key,
        "op": op,
        "result": result,
        "call_ns": o.call,
        "ret_ns": o.ret,
        "note": r.note,
        "text": o.to_string(),
    })
}
