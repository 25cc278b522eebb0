//! A linearizability checker for a key-value store of registers (`put`, `get`, `cas` per key).
//!
//! The algorithm is Wing & Gong's search with Lowe's just-in-time linearization and memoization
//! (as in Porcupine and Knossos' `linear`): walk the history's call and return events in time
//! order; at a call, try to linearize the operation now (apply it to the model, check the result
//! it returned) and remember `(set of linearized ops, model state)` so that no configuration is
//! explored twice; at a return of an operation that is not yet linearized, backtrack. Keys are
//! independent registers, so each key is checked on its own (P-compositionality).
//!
//! Outcomes, Jepsen style:
//! - **ok**: completed with an observed result, which the model must reproduce.
//! - **fail**: definitely not applied; dropped from the history.
//! - **unknown** (indeterminate, timed out, connection lost): may have taken effect at any moment
//!   after its call, or never. Its return is at infinity and any result is accepted. "Never" is
//!   covered because an unknown `put` or `cas` can always be linearized after everything else.
//!   An unknown `get` changes nothing and is dropped.
//!
//! Unknown writes make the search exponential (each may or may not have happened so far), so
//! before searching, unknown writes whose value nobody ever saw are pruned (see [`prune`]); that
//! is sound when every written value is unique, which the tests' generators guarantee (the
//! pruning is skipped otherwise).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

/// A register's value. `None` is "absent".
pub type Value = String;

/// An operation on one key's register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { value: Value },
    Get,
    Cas { expect: Option<Value>, value: Value },
}

/// What a completed operation returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ret {
    /// A `put`'s previous value.
    Put { prev: Option<Value> },
    /// A `get`'s value.
    Get { value: Option<Value> },
    /// A `cas`: whether it swapped, and the value after it.
    Cas { ok: bool, current: Option<Value> },
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok(Ret),
    /// Definitely not applied.
    Fail,
    /// May or may not have been applied, at any time after the call.
    Unknown,
}

/// One operation of a history. Times are nanoseconds on one monotonic clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// The client process that issued it (a process has at most one operation open at a time).
    pub process: u64,
    pub key: String,
    pub op: Op,
    pub call: u64,
    /// `None` for an operation that has no known end (unknown outcome).
    pub ret: Option<u64>,
    pub outcome: Outcome,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = |v: &Option<Value>| v.clone().unwrap_or_else(|| "null".into());
        let op = match &self.op {
            Op::Put { value } => format!("put({value})"),
            Op::Get => "get()".into(),
            Op::Cas { expect, value } => format!("cas({}->{value})", v(expect)),
        };
        let outcome = match &self.outcome {
            Outcome::Ok(Ret::Put { prev }) => format!("ok prev={}", v(prev)),
            Outcome::Ok(Ret::Get { value }) => format!("ok {}", v(value)),
            Outcome::Ok(Ret::Cas { ok, current }) => format!("ok {ok} current={}", v(current)),
            Outcome::Fail => "fail".into(),
            Outcome::Unknown => "unknown".into(),
        };
        let ret = self
            .ret
            .map(|r| format!("{:.3}ms", r as f64 / 1e6))
            .unwrap_or_else(|| "inf".into());
        write!(
            f,
            "p{} {}: {op} -> {outcome} [{:.3}ms, {ret}]",
            self.process,
            self.key,
            self.call as f64 / 1e6
        )
    }
}

/// What a successful check saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckStats {
    pub keys: usize,
    pub ok: usize,
    pub fail: usize,
    pub unknown: usize,
    /// Unknown writes left out because no one ever saw their value.
    pub pruned: usize,
    /// Search steps taken, over every key.
    pub steps: u64,
}

/// Why a history is not (known to be) linearizable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckError {
    /// No linearization exists for this key's operations.
    Violation { key: String, explanation: String },
    /// The search ran out of its step budget: neither proved nor refuted.
    Inconclusive { key: String, steps: u64 },
    /// The history itself is malformed (a result of the wrong kind, a return before its call).
    Malformed(String),
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckError::Violation { key, explanation } => {
                write!(f, "NOT linearizable: key {key:?}: {explanation}")
            }
            CheckError::Inconclusive { key, steps } => write!(
                f,
                "linearizability of key {key:?} undecided after {steps} search steps"
            ),
            CheckError::Malformed(m) => write!(f, "malformed history: {m}"),
        }
    }
}

