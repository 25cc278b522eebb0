//! Raft's safety invariants, checked from what the nodes themselves log at every role change
//! (`raft role changed role=.. term=.. leader=.. commit=..`), not by polling, which only samples:
//!
//! - at most one node becomes leader in any term (election safety);
//! - within one process's lifetime, a node's commit index never goes backwards.
//!
//! A node's log holds every boot of that node, each starting with the harness's `==== ` header;
//! the commit index is checked per boot, because a restarted node may know less than before
//! its crash (the commit index is not fsync'd; it is learnt again from the leader).

use std::collections::{BTreeMap, BTreeSet};

/// One parsed role-change line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleChange {
    pub node: u64,
    pub boot: usize,
    pub role: String,
    pub term: u64,
    pub commit: u64,
}

/// What the logs showed.
#[derive(Debug, Default)]
pub struct RaftSummary {
    pub role_changes: usize,
    pub terms_with_a_leader: usize,
}

/// Parses every role change out of one node's log.
pub fn role_changes(node: u64, log: &str) -> Vec<RoleChange> {
    let mut out = Vec::new();
    let mut boot = 0;
    for line in log.lines() {
        if line.starts_with("==== ") {
            boot += 1;
            continue;
        }
        let Some((_, fields)) = line.split_once("raft role changed") else {
            continue;
        };
        let field = |name: &str| {
            fields
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_string)
        };
        let (Some(role), Some(term), Some(commit)) =
            (field("role"), field("term"), field("commit"))
        else {
            continue;
        };
        let (Ok(term), Ok(commit)) = (term.parse(), commit.parse()) else {
            continue;
        };
        out.push(RoleChange {
            node,
            boot,
            role,
            term,
            commit,
        });
    }
    out
}

/// Checks the invariants over every node's log; `Err` says which was broken and where.
pub fn check(logs: &[(u64, String)]) -> Result<RaftSummary, String> {
    let mut leaders: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut summary = RaftSummary::default();
    for (node, log) in logs {
        let changes = role_changes(*node, log);
        summary.role_changes += changes.len();
        let mut last: Option<&RoleChange> = None;
        for change in &changes {
            if change.role == "Leader" {
                leaders.entry(change.term).or_default().insert(change.node);
            }
            if let Some(prev) = last.filter(|p| p.boot == change.boot) {
                if change.commit < prev.commit {
                    return Err(format!(
                        "node {node}'s commit index went backwards within one boot: {} (term {}) then {} (term {})",
                        prev.commit, prev.term, change.commit, change.term
                    ));
                }
            }
            last = Some(change);
        }
    }
    for (term, nodes) in &leaders {
        if nodes.len() > 1 {
            return Err(format!(
                "term {term} had more than one leader: nodes {nodes:?}"
            ));
        }
    }
    summary.terms_with_a_leader = leaders.len();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(role: &str, term: u64, commit: u64) -> String {
        format!("2026-11-22T00:00:00Z  INFO wraft::raft_loop: raft role changed role={role} term={term} leader=1 commit={commit}\n")
    }

    #[test]
    fn a_clean_history_passes() {
        let a = format!(
            "==== node 1 ====\n{}{}",
            line("Follower", 1, 0),
            line("Leader", 2, 3)
        );
        let b = format!(
            "==== node 2 ====\n{}{}",
            line("Candidate", 1, 0),
            line("Follower", 2, 3)
        );
        let s = check(&[(1, a), (2, b)]).unwrap();
        assert_eq!(s.role_changes, 4);
        assert_eq!(s.terms_with_a_leader, 1);
    }

    #[test]
    fn two_leaders_in_one_term_are_caught() {
        let a = format!("==== n ====\n{}", line("Leader", 5, 9));
        let b = format!("==== n ====\n{}", line("Leader", 5, 9));
        let err = check(&[(1, a), (2, b)]).unwrap_err();
        assert!(err.contains("term 5"), "{err}");
    }

    #[test]
    fn commit_going_backwards_within_a_boot_is_caught_but_not_across_a_restart() {
        let within = format!(
            "==== n ====\n{}{}",
            line("Leader", 2, 10),
            line("Follower", 3, 7)
        );
        assert!(check(&[(1, within)]).is_err());
        let across = format!(
            "==== n ====\n{}==== n (restart) ====\n{}",
            line("Leader", 2, 10),
            line("Follower", 2, 7)
        );
        assert!(check(&[(1, across)]).is_ok());
    }

    #[test]
    fn lines_without_the_fields_are_ignored() {
        let log = "==== n ====\nraft role changed role=Leader\nsomething else\n".to_string();
        assert_eq!(check(&[(1, log)]).unwrap().role_changes, 0);
    }
}
