//! `trackgate`: one binary, every role as a subcommand. Each subcommand is a thin call into its
//! crate; this file only parses arguments, sets up logging and turns errors into exit codes.

use clap::{Parser, Subcommand};

mod simulate;

#[derive(Parser)]
#[command(name = "trackgate", version, about = "Kubernetes-native gateway for raw-TCP GPS trackers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate Teltonika devices against a listener; report rate and latency; verify Redis.
    Simulate(simulate::SimulateArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate(args) => simulate::run_simulate(args),
    }
}
