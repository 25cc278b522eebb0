//! `wraft status`: every endpoint's role, term and indexes, as a table or JSON lines.

use std::process::ExitCode;

use serde_json::json;
use wraft_proto::client::{Role, StatusResponse};

use super::Endpoints;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    endpoints: Endpoints,
    /// One JSON object per endpoint per line.
    #[arg(long)]
    json: bool,
}

fn role_name(role: i32) -> &'static str {
    match Role::try_from(role) {
        Ok(Role::Leader) => "leader",
        Ok(Role::Follower) => "follower",
        Ok(Role::Candidate) | Ok(Role::PreCandidate) => "candidate",
        Ok(Role::Learner) => "learner",
        Err(_) => "unknown",
    }
}

fn to_json(endpoint: &str, s: &StatusResponse) -> serde_json::Value {
    json!({
        "endpoint": endpoint,
        "id": s.node_id,
        "role": role_name(s.role),
        "leader": s.leader_id,
        "term": s.term,
        "commit_index": s.commit_index,
        "applied_index": s.applied_index,
        "snapshot_index": s.snapshot_index,
        "receiving_snapshot": s.receiving_snapshot,
        "snapshot_bytes_received": s.snapshot_bytes_received,
        "cluster_id": s.cluster_id,
        "members": s.members.iter().map(|m| json!({"id": m.id, "addr": m.addr, "voter": m.voter})).collect::<Vec<_>>(),
        "tenants": s.tenants.iter().map(|t| json!({"name": t.name, "module_hash": t.module_hash, "applied_index": t.applied_index})).collect::<Vec<_>>(),
        "followers": s.followers.iter().map(|f| json!({"id": f.id, "match_index": f.match_index, "next_index": f.next_index, "state": f.state})).collect::<Vec<_>>(),
    })
}

/// Exits 0 when every endpoint answered, 3 when any did not.
pub async fn run(args: Args) -> ExitCode {
    let client = match args.endpoints.client() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut all_ok = true;
    if !args.json {
        println!(
            "{:<22} {:>4} {:<10} {:>6} {:>6} {:>10} {:>10} {:>7}",
            "ENDPOINT", "ID", "ROLE", "LEADER", "TERM", "COMMIT", "APPLIED", "TENANTS"
        );
    }
    for endpoint in &args.endpoints.endpoints {
        match client.status_at(endpoint).await {
            Ok(s) if args.json => println!("{}", to_json(endpoint, &s)),
            Ok(s) => {
                println!(
                    "{:<22} {:>4} {:<10} {:>6} {:>6} {:>10} {:>10} {:>7}{}",
                    endpoint,
                    s.node_id,
                    role_name(s.role),
                    s.leader_id,
                    s.term,
                    s.commit_index,
                    s.applied_index,
                    s.tenants.len(),
                    if s.receiving_snapshot {
                        format!(
                            "  receiving a snapshot ({} bytes so far)",
                            s.snapshot_bytes_received
                        )
                    } else {
                        String::new()
                    }
                );
                for f in &s.followers {
                    println!(
                        "{:<22}   follower {:>4} match {:>10} next {:>10} {}",
                        "", f.id, f.match_index, f.next_index, f.state
                    );
                }
            }
            Err(err) => {
                all_ok = false;
                if args.json {
                    println!(
                        "{}",
                        json!({"endpoint": endpoint, "error": err.to_string()})
                    );
                } else {
                    println!("{endpoint:<22} error: {err}");
                }
            }
        }
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_DEFINITE)
    }
}