/// Search steps allowed per key before the check gives up as [`CheckError::Inconclusive`].
pub const DEFAULT_STEP_BUDGET: u64 = 50_000_000;

/// Checks a whole history: every key must be linearizable on its own.
pub fn check(history: &[Operation]) -> Result<CheckStats, CheckError> {
    check_with_budget(history, DEFAULT_STEP_BUDGET)
}

/// [`check`] with a per-key step budget.
pub fn check_with_budget(history: &[Operation], budget: u64) -> Result<CheckStats, CheckError> {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    let mut stats = CheckStats::default();
    for op in history {
        validate(op)?;
        match op.outcome {
            Outcome::Ok(_) => stats.ok += 1,
            Outcome::Fail => stats.fail += 1,
            Outcome::Unknown => stats.unknown += 1,
        }
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    stats.keys = by_key.len();
    for (key, ops) in by_key {
        let relevant: Vec<&Operation> = ops
            .into_iter()
            .filter(|o| match o.outcome {
                Outcome::Fail => false,
                Outcome::Unknown => o.op != Op::Get,
                Outcome::Ok(_) => true,
            })
            .collect();
        let (kept, pruned) = prune(&relevant);
        stats.pruned += pruned;
        stats.steps += check_register(key, &kept, budget)?;
    }
    Ok(stats)
}

fn validate(op: &Operation) -> Result<(), CheckError> {
    if let Some(ret) = op.ret {
        if ret < op.call {
            return Err(CheckError::Malformed(format!(
                "returns before its call: {op}"
            )));
        }
    }
    let kinds_match = matches!(
        (&op.op, &op.outcome),
        (_, Outcome::Fail | Outcome::Unknown)
            | (Op::Put { .. }, Outcome::Ok(Ret::Put { .. }))
            | (Op::Get, Outcome::Ok(Ret::Get { .. }))
            | (Op::Cas { .. }, Outcome::Ok(Ret::Cas { .. }))
    );
    if !kinds_match {
        return Err(CheckError::Malformed(format!(
            "result of the wrong kind: {op}"
        )));
    }
    if matches!(op.outcome, Outcome::Ok(_)) && op.ret.is_none() {
        return Err(CheckError::Malformed(format!(
            "ok without a return time: {op}"
        )));
    }
    Ok(())
}

/// The value an operation writes, if it writes.
fn written(op: &Op) -> Option<&Value> {
    match op {
        Op::Put { value } | Op::Cas { value, .. } => Some(value),
        Op::Get => None,
    }
}

/// Leaves out the unknown writes whose value no one ever needed; returns the rest and how many
/// were left out. Only when every written value is unique (else returns everything).
///
/// Needed values: every value an ok operation observed (a put's `prev`, a get's value, a cas's
/// `expect` when it swapped and its `current`), and, to a fixpoint, the `expect` of every kept
/// unknown cas. Why it is sound: in any linearization, an ok operation observes the state
/// exactly, so no ok operation runs while the register holds a pruned value; a kept unknown write
/// is kept because its (unique) value was needed, so it took effect, and a kept unknown cas that
/// took effect did not expect a pruned value. So after a pruned write, until the next kept put,
/// only pruned operations run (or nothing): removing them leaves a linearization of the rest.
/// Conversely a linearization of the rest is one of the whole history in which the pruned
/// operations never took effect, which unknown operations may do.
pub fn prune<'a>(ops: &[&'a Operation]) -> (Vec<&'a Operation>, usize) {
    let mut seen = HashSet::new();
    let unique = ops
        .iter()
        .filter_map(|o| written(&o.op))
        .all(|v| seen.insert(v));
    if !unique {
        return (ops.to_vec(), 0);
    }
    let mut needed: HashSet<&Value> = HashSet::new();
    for o in ops {
        match (&o.op, &o.outcome) {
            (_, Outcome::Ok(Ret::Put { prev: Some(v) })) => {
                needed.insert(v);
            }
            (_, Outcome::Ok(Ret::Get { value: Some(v) })) => {
                needed.insert(v);
            }
            (Op::Cas { expect, .. }, Outcome::Ok(Ret::Cas { ok, current })) => {
                if let (true, Some(e)) = (ok, expect) {
                    needed.insert(e);
                }
                if let Some(c) = current {
                    needed.insert(c);
                }
            }
            _ => {}
        }
    }
    let unknown_write = |o: &Operation| o.outcome == Outcome::Unknown && written(&o.op).is_some();
    loop {
        let before = needed.len();
        for o in ops.iter().filter(|o| unknown_write(o)) {
            if let Op::Cas {
                expect: Some(e),
                value,
            } = &o.op
            {
                if needed.contains(value) {
                    needed.insert(e);
                }
            }
        }
        if needed.len() == before {
            break;
        }
    }
    let kept: Vec<&Operation> = ops
        .iter()
        .copied()
        .filter(|o| !unknown_write(o) || needed.contains(written(&o.op).unwrap()))
        .collect();
    let pruned = ops.len() - kept.len();
    (kept, pruned)
}

