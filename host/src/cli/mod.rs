//! The `wraft` command line: one file per command, each parse → act → print.
//!
//! Exit codes are a contract: 0 success; 2 usage; 3 definite failure (nothing applied, or the
//! module's own error); 4 indeterminate (the command may have been applied). A refused token
//! is a definite failure (3): the node did nothing.

mod auth;
mod bench;
mod certs;
mod config;
mod digest;
mod exec;
mod exec_lines;
mod leader;
mod limits;
mod member;
mod query;
mod serve;
mod status;
mod tenants;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client::{Client, ClientError};
use crate::error::Outcome;

/// A Raft cluster whose replicated state machines are WebAssembly modules.
#[derive(Parser, Debug)]
#[command(name = "wraft", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a client command sends its request: HOST:PORT, comma-separated, tried in order.
#[derive(clap::Args, Debug, Clone)]
pub struct Endpoints {
    #[arg(
        long,
        env = "WRAFT_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7001"
    )]
    endpoints: Vec<String>,
    /// CA certificate (PEM) to verify the nodes with; set it (or --cert/--key) to use TLS.
    #[arg(long, env = "WRAFT_CA", value_name = "FILE")]
    ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for nodes that require one (`--client-cert-required`).
    #[arg(long, env = "WRAFT_CERT", value_name = "FILE", requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, env = "WRAFT_KEY", value_name = "FILE", requires = "cert")]
    key: Option<std::path::PathBuf>,
    /// Access token (`wraft auth token`), for a cluster whose nodes run with an auth secret.
    /// Prefer WRAFT_TOKEN: other users can read a command line.
    #[arg(
        long,
        env = "WRAFT_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
}

impl Endpoints {
    /// The TLS configuration the options ask for (`None`: plain text). A file that cannot be
    /// read is a usage error: exit 2 with the file named.
    fn tls(&self) -> Result<Option<tonic::transport::ClientTlsConfig>, ExitCode> {
        crate::tls::client_config(
            self.ca.as_deref(),
            self.cert.as_deref(),
            self.key.as_deref(),
        )
        .map_err(|err| {
            eprintln!("error: {err}");
            ExitCode::from(2)
        })
    }

    /// The `authorization` value that carries --token (`None`: no token). A token that cannot
    /// be sent is a usage error: exit 2.
    fn authorization(
        &self,
    ) -> Result<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>, ExitCode> {
        self.token
            .as_deref()
            .map(crate::auth::bearer)
            .transpose()
            .map_err(|err| {
                eprintln!("error: --token: {err}");
                ExitCode::from(2)
            })
    }

