//! `wraft tenants`: every tenant with its module, version, state model and state size, as the
//! first endpoint that answers sees them; `--history` adds every version each tenant ran (the
//! versions `wraft deploy --rollback-to` accepts).

use std::process::ExitCode;

use serde_json::json;

use super::{fail, Endpoints};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    endpoints: Endpoints,
    /// One JSON object per tenant per line.
    #[arg(long)]
    json: bool,
    /// Also list every version each tenant ran: version, module hash, deploy index.
    #[arg(long)]
    history: bool,
}

pub async fn run(args: Args) -> ExitCode {
    let client = match args.endpoints.client() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut last = None;
    for endpoint in &args.endpoints.endpoints {
        match client.status_at(endpoint).await {
            Ok(status) => {
                if !args.json {
                    println!(
                        "{:<24} {:>7} {:<16} {:<6} {:>10} {:>12}",
                        "TENANT", "VERSION", "MODULE", "MODEL", "APPLIED", "STATE BYTES"
                    );
                }
                for t in &status.tenants {
                    if args.json {
                        println!(
                            "{}",
                            json!({"endpoint": endpoint, "name": t.name, "version": t.version, "module_hash": t.module_hash, "model": t.model, "applied_index": t.applied_index, "state_bytes": t.state_bytes, "history": t.history.iter().map(|v| json!({"version": v.version, "module_hash": v.module_hash, "index": v.index})).collect::<Vec<_>>()})
                        );
                    } else {
                        let short = t.module_hash.get(..16).unwrap_or(&t.module_hash);
                        println!(
                            "{:<24} {:>7} {:<16} {:<6} {:>10} {:>12}",
                            t.name, t.version, short, t.model, t.applied_index, t.state_bytes
                        );
                        if args.history {
                            for v in &t.history {
                                println!(
                                    "  version {:>4}  module {}  deployed at index {}",
                                    v.version, v.module_hash, v.index
                                );
                            }
                        }
                    }
                }
                return ExitCode::SUCCESS;
            }
            Err(err) => last = Some(err),
        }
    }
    match last {
        Some(err) => fail(&err, false),
        None => {
            eprintln!("error: no endpoints given");
            ExitCode::from(2)
        }
    }
}