/// An interned value; 0 is "absent".
type Sym = u32;

/// An operation in interned form.
#[derive(Clone, Copy)]
enum IOp {
    Put {
        value: Sym,
        prev: Option<Sym>,
    },
    Get {
        value: Sym,
    },
    Cas {
        expect: Sym,
        value: Sym,
        ret: Option<(bool, Sym)>,
    },
}

impl IOp {
    /// Applies the operation in state `s`: the new state if the result it returned (if known)
    /// is the one the register gives, else `None`.
    fn step(self, s: Sym) -> Option<Sym> {
        match self {
            IOp::Put { value, prev } => match prev {
                Some(p) if p != s => None,
                _ => Some(value),
            },
            IOp::Get { value } => (value == s).then_some(s),
            IOp::Cas { expect, value, ret } => {
                let (swapped, next) = if s == expect {
                    (true, value)
                } else {
                    (false, s)
                };
                match ret {
                    None => Some(next),
                    Some((ok, current)) => (ok == swapped && current == next).then_some(next),
                }
            }
        }
    }
}

struct Interner {
    ids: HashMap<Value, Sym>,
    names: Vec<Value>,
}

impl Interner {
    fn new() -> Self {
        Interner {
            ids: HashMap::new(),
            names: vec!["null".into()],
        }
    }

    fn sym(&mut self, v: &Option<Value>) -> Sym {
        match v {
            None => 0,
            Some(v) => {
                if let Some(&id) = self.ids.get(v) {
                    return id;
                }
                let id = self.names.len() as Sym;
                self.names.push(v.clone());
                self.ids.insert(v.clone(), id);
                id
            }
        }
    }

    fn name(&self, s: Sym) -> &str {
        &self.names[s as usize]
    }
}

