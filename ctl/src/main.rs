//! `ctl`: the nine9s command line, for people and scripts. Talks to an
//! agent's gRPC control plane.
//!
//! Exit codes: 0 success; 1 the agent refused or failed the operation (the
//! one-line reason is on stderr); 2 bad usage; 3 the agent could not be
//! reached.

mod commands;
mod json;
mod render;

use clap::{Parser, Subcommand, ValueEnum};

/// Stage, upgrade, downgrade and roll back the releases of a nine9s agent.
#[derive(Parser)]
#[command(name = "ctl", version)]
struct Cli {
    /// The agent's gRPC address.
    #[arg(
        long,
        global = true,
        env = "NINE9S_AGENT",
        default_value = "http://127.0.0.1:50051"
    )]
    agent: String,
    /// `table` for people, `json` (one document on stdout) for scripts.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Upload a release directory (release.toml + its library).
    Stage {
        /// Directory holding release.toml.
        dir: std::path::PathBuf,
        /// The library to upload, instead of looking it up.
        #[arg(long)]
        library: Option<std::path::PathBuf>,
    },
    /// List the releases the agent knows.
    Releases,
    /// Switch to a higher version.
    Upgrade(Switch),
    /// Switch to a lower version.
    Downgrade(Switch),
    /// Return to the previous permanent release.
    Rollback {
        /// Migrate the running state down, or restore the snapshot taken
        /// when the release was left.
        #[arg(long, value_enum, default_value_t = StateFrom::Migrate)]
        state: StateFrom,
        /// Print the plan and run the checks; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Make the current release permanent now.
    MakePermanent { version: String },
    /// Forget a release that is neither permanent nor current.
    Remove { version: String },
    /// The active release, the lifecycle states and the loaded libraries.
    Status,
    /// The transitions, oldest first.
    History {
        /// Only the last N.
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
}

#[derive(clap::Args)]
struct Switch {
    /// The version to switch to.
    #[arg(long)]
    to: String,
    /// Soak period before the release becomes permanent (default: the agent's).
    #[arg(long, value_parser = duration, conflicts_with_all = ["permanent", "no_permanent"])]
    soak: Option<std::time::Duration>,
    /// Make the release permanent at once.
    #[arg(long, conflicts_with = "no_permanent")]
    permanent: bool,
    /// Leave the release current: a restart returns to the permanent one.
    #[arg(long)]
    no_permanent: bool,
    /// Print the plan and run every check that needs no traffic; change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum StateFrom {
    Migrate,
    Snapshot,
}

fn duration(text: &str) -> Result<std::time::Duration, String> {
    nine9s_manifest::parse_duration(text)
}

/// Why `ctl` failed, which decides the exit code.
#[derive(Debug)]
pub enum Failure {
    /// The agent could not be reached.
    Unreachable(anyhow::Error),
    /// Anything else.
    Failed(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Failed(e.into())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    let code = match commands::run(&cli.agent, cli.output, cli.command).await {
        Ok(()) => 0,
        Err(Failure::Failed(e)) => {
            eprintln!("ctl: error: {e:#}");
            1
        }
        Err(Failure::Unreachable(e)) => {
            eprintln!("ctl: error: {e:#}");
            3
        }
    };
    std::process::exit(code);
}
