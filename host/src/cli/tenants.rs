//! `wraft tenants`: every tenant with its module, version and state size, as the first
//! endpoint that answers sees them.

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
                        "{:<24} {:>7} {:<16} {:>10} {:>12}",
                        "TENANT", "VERSION", "MODULE", "APPLIED", "STATE BYTES"
                    );
                }
                for t in &status.tenants {
                    if args.json {
                        println!(
                            "{}",
                            json!({"endpoint": endpoint, "name": t.name, "version": t.version, "module_hash": t.module_hash, "applied_index": t.applied_index, "state_bytes": t.state_bytes})
                        );
                    } else {
                        let short = t.module_hash.get(..16).unwrap_or(&t.module_hash);
                        println!(
                            "{:<24} {:>7} {:<16} {:>10} {:>12}",
                            t.name, t.version, short, t.applied_index, t.state_bytes
                        );
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