/// Searches for a linearization of one register's operations; returns the steps taken.
fn check_register(key: &str, ops: &[&Operation], budget: u64) -> Result<u64, CheckError> {
    let n = ops.len();
    if n == 0 {
        return Ok(0);
    }
    let mut interner = Interner::new();
    let iops: Vec<IOp> = ops
        .iter()
        .map(|o| {
            let some = |v: &Value| Some(v.clone());
            match (&o.op, &o.outcome) {
                (Op::Put { value }, Outcome::Ok(Ret::Put { prev })) => IOp::Put {
                    value: interner.sym(&some(value)),
                    prev: Some(interner.sym(prev)),
                },
                (Op::Put { value }, _) => IOp::Put {
                    value: interner.sym(&some(value)),
                    prev: None,
                },
                (Op::Get, Outcome::Ok(Ret::Get { value })) => IOp::Get {
                    value: interner.sym(value),
                },
                (Op::Cas { expect, value }, outcome) => IOp::Cas {
                    expect: interner.sym(expect),
                    value: interner.sym(&some(value)),
                    ret: match outcome {
                        Outcome::Ok(Ret::Cas { ok, current }) => Some((*ok, interner.sym(current))),
                        _ => None,
                    },
                },
                _ => unreachable!("filtered and validated before the search"),
            }
        })
        .collect();

    // Entries: index 0 is the head sentinel, 1..=2n the events, 2n+1 the tail sentinel.
    // Event 2i+1 is op i's call, 2i+2 its return; ordered by time, calls before returns at
    // equal times (which makes such operations concurrent: the permissive reading).
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * n);
    for (i, o) in ops.iter().enumerate() {
        events.push((o.call, 0, 2 * i + 1));
        events.push((o.ret.unwrap_or(u64::MAX), 1, 2 * i + 2));
    }
    events.sort_unstable();
    let head = 0usize;
    let tail = 2 * n + 1;
    let mut next = vec![tail; 2 * n + 2];
    let mut prev = vec![head; 2 * n + 2];
    let mut last = head;
    for &(_, _, e) in &events {
        next[last] = e;
        prev[e] = last;
        last = e;
    }
    next[last] = tail;
    prev[tail] = last;
    let is_call = |e: usize| e % 2 == 1;
    let op_of = |e: usize| (e - 1) / 2;

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Sym)> = HashSet::new();
    let mut stack: Vec<(usize, Sym)> = Vec::new();
    let mut state: Sym = 0;
    let mut entry = next[head];
    let mut steps = 0u64;
    // For the explanation: the deepest point reached and the op that blocked it.
    let mut deepest = (0usize, None::<usize>, 0 as Sym);

    let lift = |e: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        for x in [e, e + 1] {
            let (p, q) = (prev[x], next[x]);
            next[p] = q;
            prev[q] = p;
        }
    };
    let unlift = |e: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        for x in [e + 1, e] {
            let (p, q) = (prev[x], next[x]);
            next[p] = x;
            prev[q] = x;
        }
    };

    while next[head] != tail {
        steps += 1;
        if steps > budget {
            return Err(CheckError::Inconclusive {
                key: key.into(),
                steps,
            });
        }
        if entry == tail {
            // Cannot happen: every remaining call is followed by its return. Treat as stuck.
            break;
        }
        if is_call(entry) {
            let i = op_of(entry);
            if let Some(s2) = iops[i].step(state) {
                let mut candidate = linearized.clone();
                candidate[i / 64] |= 1 << (i % 64);
                if cache.insert((candidate.clone(), s2)) {
                    stack.push((entry, state));
                    state = s2;
                    linearized = candidate;
                    lift(entry, &mut next, &mut prev);
                    entry = next[head];
                    continue;
                }
            }
            entry = next[entry];
        } else {
            // The return of an op not linearized yet: whatever was linearized so far is wrong.
            if stack.len() >= deepest.0 {
                deepest = (stack.len(), Some(op_of(entry)), state);
            }
            let Some((e, s)) = stack.pop() else {
                return Err(violation(key, ops, &interner, deepest));
            };
            state = s;
            let i = op_of(e);
            linearized[i / 64] &= !(1 << (i % 64));
            unlift(e, &mut next, &mut prev);
            entry = next[e];
        }
    }
    if next[head] == tail {
        Ok(steps)
    } else {
        Err(violation(key, ops, &interner, deepest))
    }
}

