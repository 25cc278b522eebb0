//! The faults the fault tests inject, one at a time: how each is chosen (seeded), injected and
//! undone. Shared by every workload so that they all face the same kinds of trouble.
//!
//! [`run_with_membership`] adds membership changes ([`MemberFault`]) to the same seeded
//! schedule: nodes join (a fresh id, as a learner that promotes itself once caught up), leave,
//! rejoin under a new id, and the leader is removed; some of these happen while another fault is
//! held. Voters stay within [`MIN_VOTERS`]..=[`MAX_VOTERS`], a removal is made only when at
//! least [`MIN_VOTERS`] voters remain, and no id is ever used twice.
//!
//! Network faults apply to the links between the members that have fault proxies: the initial
//! nodes, and nodes that joined on one of the cluster's spare ids
//! ([`crate::cluster::ClusterOptions::spare_ids`]; a node joining past them has none, so a
//! partition is partial once the spares are used up). Process faults (kill, pause) apply to
//! every member. The membership faults keep two proxied members.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;
use tokio::time::Instant;
use wraft_proto::client::member_change::Kind;
use wraft_proto::client::{
    ChangeMembersRequest, MemberChange, Role, StatusResponse, TransferLeaderRequest,
};

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
/// Network faults need a proxied node and another one to be cut from: with every member
/// proxied (no membership changes) the choice is the same as it always was.
pub async fn pick(cluster: &Cluster, rng: &mut StdRng, kill_weight: u32) -> Fault {
    let ids = cluster.ids();
    let node = ids[rng.random_range(0..ids.len())];
    let roll = rng.random_range(0..kill_weight + 8);
    if roll < kill_weight {
        return Fault::Kill(node);
    }
    let proxied = proxied_members(cluster);
    let kind = roll - kill_weight;
    if (1..=6).contains(&kind) && proxied.len() < 2 {
        // Too few proxied members left for a network fault: a process fault instead.
        return Fault::Pause(node);
    }
    // The node of a network fault: the one drawn if it has proxies, else a proxied one.
    let net_node = if proxied.contains(&node) || !(1..=6).contains(&kind) {
        node
    } else {
        proxied[rng.random_range(0..proxied.len())]
    };
    match kind {
        0 => Fault::Pause(node),
        1 => Fault::Isolate(net_node),
        2 => match current_leader(cluster).await {
            Some(leader) if proxied.contains(&leader) => Fault::IsolateLeader(leader),
            _ => Fault::Isolate(net_node),
        },
        3 => match current_leader(cluster).await {
            Some(leader) if proxied.contains(&leader) => {
                let followers: Vec<NodeId> = proxied.into_iter().filter(|&o| o != leader).collect();
                Fault::CutLeaderFrom(leader, followers[rng.random_range(0..followers.len())])
            }
            _ => Fault::Isolate(net_node),
        },
        4 => Fault::Blackhole(net_node),
        5 => Fault::Delay(net_node, Duration::from_millis(rng.random_range(20..250))),
        6 => Fault::Flaky(net_node),
        _ => Fault::TransferLeader(node),
    }
}

