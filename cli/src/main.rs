//! `trackgate`: one binary, every role as a subcommand. Each subcommand is a thin call into its
//! crate; this file only parses arguments, sets up logging and turns errors into exit codes.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "trackgate", version, about = "Kubernetes-native gateway for raw-TCP GPS trackers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {}
}
