//! `wraft query`: run a read-only query.

use std::process::ExitCode;

use wraft_proto::client::query_response::Outcome;
use wraft_proto::client::Consistency;

use super::{fail, finish, Endpoints};

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum Level {
    /// Through the leader, never stale.
    Linearizable,
    /// Through the leader, without a quorum round while it holds its lease (assumes bounded
    /// clock drift); otherwise as linearizable.
    Lease,
    /// From the node asked; may lag.
    Stale,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    endpoints: Endpoints,
    #[arg(long)]
    tenant: String,
    #[arg(long, value_enum, default_value = "linearizable")]
    consistency: Level,
    /// The query, passed to the module as bytes.
    query: String,
}

pub async fn run(args: Args) -> ExitCode {
    let consistency = match args.consistency {
        Level::Linearizable => Consistency::Linearizable,
        Level::Lease => Consistency::Lease,
        Level::Stale => Consistency::Stale,
    };
    let client = match args.endpoints.client() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client
        .query(&args.tenant, args.query.into_bytes(), consistency)
        .await
    {
        Ok(resp) => finish(
            resp.outcome.map(|o| match o {
                Outcome::Output(out) => Ok(out),
                Outcome::Error(err) => Err(err),
            }),
            super::EXIT_DEFINITE,
        ),
        Err(err) => fail(&err, false),
    }
}