/// The members whose peer links go through fault proxies (initial nodes and spare ids).
pub fn proxied_members(cluster: &Cluster) -> Vec<NodeId> {
    let net = cluster.net();
    cluster
        .ids()
        .into_iter()
        .filter(|&id| net.has(id))
        .collect()
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
            let others: Vec<NodeId> = proxied_members(cluster)
                .into_iter()
                .filter(|&o| o != id)
                .collect();
            net.blackhole(&[id], &others);
        }
        Fault::Delay(id, d) => net.delay_node(id, d),
        Fault::Flaky(id) => {
            for other in proxied_members(cluster).into_iter().filter(|&o| o != id) {
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

/// Undoes a fault: restarts, resumes or heals every link. A node removed from the cluster
/// meanwhile (and forgotten by the harness) stays down.
pub fn undo(cluster: &Cluster, fault: &Fault) {
    match *fault {
        Fault::Kill(id) | Fault::Pause(id) if !cluster.ids().contains(&id) => {}
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

/// Fewest voters the membership faults leave (a removal is made only above it).
pub const MIN_VOTERS: usize = 3;
/// Most voters the membership faults make.
pub const MAX_VOTERS: usize = 5;
/// Proxied members the membership faults never remove, so that network faults
/// keep links to cut however many changes a long run makes.
const KEEP_PROXIED: usize = 2;
/// How long one membership step (a join up to promotion, a removal) may take before the run
/// fails: far more than a healthy cluster needs, and every held fault ends within 2 s.
const STEP_TIMEOUT: Duration = Duration::from_secs(45);
/// How long after a joining node gave up the join is tried again (with a fresh id).
const JOIN_BACKOFF: Duration = Duration::from_millis(500);
/// The client-side deadline of one `ChangeMembers` call (the node's own is 5 s).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(8);
/// How often membership waits look again.
const MEMBER_POLL: Duration = Duration::from_millis(100);

/// A membership change the scheduler makes. Ids are never reused: a node that comes back is a
/// new member with a new id and an empty data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberFault {
    /// A new node joins (learner, then voter once caught up): one voter more.
    Grow,
    /// A follower is removed and stopped: one voter fewer.
    Shrink(NodeId),
    /// A new node joins, then this old voter (maybe the leader by then) is removed (with 5
    /// voters, removed first).
    Replace(NodeId),
    /// This follower is removed and stopped, then the same machine (its port, its disk wiped)
    /// joins again under a new id (with 3 voters, another new node joins first).
    Rejoin(NodeId),
    /// The leader is removed and hands over (with 3 voters, a new node joins first).
    RemoveLeader,
}

/// The members workload clients may call: `(id, client port)`, kept up to date by
/// [`run_with_membership`] (a node is added once it is a voter, dropped before it is stopped).
#[derive(Clone, Default)]
pub struct Targets(Arc<Mutex<Vec<(NodeId, u16)>>>);

impl Targets {
    /// Every member of the cluster now.
    pub fn of(cluster: &Cluster) -> Targets {
        let all = cluster
            .ids()
            .into_iter()
            .map(|id| (id, cluster.port(id)))
            .collect();
        Targets(Arc::new(Mutex::new(all)))
    }

    pub fn get(&self) -> Vec<(NodeId, u16)> {
        self.0.lock().unwrap().clone()
    }

    /// A random target.
    pub fn pick(&self, rng: &mut StdRng) -> (NodeId, u16) {
        let all = self.0.lock().unwrap();
        all[rng.random_range(0..all.len())]
    }

    fn add(&self, id: NodeId, port: u16) {
        let mut all = self.0.lock().unwrap();
        if !all.iter().any(|&(i, _)| i == id) {
            all.push((id, port));
        }
    }

    fn remove(&self, id: NodeId) {
        self.0.lock().unwrap().retain(|&(i, _)| i != id);
    }
}

/// What [`run_with_membership`] did.
#[derive(Debug, Default, Clone)]
pub struct MembershipReport {
    /// Faults injected, membership changes included.
    pub injected: usize,
    /// Membership faults ([`MemberFault`]) made.
    pub member_faults: usize,
    /// Committed configuration changes the scheduler asked for and saw applied (a join counts
    /// two: learner, then voter).
    pub conf_changes: usize,
    /// Joins the joining node gave up on (it exits with an error), retried under a new id.
    pub failed_joins: usize,
    /// Every node id that ever ran, removed ones included (their logs are still on disk).
    pub ever: Vec<NodeId>,
    /// The voters at the end, as the leader reports them.
    pub voters: Vec<NodeId>,
}

/// A fault held while a membership change is made, and when to undo it.
struct Held {
    fault: Fault,
    until: Instant,
}

/// Records events and undoes the held fault on time, whatever the scheduler is waiting for.
struct Ticker<R> {
    held: Option<Held>,
    record: R,
}

impl<R: FnMut(String)> Ticker<R> {
    fn note(&mut self, event: String) {
        (self.record)(event)
    }

    /// Undoes the held fault if its time has come (or `now`).
    fn tick(&mut self, cluster: &Cluster, now: bool) {
        let due = self
            .held
            .as_ref()
            .is_some_and(|h| now || Instant::now() >= h.until);
        if due {
            let held = self.held.take().expect("a held fault");
            undo(cluster, &held.fault);
            self.note(format!("end {:?}", held.fault));
        }
    }

    /// Awaits `fut`, undoing the held fault on time meanwhile.
    async fn during<F: Future>(&mut self, cluster: &Cluster, fut: F) -> F::Output {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return out,
                _ = tokio::time::sleep(Duration::from_millis(20)) => self.tick(cluster, false),
            }
        }
    }

    async fn sleep(&mut self, cluster: &Cluster, d: Duration) {
        self.during(cluster, tokio::time::sleep(d)).await
    }
}

/// The status of the leader with the highest term among the running, unpaused nodes.
pub async fn leader_status(cluster: &Cluster) -> Option<StatusResponse> {
    let mut best: Option<StatusResponse> = None;
    for id in cluster.live_ids() {
        if cluster.is_paused(id) {
            continue;
        }
        if let Ok(s) = cluster.status(id).await {
            if s.role == Role::Leader as i32 && best.as_ref().is_none_or(|b| s.term > b.term) {
                best = Some(s);
            }
        }
    }
    best
}

/// `(voters, learners)` of a status, sorted.
pub fn members_of(status: &StatusResponse) -> (Vec<NodeId>, Vec<NodeId>) {
    let mut voters: Vec<NodeId> = status
        .members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.id)
        .collect();
    let mut learners: Vec<NodeId> = status
        .members
        .iter()
        .filter(|m| !m.voter)
        .map(|m| m.id)
        .collect();
    voters.sort_unstable();
    learners.sort_unstable();
    (voters, learners)
}

