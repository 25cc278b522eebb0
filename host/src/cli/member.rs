//! `wraft member add|promote|remove|list`: change who is in the cluster. Each command is one
//! membership change, answered once it has applied; `add --voter` and a `remove` of several
//! nodes at once go through joint consensus, which the cluster leaves by itself.

use std::process::ExitCode;

use wraft_proto::client::{member_change::Kind, MemberChange};

use super::{fail, Endpoints};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Add a node (as a learner unless --voter). Start it with `wraft serve --join` instead to
    /// have it register itself; use this for a node whose address you assign.
    Add(AddArgs),
    /// Make learners voters.
    Promote(IdsArgs),
    /// Remove members (the leader hands over first if it is among them).
    Remove(IdsArgs),
    /// List the members with their role and address, as the first endpoint that answers sees
    /// them.
    List(ListArgs),
}

#[derive(clap::Args, Debug)]
pub struct AddArgs {
    #[command(flatten)]
    endpoints: Endpoints,
    /// The new node's id (never reuse the id of a removed node).
    id: u64,
    /// Where members reach it: HOST:PORT.
    addr: String,
    /// Add it as a voter at once (default: a learner, promoted later).
    #[arg(long)]
    voter: bool,
}

#[derive(clap::Args, Debug)]
pub struct IdsArgs {
    #[command(flatten)]
    endpoints: Endpoints,
    /// Node ids.
    #[arg(required = true)]
    ids: Vec<u64>,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    endpoints: Endpoints,
}

pub async fn run(command: Command) -> ExitCode {
    let (endpoints, changes) = match command {
        Command::Add(a) => {
            let kind = if a.voter {
                Kind::AddVoter
            } else {
                Kind::AddLearner
            };
            let change = MemberChange {
                kind: kind as i32,
                id: a.id,
                addr: a.addr,
                incarnation: 0,
            };
            (a.endpoints, vec![change])
        }
        Command::Promote(a) => (a.endpoints, changes(Kind::Promote, &a.ids)),
        Command::Remove(a) => (a.endpoints, changes(Kind::Remove, &a.ids)),
        Command::List(a) => return list(a.endpoints).await,
    };
    let client = match endpoints.client() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.change_members(changes).await {
        Ok(resp) => {
            println!("membership changed at index {}", resp.index);
            print_members(&resp.members);
            ExitCode::SUCCESS
        }
        Err(err) => fail(&err, true),
    }
}

fn changes(kind: Kind, ids: &[u64]) -> Vec<MemberChange> {
    ids.iter()
        .map(|id| MemberChange {
            kind: kind as i32,
            id: *id,
            ..Default::default()
        })
        .collect()
}

async fn list(endpoints: Endpoints) -> ExitCode {
    let client = match endpoints.client() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.status().await {
        Ok(status) => {
            print_members(&status.members);
            ExitCode::SUCCESS
        }
        Err(err) => fail(&err, false),
    }
}

fn print_members(members: &[wraft_proto::client::Member]) {
    for m in members {
        let role = if m.voter { "voter" } else { "learner" };
        println!("{:>4}  {:<8} {}", m.id, role, m.addr);
    }
}