/// Describes where the search got stuck: at its deepest, which operation could not be placed,
/// in which state, and the operations that overlap it in time.
fn violation(
    key: &str,
    ops: &[&Operation],
    interner: &Interner,
    deepest: (usize, Option<usize>, Sym),
) -> CheckError {
    let (depth, blocker, state) = deepest;
    let mut explanation = format!(
        "no order of its {} operations is legal; at best {depth} were linearized",
        ops.len()
    );
    if let Some(b) = blocker {
        let blocker = ops[b];
        explanation.push_str(&format!(
            ", then the register held {} and this operation could not be placed before it \
             returned: {blocker}",
            interner.name(state)
        ));
        let end = blocker.ret.unwrap_or(u64::MAX);
        let overlapping: Vec<String> = ops
            .iter()
            .filter(|o| o.call <= end && o.ret.unwrap_or(u64::MAX) >= blocker.call)
            .filter(|o| !std::ptr::eq(**o, blocker))
            .take(20)
            .map(|o| format!("\n    {o}"))
            .collect();
        if !overlapping.is_empty() {
            explanation.push_str(&format!(
                "\n  overlapping operations (up to 20):{}",
                overlapping.concat()
            ));
        }
    }
    CheckError::Violation {
        key: key.into(),
        explanation,
    }
}