/// Runs the seeded schedule of [`run`] with membership faults mixed in: every 2-4 slots (the
/// first in slot 0 or 1, so even a short run changes membership) one [`MemberFault`], half of
/// the time made while an ordinary fault is held (it is undone on time, mid-change if need be).
/// The first three are [`MemberFault::Replace`], [`MemberFault::Rejoin`] and
/// [`MemberFault::RemoveLeader`] in a seeded order (made even if that takes longer than
/// `phase`); then any kind. `targets` follows the membership for the workload's clients.
/// Before returning, every fault is undone and the configuration is brought back to exactly
/// the harness's nodes, all voters.
///
/// `Err` (with what was seen) when a membership step does not complete within
/// [`STEP_TIMEOUT`] or a node exits on its own: the caller prints its seed, schedule and
/// history, as for a checker's failure.
pub async fn run_with_membership(
    cluster: &mut Cluster,
    seed: u64,
    phase: Duration,
    kill_weight: u32,
    targets: &Targets,
    record: impl FnMut(String),
) -> Result<MembershipReport, String> {
    use rand::SeedableRng;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut planned = vec![2, 3, 4];
    rand::seq::SliceRandom::shuffle(&mut planned[..], &mut rng);
    let mut s = Scheduler {
        ever: cluster.ids().into_iter().collect(),
        cluster,
        rng,
        planned,
        t: Ticker { held: None, record },
        targets: targets.clone(),
        report: MembershipReport::default(),
    };
    let result = s.schedule(phase, kill_weight).await;
    // Whatever happened, nothing stays faulted.
    s.t.tick(s.cluster, true);
    s.cluster.net().heal_all();
    for id in s.cluster.ids() {
        if s.cluster.is_paused(id) {
            s.cluster.resume(id);
        }
    }
    let result = match result {
        Ok(()) => s.settle().await,
        Err(e) => Err(e),
    };
    s.report.ever = s.ever.iter().copied().collect();
    let report = s.report.clone();
    result.map(|()| report)
}

struct Scheduler<'c, R> {
    cluster: &'c mut Cluster,
    rng: StdRng,
    t: Ticker<R>,
    targets: Targets,
    ever: BTreeSet<NodeId>,
    /// Membership fault kinds still to make first (popped from the end).
    planned: Vec<u8>,
    report: MembershipReport,
}