    /// A client of these endpoints, with TLS and the token when the options ask for them.
    fn client(&self) -> Result<Client, ExitCode> {
        Client::new(self.endpoints.clone())
            .with_tls(self.tls()?)
            .with_token(self.token.as_deref())
            .map_err(|err| {
                eprintln!("error: --token: {err}");
                ExitCode::from(2)
            })
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node.
    Serve(serve::Args),
    /// Make a CA and certificates for a local TLS cluster (nodes and a client).
    Certs(certs::Args),
    /// Access control: `wraft auth secret` (the cluster secret), `wraft auth token` (mint one).
    #[command(subcommand)]
    Auth(auth::Command),
    /// Deploy (or upgrade) a tenant's module; prints the module hash.
    Deploy(exec::DeployArgs),
    /// Replicate a command; prints what the module's `apply` returned.
    Exec(exec::ExecArgs),
    /// Run a query; prints what the module's `query` returned.
    Query(query::Args),
    /// Show each endpoint's role, term and indexes.
    Status(status::Args),
    /// Show each endpoint's hash of a tenant's state, to compare replicas.
    Digest(digest::Args),
    /// Remove a tenant, its state and sessions, on every replica.
    Delete(exec::DeleteArgs),
    /// List the tenants: module hash, version and state size.
    Tenants(tenants::Args),
    /// Leadership: `wraft leader transfer [--to N]`.
    #[command(subcommand)]
    Leader(leader::Command),
    /// Set a tenant's limits (admin; replicated): fuel, memory, result size, stack depth.
    Limits(limits::Args),
    /// Membership: `wraft member add|promote|remove|list`.
    #[command(subcommand)]
    Member(member::Command),
    /// Load a kv tenant with puts and gets; prints throughput and latency percentiles.
    Bench(bench::Args),
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    exit_quietly_on_closed_stdout();
    let json_logs = matches!(&cli.command, Command::Serve(a) if a.log_json());
    crate::logging::init(json_logs);
    // `bench --threads 1` runs on this thread alone: its request loops and channels then wake
    // each other without waking another thread (BENCHMARKS.md, "The load generator's threads").
    let generator_threads = match &cli.command {
        Command::Bench(args) => args.threads(),
        _ => None,
    };
    let mut builder = match generator_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder
        .enable_all()
        // Deploy validation instantiates modules on these threads (a start function runs):
        // the same room as the apply thread (see `wasm::GUEST_THREAD_STACK_BYTES`).
        .thread_stack_size(crate::wasm::GUEST_THREAD_STACK_BYTES)
        .build()
    {
        Ok(r) => r,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Certs(args) => certs::run(args).await,
            Command::Auth(command) => auth::run(command),
            Command::Deploy(args) => exec::deploy(args).await,
            Command::Exec(args) => exec::exec(args).await,
            Command::Query(args) => query::run(args).await,
            Command::Status(args) => status::run(args).await,
            Command::Digest(args) => digest::run(args).await,
            Command::Tenants(args) => tenants::run(args).await,
            Command::Delete(args) => exec::delete(args).await,
            Command::Leader(command) => leader::run(command).await,
            Command::Member(command) => member::run(command).await,
            Command::Limits(args) => limits::run(args).await,
            Command::Bench(args) => bench::run(args).await,
        }
    })
}

/// Exit code 3: a definite failure.
pub const EXIT_DEFINITE: u8 = 3;
/// Exit code 4: an indeterminate failure.
pub const EXIT_INDETERMINATE: u8 = 4;

/// Prints a client error on one line and picks the exit code from its outcome.
fn fail(err: &ClientError, write: bool) -> ExitCode {
    let outcome = err.outcome(write);
    let (code, label) = match outcome {
        Outcome::Definite => (EXIT_DEFINITE, "not applied"),
        Outcome::Indeterminate => (EXIT_INDETERMINATE, "may have been applied"),
    };
    match err {
        ClientError::Status(s) if write => {
            eprintln!("error ({:?}, {label}): {}", s.code(), s.message())
        }
        ClientError::Status(s) => eprintln!("error ({:?}): {}", s.code(), s.message()),
        other => eprintln!("error: {other}"),
    }
    ExitCode::from(code)
}

/// Prints what the module answered and picks the exit code: its output (0), or its own error
/// or a trap (3: applied with no effect). A missing answer exits with `empty_code`.
fn finish(
    outcome: Option<Result<Vec<u8>, wraft_proto::client::ModuleError>>,
    empty_code: u8,
) -> ExitCode {
    match outcome {
        Some(Ok(out)) => {
            print_output(&out);
            ExitCode::SUCCESS
        }
        Some(Err(err)) => {
            let kind = wraft_proto::client::module_error::Kind::try_from(err.kind)
                .map(|k| k.as_str_name().to_ascii_lowercase())
                .unwrap_or_else(|_| format!("kind {}", err.kind));
            eprintln!("error ({kind}): {}", err.message);
            ExitCode::from(EXIT_DEFINITE)
        }
        None => {
            eprintln!("error: the node sent an empty answer");
            ExitCode::from(empty_code)
        }
    }
}

/// Prints module output: as text when it is UTF-8, else as hex.
fn print_output(bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => println!("{text}"),
        Err(_) => println!("{}", hex::encode(bytes)),
    }
}

/// `println!` panics when stdout is a pipe whose reader has gone (`wraft status | head -1`).
/// Rust ignores SIGPIPE, and restoring its default would also kill the CLI when a node closes a
/// socket (a plain-text call to a TLS node); so a closed stdout alone ends the process, quietly
/// and with the status a shell reports for a tool its pipe cut short, as for any Unix tool.
fn exit_quietly_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(128 + 13); // 128 + SIGPIPE
        }
        default(info);
    }));
}