/// The set of values written to each key (for generators that want to assert uniqueness).
pub fn written_values(history: &[Operation]) -> BTreeMap<&str, BTreeSet<&Value>> {
    let mut out: BTreeMap<&str, BTreeSet<&Value>> = BTreeMap::new();
    for o in history {
        if let Some(v) = written(&o.op) {
            out.entry(o.key.as_str()).or_default().insert(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Option<Value> {
        Some(s.to_string())
    }

    /// Builds histories tersely: times in arbitrary units, one key unless given.
    struct H(Vec<Operation>);

    impl H {
        fn new() -> Self {
            H(Vec::new())
        }
        fn add(mut self, key: &str, op: Op, call: u64, ret: Option<u64>, outcome: Outcome) -> Self {
            let process = self.0.len() as u64;
            self.0.push(Operation {
                process,
                key: key.into(),
                op,
                call,
                ret,
                outcome,
            });
            self
        }
        fn put(self, value: &str, call: u64, ret: u64, prev: Option<Value>) -> Self {
            self.add(
                "k",
                Op::Put {
                    value: value.into(),
                },
                call,
                Some(ret),
                Outcome::Ok(Ret::Put { prev }),
            )
        }
        fn put_unknown(self, value: &str, call: u64) -> Self {
            self.add(
                "k",
                Op::Put {
                    value: value.into(),
                },
                call,
                None,
                Outcome::Unknown,
            )
        }
        fn put_fail(self, value: &str, call: u64, ret: u64) -> Self {
            self.add(
                "k",
                Op::Put {
                    value: value.into(),
                },
                call,
                Some(ret),
                Outcome::Fail,
            )
        }
        fn get(self, call: u64, ret: u64, value: Option<Value>) -> Self {
            self.add(
                "k",
                Op::Get,
                call,
                Some(ret),
                Outcome::Ok(Ret::Get { value }),
            )
        }
        fn cas(
            self,
            expect: Option<Value>,
            value: &str,
            call: u64,
            ret: u64,
            ok: bool,
            current: Option<Value>,
        ) -> Self {
            self.add(
                "k",
                Op::Cas {
                    expect,
                    value: value.into(),
                },
                call,
                Some(ret),
                Outcome::Ok(Ret::Cas { ok, current }),
            )
        }
        fn cas_unknown(self, expect: Option<Value>, value: &str, call: u64) -> Self {
            self.add(
                "k",
                Op::Cas {
                    expect,
                    value: value.into(),
                },
                call,
                None,
                Outcome::Unknown,
            )
        }
        fn ok(&self) -> CheckStats {
            check(&self.0).unwrap_or_else(|e| panic!("expected linearizable, got {e}"))
        }
        fn violation(&self) -> String {
            match check(&self.0) {
                Err(CheckError::Violation { explanation, .. }) => explanation,
                other => panic!("expected a violation, got {other:?}"),
            }
        }
    }

    #[test]
    fn empty_and_sequential_histories_pass() {
        H::new().ok();
        H::new()
            .get(0, 1, None)
            .put("a", 2, 3, None)
            .get(4, 5, v("a"))
            .cas(v("a"), "b", 6, 7, true, v("b"))
            .cas(v("a"), "c", 8, 9, false, v("b"))
            .put("d", 10, 11, v("b"))
            .get(12, 13, v("d"))
            .ok();
    }

    #[test]
    fn concurrent_operations_may_take_effect_in_either_order() {
        // Two overlapping puts; reads during and after see the winner consistently.
        H::new()
            .put("a", 0, 10, None)
            .put("b", 1, 9, v("a"))
            .get(2, 3, v("a"))
            .get(11, 12, v("b"))
            .ok();
        // The read overlapping a put may see the old value or the new one.
        H::new()
            .put("a", 0, 1, None)
            .put("b", 2, 10, v("a"))
            .get(3, 4, v("a"))
            .get(5, 6, v("b"))
            .ok();
    }

    #[test]
    fn stale_read_after_acknowledged_write_fails() {
        let why = H::new()
            .put("a", 0, 1, None)
            .put("b", 2, 3, v("a"))
            .get(4, 5, v("a"))
            .violation();
        assert!(why.contains("get()"), "{why}");
    }

    #[test]
    fn read_going_back_in_time_fails() {
        // Both reads overlap the put, but once one saw the new value a later one cannot see
        // the old.
        H::new()
            .put("a", 0, 1, None)
            .put("b", 2, 20, v("a"))
            .get(3, 4, v("b"))
            .get(5, 6, v("a"))
            .violation();
    }

    #[test]
    fn two_cas_from_the_same_value_cannot_both_succeed() {
        H::new()
            .put("a", 0, 1, None)
            .cas(v("a"), "b", 2, 10, true, v("b"))
            .cas(v("a"), "c", 3, 11, true, v("c"))
            .violation();
        // One of them failing is fine, in either order.
        H::new()
            .put("a", 0, 1, None)
            .cas(v("a"), "b", 2, 10, true, v("b"))
            .cas(v("a"), "c", 3, 11, false, v("b"))
            .ok();
    }

    #[test]
    fn read_of_a_value_never_written_fails() {
        H::new()
            .put("a", 0, 1, None)
            .get(2, 3, v("zzz"))
            .violation();
        H::new().get(0, 1, v("zzz")).violation();
    }

    #[test]
    fn wrong_put_prev_fails() {
        H::new()
            .put("a", 0, 1, None)
            .put("b", 2, 3, None)
            .violation();
    }

    #[test]
    fn failed_operations_never_happened() {
        H::new()
            .put("a", 0, 1, None)
            .put_fail("b", 2, 3)
            .get(4, 5, v("a"))
            .ok();
        H::new()
            .put("a", 0, 1, None)
            .put_fail("b", 2, 3)
            .get(4, 5, v("b"))
            .violation();
    }

    #[test]
    fn unknown_write_may_be_seen_later_or_never() {
        // Seen long after the call (its effect may come at any time after the call).
        H::new()
            .put("a", 0, 1, None)
            .put_unknown("b", 2)
            .get(3, 4, v("a"))
            .get(100, 101, v("b"))
            .ok();
        // Never seen.
        let stats = H::new()
            .put("a", 0, 1, None)
            .put_unknown("b", 2)
            .get(3, 4, v("a"))
            .get(100, 101, v("a"))
            .ok();
        assert_eq!(stats.pruned, 1);
        // But not before its call.
        H::new()
            .put("a", 0, 1, None)
            .get(2, 3, v("b"))
            .put_unknown("b", 4)
            .violation();
        // And once seen it stays (no going back to the old value).
        H::new()
            .put("a", 0, 1, None)
            .put_unknown("b", 2)
            .get(3, 4, v("b"))
            .get(5, 6, v("a"))
            .violation();
    }

    #[test]
    fn unknown_cas_chain_is_kept_when_its_end_is_seen() {
        // put a (unknown) → cas a→b (unknown) → b is read: both must have happened.
        H::new()
            .put_unknown("a", 0)
            .cas_unknown(v("a"), "b", 1)
            .get(10, 11, v("b"))
            .ok();
        // The cas cannot have swapped from a value the register never held.
        H::new()
            .put("x", 0, 1, None)
            .cas_unknown(v("a"), "b", 2)
            .get(10, 11, v("b"))
            .violation();
    }

    #[test]
    fn many_unseen_unknown_writes_stay_cheap() {
        let mut h = H::new().put("a", 0, 1, None);
        for i in 0..200u64 {
            h = h.put_unknown(&format!("u{i}"), 2 + i);
        }
        let h = h.get(1000, 1001, v("a"));
        let stats = h.ok();
        assert_eq!(stats.pruned, 200);
    }

    #[test]
    fn keys_are_independent() {
        let h = H::new()
            .put("a", 0, 1, None)
            .add(
                "other",
                Op::Put { value: "x".into() },
                0,
                Some(1),
                Outcome::Ok(Ret::Put { prev: None }),
            )
            .add(
                "other",
                Op::Get,
                2,
                Some(3),
                Outcome::Ok(Ret::Get { value: v("x") }),
            )
            .get(2, 3, v("a"));
        assert_eq!(h.ok().keys, 2);
        // A stale read on one key is caught even if the other key is fine.
        let bad = h.add(
            "other",
            Op::Get,
            4,
            Some(5),
            Outcome::Ok(Ret::Get { value: None }),
        );
        match check(&bad.0) {
            Err(CheckError::Violation { key, .. }) => assert_eq!(key, "other"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn long_random_sequential_histories_pass_and_a_corrupted_one_fails() {
        // A simulated register with concurrency: ops of 4 processes, each applied atomically at
        // a random moment inside its interval. Always linearizable; then one read is corrupted.
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        for seed in 0..20u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut ops: Vec<(u64, Operation)> = Vec::new(); // (apply time, op)
            let mut busy_until = [0u64; 4];
            for i in 0..300u64 {
                let p = rng.random_range(0..4usize);
                let call = busy_until[p] + rng.random_range(0..5);
                let at = call + rng.random_range(0..20);
                let ret = at + rng.random_range(0..20);
                busy_until[p] = ret + 1;
                let op = match rng.random_range(0..3) {
                    0 => Op::Put {
                        value: format!("v{i}"),
                    },
                    1 => Op::Get,
                    _ => Op::Cas {
                        expect: if rng.random_bool(0.5) {
                            None
                        } else {
                            v(&format!("v{}", rng.random_range(0..=i)))
                        },
                        value: format!("v{i}"),
                    },
                };
                ops.push((
                    at * 1000 + i,
                    Operation {
                        process: p as u64,
                        key: "k".into(),
                        op,
                        call: call * 1000,
                        ret: Some(ret * 1000 + 999),
                        outcome: Outcome::Unknown,
                    },
                ));
            }
            // Apply in the order of the apply moments to fill in results.
            ops.sort_by_key(|(at, _)| *at);
            let mut state: Option<Value> = None;
            for (_, o) in ops.iter_mut() {
                o.outcome = Outcome::Ok(match &o.op {
                    Op::Put { value } => Ret::Put {
                        prev: state.replace(value.clone()),
                    },
                    Op::Get => Ret::Get {
                        value: state.clone(),
                    },
                    Op::Cas { expect, value } => {
                        let ok = &state == expect;
                        if ok {
                            state = Some(value.clone());
                        }
                        Ret::Cas {
                            ok,
                            current: state.clone(),
                        }
                    }
                });
            }
            let mut history: Vec<Operation> = ops.into_iter().map(|(_, o)| o).collect();
            check(&history).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            // Corrupt: a read that completed after a later put returned sees a value that no
            // one ever wrote.
            let idx = history.iter().rposition(|o| o.op == Op::Get).unwrap();
            history[idx].outcome = Outcome::Ok(Ret::Get {
                value: v("never-written"),
            });
            assert!(
                matches!(check(&history), Err(CheckError::Violation { .. })),
                "seed {seed}: a corrupted history passed"
            );
        }
    }

    #[test]
    fn malformed_histories_are_rejected() {
        let h = H::new().add(
            "k",
            Op::Get,
            0,
            Some(1),
            Outcome::Ok(Ret::Put { prev: None }),
        );
        assert!(matches!(check(&h.0), Err(CheckError::Malformed(_))));
    }
}
