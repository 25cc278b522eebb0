//! `wraft deploy`, `wraft exec` and `wraft delete`: the write commands.

use std::path::PathBuf;
use std::process::ExitCode;

use wraft_proto::client::exec_response::Outcome;

use super::{fail, finish, Endpoints};

#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    #[command(flatten)]
    endpoints: Endpoints,
    #[arg(long)]
    tenant: String,
    /// The module, built for wasm32-unknown-unknown.
    #[arg(required_unless_present = "rollback_to")]
    file: Option<PathBuf>,
    /// Instead of a file: deploy again the module the tenant ran as this version (`wraft
    /// tenants --history` lists them), as its newest version. The current state goes through
    /// that module's restore/migrate hooks like any upgrade.
    #[arg(long, conflicts_with = "file")]
    rollback_to: Option<u64>,
}

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    endpoints: Endpoints,
    #[arg(long)]
    tenant: String,
    /// Session id for exactly-once retries (with --seq).
    #[arg(long, requires = "seq")]
    client_id: Option<String>,
    /// Sequence number within the session; retry with the same number after an indeterminate error.
    #[arg(long, requires = "client_id")]
    seq: Option<u64>,
    /// The command, passed to the module as bytes.
    #[arg(required_unless_present = "stdin")]
    command: Option<String>,
    /// Instead of one command: every line of standard input is a command. They are sent on one
    /// `Pipeline` stream, several at once, and their outputs printed one line each, in input
    /// order (a failed command's line is empty, and its error goes to stderr with its line
    /// number). Commands in flight together are not ordered among themselves: with
    /// --in-flight 1 they apply in input order.
    #[arg(long, conflicts_with_all = ["command", "client_id"])]
    stdin: bool,
    /// With --stdin: how many commands may be in flight at once.
    #[arg(long, default_value_t = 64, requires = "stdin", value_parser = clap::value_parser!(u32).range(1..=1024))]
    in_flight: u32,
}

#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    #[command(flatten)]
    endpoints: Endpoints,
    /// The tenant to remove, with its state and sessions.
    #[arg(long)]
    tenant: String,
}

pub async fn delete(args: DeleteArgs) -> ExitCode {
    let client = match args.endpoints.client() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.delete_tenant(&args.tenant).await {
        Ok(resp) => {
            println!("deleted tenant {} at index {}", args.tenant, resp.index);
            ExitCode::SUCCESS
        }
        Err(err) => fail(&err, true),
    }
}

pub async fn deploy(args: DeployArgs) -> ExitCode {
    let client = match args.endpoints.client() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = match (&args.file, args.rollback_to) {
        (_, Some(version)) => client.rollback(&args.tenant, version).await,
        (Some(file), None) => match std::fs::read(file) {
            Ok(wasm) => client.deploy(&args.tenant, wasm).await,
            Err(err) => {
                eprintln!("error: read {}: {err}", file.display());
                return ExitCode::from(2);
            }
        },
        (None, None) => {
            eprintln!("error: give a module file or --rollback-to VERSION");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(resp) => {
            println!("{}", resp.module_hash);
            ExitCode::SUCCESS
        }
        Err(err) => fail(&err, true),
    }
}

pub async fn exec(args: ExecArgs) -> ExitCode {
    let session = args.client_id.zip(args.seq);
    let client = match args.endpoints.client() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let command = match (args.command, args.stdin) {
        (_, true) => {
            return super::exec_lines::run(client, args.tenant, args.in_flight as usize).await
        }
        (Some(command), false) => command,
        (None, false) => {
            eprintln!("error: give a command, or --stdin");
            return ExitCode::from(2);
        }
    };
    match client
        .exec(&args.tenant, command.into_bytes(), session)
        .await
    {
        Ok(resp) => finish(
            resp.outcome.map(|o| match o {
                Outcome::Output(out) => Ok(out),
                Outcome::Error(err) => Err(err),
            }),
            super::EXIT_INDETERMINATE,
        ),
        Err(err) => fail(&err, true),
    }
}
