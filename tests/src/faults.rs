//! The faults the fault tests inject, one at a time: how each is chosen (seeded), injected and
//! undone. Shared by every workload so that they all face the same kinds of trouble.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;
use wraft_proto::client::{Role, TransferLeaderRequest};

use crate::cluster::Cluster;
use crate::NodeId;

/// How long a leadership transfer asked for as a fault may take before the scheduler moves on.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(4);

/// A fault the scheduler injects and later undoes.
#[derive(Debug, Clone)]
pub enum Fault {
    /// `kill -9`, restarted when undone.
    Kill(NodeId),
    /// SIGSTOP, SIGCONT when undone.
    Pause(NodeId),
    /// Every link to and from the node cut.
    Isolate(NodeId),
    /// The leader (as last seen) cut off from everyone.
    IsolateLeader(NodeId),
    /// The leader loses its link (both ways) to one follower only.
    CutLeaderFrom(NodeId, NodeId),
    /// The node's links swallow bytes while staying open.
    Blackhole(NodeId),
    /// Every byte to and from the node is delayed.
    Delay(NodeId, Duration),
    /// The node's links reset at random moments.
    Flaky(NodeId),
    /// Leadership is moved on purpose (`TransferLeader`, asked through this node).
    TransferLeader(NodeId),
}

/// The current leader as far as a quick look tells (`None` if unclear).
pub async fn current_leader(cluster: &Cluster) -> Option<NodeId> {
    for id in cluster.live_ids() {
        if cluster.is_paused(id) {
            continue;
        }
        if let Ok(s) = cluster.status(id).await {
            if s.role == Role::Leader as i32 {
                return Some(s.node_id);
            }
        }
    }
    None
}

/// Picks the next fault. `kill_weight` is how many times more likely a crash is than each
/// other kind (a workload that fears crashes most weighs them more).
pub async fn pick(cluster: &Cluster, rng: &mut StdRng, kill_weight: u32) -> Fault {
    let ids = cluster.ids();
    let node = ids[rng.random_range(0..ids.len())];
    let roll = rng.random_range(0..kill_weight + 8);
    if roll < kill_weight {
        return Fault::Kill(node);
    }
    match roll - kill_weight {
        0 => Fault::Pause(node),
        1 => Fault::Isolate(node),
        2 => match current_leader(cluster).await {
            Some(leader) => Fault::IsolateLeader(leader),
            None => Fault::Isolate(node),
        },
        3 => match current_leader(cluster).await {
            Some(leader) => {
                let followers: Vec<NodeId> = ids.into_iter().filter(|&o| o != leader).collect();
                Fault::CutLeaderFrom(leader, followers[rng.random_range(0..followers.len())])
            }
            None => Fault::Isolate(node),
        },
        4 => Fault::Blackhole(node),
        5 => Fault::Delay(node, Duration::from_millis(rng.random_range(20..250))),
        6 => Fault::Flaky(node),
        _ => Fault::TransferLeader(node),
    }
}

/// Injects a fault (the cluster must have been started with proxies).
pub async fn inject(cluster: &Cluster, fault: &Fault) {
    let net = cluster.net();
    match *fault {
        Fault::Kill(id) => {
            assert!(
                cluster.is_running(id),
                "node {id} exited on its own before the scheduler killed it"
            );
            cluster.kill(id).await;
        }
        Fault::Pause(id) => cluster.pause(id),
        Fault::Isolate(id) | Fault::IsolateLeader(id) => net.isolate(id),
        Fault::CutLeaderFrom(leader, follower) => net.partition(&[leader], &[follower]),
        Fault::Blackhole(id) => {
            let others: Vec<NodeId> = cluster.ids().into_iter().filter(|&o| o != id).collect();
            net.blackhole(&[id], &others);
        }
        Fault::Delay(id, d) => net.delay_node(id, d),
        Fault::Flaky(id) => {
            for other in cluster.ids().into_iter().filter(|&o| o != id) {
                net.link(id, other).flaky(true);
                net.link(other, id).flaky(true);
            }
        }
        Fault::TransferLeader(via) => {
            // Under other trouble a transfer may not complete; the fault is the attempt.
            let mut request = tonic::Request::new(TransferLeaderRequest { to: 0 });
            request.set_timeout(TRANSFER_TIMEOUT);
            let _ = tokio::time::timeout(
                TRANSFER_TIMEOUT + Duration::from_secs(2),
                cluster.client(via).transfer_leader(request),
            )
            .await;
        }
    }
}

/// Undoes a fault: restarts, resumes or heals every link.
pub fn undo(cluster: &Cluster, fault: &Fault) {
    match *fault {
        Fault::Kill(id) => cluster.restart(id),
        Fault::Pause(id) => cluster.resume(id),
        _ => cluster.net().heal_all(),
    }
}

/// Injects seeded faults one at a time for `phase`: each is held for 0.8-1.8 s, undone, then
/// the cluster gets 0.2-0.8 s of calm. `record` hears "start ..." and "end ..." for every fault
/// (for the history or journal). Returns how many faults were injected. The sleeps here are the
/// faults' durations, not waits for a condition. Bounded by count too, in case injections return
/// at once.
pub async fn run(
    cluster: &Cluster,
    seed: u64,
    phase: Duration,
    kill_weight: u32,
    mut record: impl FnMut(String),
) -> usize {
    use rand::SeedableRng;
    let mut rng = StdRng::seed_from_u64(seed);
    let phase_end = tokio::time::Instant::now() + phase;
    let mut injected = 0usize;
    for _ in 0..256 {
        if tokio::time::Instant::now() >= phase_end {
            break;
        }
        let fault = pick(cluster, &mut rng, kill_weight).await;
        record(format!("start {fault:?}"));
        inject(cluster, &fault).await;
        injected += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(800..1800))).await;
        undo(cluster, &fault);
        record(format!("end {fault:?}"));
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..800))).await;
    }
    injected
}