impl<R: FnMut(String)> Scheduler<'_, R> {
    async fn schedule(&mut self, phase: Duration, kill_weight: u32) -> Result<(), String> {
        let phase_end = Instant::now() + phase;
        let mut until_member = self.rng.random_range(0..2u32);
        for _ in 0..256 {
            if Instant::now() >= phase_end {
                if self.planned.is_empty() {
                    break;
                }
                // Every run makes the planned kinds, past the phase if need be.
                until_member = 0;
            }
            self.check_alive()?;
            let hold = Duration::from_millis(self.rng.random_range(800..1800));
            if until_member > 0 {
                until_member -= 1;
                let fault = pick(self.cluster, &mut self.rng, kill_weight).await;
                self.t.note(format!("start {fault:?}"));
                inject(self.cluster, &fault).await;
                self.report.injected += 1;
                self.t.held = Some(Held {
                    fault,
                    until: Instant::now() + hold,
                });
                self.t.sleep(self.cluster, hold).await;
                self.t.tick(self.cluster, true);
            } else {
                until_member = self.rng.random_range(1..=3);
                if self.rng.random_bool(0.5) {
                    let fault = pick(self.cluster, &mut self.rng, kill_weight).await;
                    self.t.note(format!("start {fault:?}"));
                    inject(self.cluster, &fault).await;
                    self.report.injected += 1;
                    self.t.held = Some(Held {
                        fault,
                        until: Instant::now() + hold,
                    });
                    let lead = Duration::from_millis(self.rng.random_range(100..600));
                    self.t.sleep(self.cluster, lead).await;
                }
                let change = self.pick_member().await;
                let during = match &self.t.held {
                    Some(h) => format!(" during {:?}", h.fault),
                    None => String::new(),
                };
                self.t.note(format!("start {change:?}{during}"));
                self.report.injected += 1;
                self.report.member_faults += 1;
                self.member_fault(change).await?;
                // The held fault, if the change was quicker, lasts its whole time.
                while self.t.held.is_some() {
                    self.t.sleep(self.cluster, MEMBER_POLL).await;
                }
                let voters = self.voters_now().await;
                self.t.note(format!("end {change:?}: voters {voters:?}"));
            }
            let calm = Duration::from_millis(self.rng.random_range(200..800));
            self.t.sleep(self.cluster, calm).await;
        }
        Ok(())
    }

    /// Every node the harness runs is up, except one the held fault killed.
    fn check_alive(&self) -> Result<(), String> {
        for id in self.cluster.ids() {
            let killed = matches!(self.t.held, Some(Held { fault: Fault::Kill(k), .. }) if k == id);
            if !killed && !self.cluster.is_running(id) {
                return Err(format!(
                    "node {id} exited on its own; its log ends with:\n{}",
                    self.cluster.log_tail(id, 20)
                ));
            }
        }
        Ok(())
    }

    /// The voters as the leader reports them (waiting a little for one after an election).
    async fn voters_now(&mut self) -> Vec<NodeId> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let status = self
                .t
                .during(self.cluster, leader_status(self.cluster))
                .await;
            if let Some(s) = status {
                return members_of(&s).0;
            }
            if Instant::now() >= deadline {
                return Vec::new();
            }
            self.t.sleep(self.cluster, MEMBER_POLL).await;
        }
    }

    /// The next membership fault: the three kinds every run must see ([`MemberFault::Replace`],
    /// [`MemberFault::Rejoin`], [`MemberFault::RemoveLeader`]) first, in a seeded order, then any
    /// kind, weighted so that the voters wander over 3..=5. A node the held fault killed or
    /// paused is the one removed half of the time (replacing a failed machine).
    async fn pick_member(&mut self) -> MemberFault {
        let ids = self.cluster.ids();
        let leader = self
            .t
            .during(self.cluster, current_leader(self.cluster))
            .await;
        let removable = self.removable();
        let followers: Vec<NodeId> = removable
            .iter()
            .copied()
            .filter(|&i| Some(i) != leader)
            .collect();
        let mut follower =
            (!followers.is_empty()).then(|| followers[self.rng.random_range(0..followers.len())]);
        let mut any = removable[self.rng.random_range(0..removable.len())];
        if let Some(Held {
            fault: Fault::Kill(down) | Fault::Pause(down),
            ..
        }) = self.t.held
        {
            if Some(down) != leader && removable.contains(&down) && self.rng.random_bool(0.5) {
                (follower, any) = (Some(down), down);
            }
        }
        // 0 Grow, 1 Shrink, 2 Replace, 3 Rejoin, 4 RemoveLeader.
        let feasible = |kind: u8| match kind {
            0 => ids.len() < MAX_VOTERS,
            1 => ids.len() > MIN_VOTERS && follower.is_some(),
            3 => follower.is_some(),
            _ => true,
        };
        let kind = match self.planned.last() {
            Some(&kind) if feasible(kind) => {
                self.planned.pop();
                kind
            }
            _ => {
                let weights: [(u8, u32); 5] = match ids.len() {
                    n if n <= MIN_VOTERS => [(0, 2), (1, 0), (2, 1), (3, 1), (4, 1)],
                    n if n >= MAX_VOTERS => [(0, 0), (1, 2), (2, 1), (3, 1), (4, 1)],
                    _ => [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)],
                };
                let weights: Vec<(u8, u32)> =
                    weights.into_iter().filter(|&(k, _)| feasible(k)).collect();
                let total: u32 = weights.iter().map(|w| w.1).sum();
                let mut roll = self.rng.random_range(0..total);
                let mut kind = 4;
                for (k, w) in weights {
                    if roll < w {
                        kind = k;
                        break;
                    }
                    roll -= w;
                }
                kind
            }
        };
        match (kind, follower) {
            (0, _) => MemberFault::Grow,
            (1, Some(f)) => MemberFault::Shrink(f),
            (3, Some(f)) => MemberFault::Rejoin(f),
            (2, _) | (1 | 3, None) => MemberFault::Replace(any),
            _ => MemberFault::RemoveLeader,
        }
    }

    /// The members a membership fault may remove: all but the last [`KEEP_PROXIED`] proxied
    /// ones, so that network faults keep links to cut (nodes added past the spare ids have no
    /// proxies).
    fn removable(&self) -> Vec<NodeId> {
        let proxied = proxied_members(self.cluster);
        let ids = self.cluster.ids();
        if proxied.len() > KEEP_PROXIED {
            return ids;
        }
        ids.into_iter().filter(|id| !proxied.contains(id)).collect()
    }

    /// The leader, moved first (`TransferLeader`) to a member that may be removed when it is
    /// one of the last proxied ones (if the move fails, the leader is removed anyway).
    async fn removable_leader(&mut self) -> Result<NodeId, String> {
        let leader = self.wait_leader().await?;
        let removable = self.removable();
        if removable.contains(&leader) {
            return Ok(leader);
        }
        let to = removable[self.rng.random_range(0..removable.len())];
        let mut request = self.cluster.request(TransferLeaderRequest { to });
        request.set_timeout(TRANSFER_TIMEOUT);
        let mut client = self.cluster.client(leader);
        let moved = self
            .t
            .during(
                self.cluster,
                tokio::time::timeout(
                    TRANSFER_TIMEOUT + Duration::from_secs(2),
                    client.transfer_leader(request),
                ),
            )
            .await;
        let moved = match moved {
            Ok(Ok(_)) => "done".to_string(),
            Ok(Err(s)) => format!("{:?} {}", s.code(), s.message()),
            Err(_) => "no answer".to_string(),
        };
        self.t.note(format!(
            "leader {leader} keeps proxied links: move leadership to node {to}: {moved}"
        ));
        self.wait_leader().await
    }

    /// Makes a membership fault, adding before removing whenever a removal would otherwise
    /// leave fewer than [`MIN_VOTERS`] voters, and removing before adding at [`MAX_VOTERS`].
    async fn member_fault(&mut self, change: MemberFault) -> Result<(), String> {
        let voters = self.cluster.ids().len();
        match change {
            MemberFault::Grow => {
                self.add_node(None).await?;
            }
            MemberFault::Shrink(id) => self.remove_node(id).await?,
            MemberFault::Replace(old) if voters < MAX_VOTERS => {
                self.add_node(None).await?;
                self.remove_node(old).await?;
            }
            MemberFault::Replace(old) => {
                self.remove_node(old).await?;
                self.add_node(None).await?;
            }
            MemberFault::Rejoin(old) => {
                if voters <= MIN_VOTERS {
                    self.add_node(None).await?;
                }
                let port = self.cluster.port(old);
                self.remove_node(old).await?;
                self.add_node(Some(port)).await?;
            }
            MemberFault::RemoveLeader => {
                if voters <= MIN_VOTERS {
                    self.add_node(None).await?;
                }
                let leader = self.removable_leader().await?;
                self.t.note(format!("the leader is node {leader}"));
                self.remove_node(leader).await?;
            }
        }
        Ok(())
    }

    /// The current leader (as the highest-term leader reports itself), waiting for one.
    async fn wait_leader(&mut self) -> Result<NodeId, String> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(s) = self
                .t
                .during(self.cluster, leader_status(self.cluster))
                .await
            {
                if self.cluster.ids().contains(&s.node_id) {
                    return Ok(s.node_id);
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no leader among the members within {STEP_TIMEOUT:?}"
                ));
            }
            self.t.sleep(self.cluster, MEMBER_POLL).await;
        }
    }

    /// The members a new node joins through: the leader first, then the other running,
    /// unpaused members (a paused one would hold the join's request until it times out).
    async fn join_via(&mut self) -> Vec<NodeId> {
        let leader = self
            .t
            .during(self.cluster, current_leader(self.cluster))
            .await;
        let mut via: Vec<NodeId> = leader.into_iter().collect();
        for id in self.cluster.live_ids() {
            if !self.cluster.is_paused(id) && Some(id) != leader {
                via.push(id);
            }
        }
        if via.is_empty() {
            via = self.cluster.ids();
        }
        via
    }

    /// Adds a node (on `port`, or a free one) and waits until it is a voter; then the workload
    /// may use it. Each attempt waits for a leader to be known first and joins through it. A
    /// joining node that gives up (`serve --join` exits on the first error other than "another
    /// change is in progress", e.g. when its request was forwarded to a leader that just died)
    /// is forgotten, and the join is tried again under a new id until [`STEP_TIMEOUT`].
    async fn add_node(&mut self, port: Option<u16>) -> Result<NodeId, String> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            self.wait_leader().await?;
            let via = self.join_via().await;
            let id = self.cluster.add_joining_node_via(&[], port, &via);
            self.ever.insert(id);
            let port = self.cluster.port(id);
            self.t
                .note(format!("node {id} joins on port {port} through {via:?}"));
            match self.wait_joined(id).await? {
                Ok(index) => {
                    self.report.conf_changes += 2;
                    self.targets.add(id, port);
                    self.t.note(format!(
                        "node {id} is a voter (leader applied index {index})"
                    ));
                    return Ok(id);
                }
                Err(why) => {
                    self.report.failed_joins += 1;
                    self.t.note(format!("node {id} gave up joining: {why}"));
                    self.cluster.forget(id).await;
                    if Instant::now() >= deadline {
                        return Err(format!(
                            "no node could join within {STEP_TIMEOUT:?}; the last attempt: {why}"
                        ));
                    }
                    self.t.sleep(self.cluster, JOIN_BACKOFF).await;
                }
            }
        }
    }

    /// Waits until node `id` is a voter: `Ok(Ok(applied index))`; `Ok(Err(why))` if its process
    /// gave up before it became a member; `Err` past [`STEP_TIMEOUT`].
    async fn wait_joined(&mut self, id: NodeId) -> Result<Result<u64, String>, String> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut learner_seen = false;
        let mut last = String::from("(no leader seen)");
        loop {
            let status = self
                .t
                .during(self.cluster, leader_status(self.cluster))
                .await;
            if let Some(s) = &status {
                let (voters, learners) = members_of(s);
                if voters.contains(&id) {
                    return Ok(Ok(s.applied_index));
                }
                if learners.contains(&id) && !learner_seen {
                    learner_seen = true;
                    self.t.note(format!("node {id} is a learner"));
                }
                last = format!(
                    "leader {} voters {voters:?} learners {learners:?}",
                    s.node_id
                );
            }
            if !self.cluster.is_running(id) {
                let why = last_line(&self.cluster.log(id));
                let member = status.is_some_and(|s| s.members.iter().any(|m| m.id == id));
                if !member {
                    return Ok(Err(why));
                }
                // It is a member after all (its request was applied after it gave up): a
                // restart resumes it from its data directory.
                self.t.note(format!(
                    "node {id} exited ({why}) but is a member: restarting it"
                ));
                self.cluster.restart(id);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "node {id} did not become a voter within {STEP_TIMEOUT:?}: {last}; its log \
                     ends with:\n{}",
                    self.cluster.log_tail(id, 20)
                ));
            }
            self.t.sleep(self.cluster, MEMBER_POLL).await;
        }
    }

    /// Removes node `id` (retrying refusals and unknown outcomes until the leader's
    /// configuration no longer has it), keeps it running a little while the workload may still
    /// call it, then stops it and forgets it.
    async fn remove_node(&mut self, id: NodeId) -> Result<(), String> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut last = String::from("(no leader seen)");
        loop {
            let status = self
                .t
                .during(self.cluster, leader_status(self.cluster))
                .await;
            if let Some(s) = &status {
                if !s.members.iter().any(|m| m.id == id) {
                    self.t.note(format!(
                        "node {id} removed (leader {} applied index {})",
                        s.node_id, s.applied_index
                    ));
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "node {id} was not removed within {STEP_TIMEOUT:?}; last: {last}"
                ));
            }
            let via = match &status {
                Some(s) => s.node_id,
                None => {
                    self.t.sleep(self.cluster, MEMBER_POLL).await;
                    continue;
                }
            };
            let answer = self
                .t
                .during(
                    self.cluster,
                    change_members(self.cluster, via, Kind::Remove, id),
                )
                .await;
            match answer {
                Ok(index) => {
                    // Answered once the leader applied it in the term it was proposed in.
                    self.t.note(format!(
                        "remove node {id} through node {via}: applied at index {index}"
                    ));
                    break;
                }
                Err(why) => {
                    self.t
                        .note(format!("remove node {id} through node {via}: {why}"));
                    last = why;
                    self.t.sleep(self.cluster, Duration::from_millis(300)).await;
                }
            }
        }
        self.report.conf_changes += 1;
        // A removed node may still be asked for a while (an operator stops it later).
        let linger = Duration::from_millis(self.rng.random_range(100..800));
        self.t.sleep(self.cluster, linger).await;
        self.targets.remove(id);
        self.t.sleep(self.cluster, Duration::from_millis(50)).await;
        self.cluster.forget(id).await;
        self.t.note(format!("node {id} stopped"));
        Ok(())
    }

    /// After the last fault: the configuration is exactly the harness's nodes, all voters (a
    /// member whose join was given up but applied later is removed).
    async fn settle(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let ours: Vec<NodeId> = self.cluster.ids();
        loop {
            self.check_alive()?;
            if let Some(s) = leader_status(self.cluster).await {
                let (voters, learners) = members_of(&s);
                if voters == ours && learners.is_empty() {
                    self.report.voters = voters;
                    return Ok(());
                }
                let stray = voters
                    .iter()
                    .chain(&learners)
                    .copied()
                    .find(|m| !ours.contains(m));
                if let Some(stray) = stray {
                    let answer = change_members(self.cluster, s.node_id, Kind::Remove, stray).await;
                    self.t
                        .note(format!("settle: remove stray member {stray}: {answer:?}"));
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "the configuration did not settle on {ours:?} within {STEP_TIMEOUT:?}: \
                         voters {voters:?} learners {learners:?}"
                    ));
                }
            } else if Instant::now() >= deadline {
                return Err(format!(
                    "no leader within {STEP_TIMEOUT:?} after the faults"
                ));
            }
            tokio::time::sleep(MEMBER_POLL).await;
        }
    }
}

/// One `ChangeMembers` of one node through `via`, bounded by [`CHANGE_TIMEOUT`]: the index it
/// applied at, or what went wrong.
async fn change_members(
    cluster: &Cluster,
    via: NodeId,
    kind: Kind,
    id: NodeId,
) -> Result<u64, String> {
    let mut request = cluster.request(ChangeMembersRequest {
        changes: vec![MemberChange {
            kind: kind as i32,
            id,
            ..Default::default()
        }],
    });
    request.set_timeout(CHANGE_TIMEOUT);
    let mut client = cluster.client(via);
    let call = client.change_members(request);
    match tokio::time::timeout(CHANGE_TIMEOUT + Duration::from_secs(2), call).await {
        Ok(Ok(r)) => Ok(r.into_inner().index),
        Ok(Err(s)) => Err(format!("{:?} {}", s.code(), s.message())),
        Err(_) => Err(format!("no answer within {CHANGE_TIMEOUT:?}")),
    }
}

/// The last non-empty line of a log.
fn last_line(log: &str) -> String {
    log.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(empty log)")
        .to_string()
}
