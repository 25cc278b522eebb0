//! `wraft leader transfer`: move leadership to another voter (before maintenance on the
//! leader's machine, say), and wait until it has moved.

use std::process::ExitCode;

use super::{fail, Endpoints};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Hand leadership to a voter and wait until it leads.
    Transfer(TransferArgs),
}

#[derive(clap::Args, Debug)]
pub struct TransferArgs {
    #[command(flatten)]
    endpoints: Endpoints,
    /// The voter to lead next; without it, the most caught-up one.
    #[arg(long)]
    to: Option<u64>,
}

pub async fn run(command: Command) -> ExitCode {
    match command {
        Command::Transfer(args) => {
            let client = match args.endpoints.client() {
                Ok(c) => c,
                Err(code) => return code,
            };
            match client.transfer_leader(args.to.unwrap_or(0)).await {
                Ok(resp) => {
                    println!("leader {} (term {})", resp.leader, resp.term);
                    ExitCode::SUCCESS
                }
                Err(err) => fail(&err, false),
            }
        }
    }
}
