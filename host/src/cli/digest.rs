//! `wraft digest`: each endpoint's hash of a tenant's state, to compare replicas.

use std::process::ExitCode;

use serde_json::json;

use super::Endpoints;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    endpoints: Endpoints,
    #[arg(long)]
    tenant: String,
    /// One JSON object per endpoint per line.
    #[arg(long)]
    json: bool,
}

/// Exits 0 when every endpoint answered, 3 when any did not.
pub async fn run(args: Args) -> ExitCode {
    let client = match args.endpoints.client() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut all_ok = true;
    for endpoint in &args.endpoints.endpoints {
        match client.digest_at(endpoint, &args.tenant).await {
            Ok(d) if args.json => println!(
                "{}",
                json!({"endpoint": endpoint, "tenant": d.tenant, "index": d.index, "state_hash": d.state_hash, "module_hash": d.module_hash})
            ),
            Ok(d) => println!(
                "{endpoint} index={} state={} module={}",
                d.index, d.state_hash, d.module_hash
            ),
            Err(err) => {
                all_ok = false;
                if args.json {
                    println!(
                        "{}",
                        json!({"endpoint": endpoint, "error": err.to_string()})
                    );
                } else {
                    println!("{endpoint} error: {err}");
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
