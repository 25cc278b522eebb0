//! `wraft limits`: sets a tenant's limits (fuel per call and per snapshot, memory, result size,
//! stack units). Limits are replicated configuration: the change is a log entry, so every
//! replica bounds the tenant's calls alike from the same op on. Prints the limits in force.

use std::process::ExitCode;

use wraft_proto::client::Limits;

use super::{fail, Endpoints};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    endpoints: Endpoints,
    #[arg(long)]
    tenant: String,
    /// Fuel for one apply or query.
    #[arg(long)]
    fuel: Option<u64>,
    /// Fuel for one snapshot, restore or migrate.
    #[arg(long)]
    snapshot_fuel: Option<u64>,
    /// The most linear memory the module may use, in MiB.
    #[arg(long)]
    memory_mib: Option<u64>,
    /// The largest apply or query result, in bytes.
    #[arg(long)]
    max_result_bytes: Option<u64>,
    /// Stack units one call may use (bounds recursion depth).
    #[arg(long)]
    stack_units: Option<u32>,
}

pub async fn run(args: Args) -> ExitCode {
    let client = match args.endpoints.client() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let change = Limits {
        fuel_per_call: args.fuel.unwrap_or(0),
        fuel_per_snapshot: args.snapshot_fuel.unwrap_or(0),
        memory_bytes: args.memory_mib.map_or(0, |m| m.saturating_mul(1 << 20)),
        max_result_bytes: args.max_result_bytes.unwrap_or(0),
        stack_units: args.stack_units.unwrap_or(0),
    };
    match client.set_limits(&args.tenant, change).await {
        Ok(resp) => {
            let l = resp.limits.unwrap_or_default();
            println!(
                "tenant {} at index {}: fuel {} per call, {} per snapshot; memory {} bytes; results up to {} bytes; {} stack units",
                args.tenant,
                resp.index,
                l.fuel_per_call,
                l.fuel_per_snapshot,
                l.memory_bytes,
                l.max_result_bytes,
                l.stack_units
            );
            ExitCode::SUCCESS
        }
        Err(err) => fail(&err, true),
    }
}
