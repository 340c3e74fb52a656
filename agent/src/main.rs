//! `agent`: runs the nine9s agent. With no flags it serves the sample
//! release nine9s 0.1.0 on 127.0.0.1:9090, gRPC on 127.0.0.1:50051, data in
//! `./nine9s-data`.
//!
//! Exit codes: 0 after a clean shutdown (SIGTERM or Ctrl-C), 1 when the
//! agent cannot start or fails, 2 for bad flags.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use nine9s_agent::{Agent, Bootstrap, Config};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// nine9s agent: serves a service and upgrades it in place.
#[derive(Parser)]
#[command(name = "agent", version)]
struct Args {
    /// Where releases, history and state snapshots are kept.
    #[arg(long, default_value = "nine9s-data", env = "NINE9S_DATA_DIR")]
    data_dir: PathBuf,
    /// Address the service answers HTTP on.
    #[arg(long, default_value = "127.0.0.1:9090")]
    http: SocketAddr,
    /// Address of the gRPC control plane.
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc: SocketAddr,
    /// Release directory installed on an empty data dir (default: the
    /// embedded sample nine9s 0.1.0).
    #[arg(long)]
    bootstrap: Option<PathBuf>,
    /// Default soak before a new release becomes permanent.
    #[arg(long, default_value = "5s", value_parser = duration)]
    soak: Duration,
    /// How often the active state is checkpointed.
    #[arg(long, default_value = "10s", value_parser = duration)]
    checkpoint_every: Duration,
    /// How long in-flight requests get on shutdown.
    #[arg(long, default_value = "10s", value_parser = duration)]
    shutdown_grace: Duration,
    /// How long a switch waits for in-flight calls on the old release.
    #[arg(long, default_value = "5s", value_parser = duration)]
    quiesce_timeout: Duration,
    /// Old releases kept for downgrades.
    #[arg(long, default_value_t = 5)]
    keep_old: usize,
    /// Transitions kept in the history.
    #[arg(long, default_value_t = 10_000)]
    keep_history: usize,
    /// Share of failed requests during a soak that rolls back (0..1).
    #[arg(long, default_value_t = 0.05)]
    max_error_rate: f64,
}

fn duration(text: &str) -> Result<Duration, String> {
    nine9s_manifest::parse_duration(text)
}

/// glibc malloc arenas the agent uses (see `nine9s_host::limit_malloc_arenas`:
/// one kept resident memory flattest in the bench).
const MALLOC_ARENAS: i32 = 1;

fn main() {
    nine9s_host::limit_malloc_arenas(MALLOC_ARENAS);
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the tokio runtime");
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("agent: error: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut config = Config::new(args.data_dir);
    config.bootstrap = args.bootstrap.map_or(Bootstrap::Embedded, Bootstrap::Dir);
    config.soak = args.soak;
    config.checkpoint_every = args.checkpoint_every;
    config.shutdown_grace = args.shutdown_grace;
    config.quiesce_timeout = args.quiesce_timeout;
    config.keep_old = args.keep_old;
    config.keep_history = args.keep_history;
    config.max_error_rate = args.max_error_rate;

    let http = TcpListener::bind(args.http)
        .await
        .map_err(|e| format!("cannot listen for HTTP on {}: {e}", args.http))?;
    let grpc = TcpListener::bind(args.grpc)
        .await
        .map_err(|e| format!("cannot listen for gRPC on {}: {e}", args.grpc))?;
    let agent = Agent::boot(config).await?;
    // One line on stdout, for people and for scripts that started the agent
    // on port 0.
    println!(
        "nine9s agent ready: release {} http={} grpc={}",
        agent.active_version().await,
        http.local_addr()?,
        grpc.local_addr()?
    );
    agent.run(http, grpc, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
