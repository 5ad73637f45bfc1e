//! `trackgate`: one binary, every role as a subcommand. Each subcommand is a thin call into its
//! crate; this file only parses arguments, sets up logging and turns errors into exit codes.

use clap::{Parser, Subcommand};

mod command;
mod decode;
mod run;
mod simulate;

#[derive(Parser)]
#[command(
    name = "trackgate",
    version,
    about = "Kubernetes-native gateway for raw-TCP GPS trackers"
)]
struct Cli {
    #[command(subcommand)]
    command: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Decode a Teltonika or GT06 packet given as hex (argument or stdin) and print it as JSON.
    Decode(decode::DecodeArgs),
    /// Simulate Teltonika devices against a listener; report rate and latency; verify Redis.
    Simulate(Box<simulate::SimulateArgs>),
    /// Serve a listener shard: device ports, Redis Streams (URL from TRACKGATE_REDIS_URL),
    /// /metrics /livez /readyz on the admin address; SIGTERM shuts down gracefully.
    Listen {
        /// The shard config file (shard.json); reloaded when it changes.
        #[arg(long)]
        config: std::path::PathBuf,
        /// Address of the admin server.
        #[arg(long, default_value = "0.0.0.0:9090")]
        admin_addr: std::net::SocketAddr,
        /// Address the device ports are bound on.
        #[arg(long, default_value = "0.0.0.0")]
        bind: std::net::IpAddr,
    },
    /// Run the Kubernetes operator: reconcile TrackerPortPools into listener shards, with
    /// leader election (Lease `trackgate-operator` in $POD_NAMESPACE) and /metrics /livez /readyz.
    Operator {
        /// Address of the admin server.
        #[arg(long, default_value = "0.0.0.0:8080")]
        admin_addr: std::net::SocketAddr,
    },
    /// Print the TrackerPortPool CustomResourceDefinition as YAML.
    Crd,
    /// Send a command to a device of a pool through Redis and wait for its answer (printed);
    /// exit 1 when it fails or expires.
    Command(Box<command::CommandArgs>),
    /// Run whole TrackerPortPools (one file each) on this machine, no cluster: allocate their
    /// ports as the operator would, write the shard configs to a state directory and serve
    /// every shard in one process.
    Run(run::RunArgs),
}

/// Errors end as one line on stderr and exit status 1 (never a backtrace: a bad packet given
/// to `decode` is an answer, not a crash).
fn main() -> std::process::ExitCode {
    match dispatch(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Role::Decode(args) => decode::run(args),
        Role::Simulate(args) => simulate::run_simulate(*args),
        Role::Listen {
            config,
            admin_addr,
            bind,
        } => tokio::runtime::Runtime::new()?
            .block_on(trackgate_listener::run(config, admin_addr, bind))
            .map_err(Into::into),
        Role::Operator { admin_addr } => tokio::runtime::Runtime::new()?
            .block_on(trackgate_operator::run(admin_addr))
            .map_err(Into::into),
        Role::Run(args) => run::run(args),
        Role::Command(args) => command::run(*args),
        Role::Crd => print_stdout(&trackgate_operator::crd_yaml()),
    }
}

/// Writes data to stdout. A closed pipe (`trackgate decode … | head`) ends the output quietly
/// instead of panicking as `print!` does.
fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
