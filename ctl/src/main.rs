//! `ctl`: the nine9s command line, for people and scripts. Talks to an
//! agent's gRPC control plane; `keygen` and `sign` work without one. This
//! file owns the command line: its commands, the checks on every flag
//! value, and the exit codes.
//!
//! Exit codes:
//! - 0: success.
//! - 1: the operation failed: the agent refused or failed it (one line on
//!   stderr says why, ending with the agent's stable reason code, e.g.
//!   `[UNKNOWN_RELEASE]`, `[UNAUTHENTICATED]`, `[PERMISSION_DENIED]`);
//!   `--expect-active` not matching (the line names the active release);
//!   a client certificate the agent refused in the TLS handshake, or none
//!   given where it requires one (`[UNAUTHENTICATED]`: ctl reads the
//!   agent's TLS alert, which says which);
//!   `--wait --timeout` passing; `agent restart --wait` seeing the new
//!   worker fail (its exit status and last stderr lines follow); or a
//!   local step failing (a release that
//!   cannot be read, a malformed release.sig, `keygen` finding a key
//!   already there).
//! - 2: bad usage (an unknown flag, a value that is not a version, a URL or
//!   a duration in range, flags that do not go together, a `--token-file`,
//!   `--ca`, `--cert` or `--key` file that cannot be read, an https://
//!   agent without `--ca`, TLS files with an http:// or unix: agent, a
//!   token with an http:// agent).
//! - 3: the agent could not be reached (no local socket, connect errors, a
//!   socket served by another user, a failed TLS handshake, an http://
//!   URL whose server speaks TLS — the line says to use https:// and
//!   `--ca` —, or UNAVAILABLE without the agent's error details), after a
//!   few retries.
//! - 4: `--wait` saw the release fail its soak and the agent roll it back;
//!   `rollout` halted and rolled back.
//! - 5: `rollout` (or `rollout undo`): another rollout holds some of the
//!   agents (the line names it); nothing was done.
//! - 6: `rollout` converged on every agent but those it skipped within
//!   `--max-unavailable` (the line names them).
//!
//! With `--output json`, a failure (exit 1, 3, 4, 5 or 6) that printed nothing
//! else prints `{"error": {"kind", "message", "reason", "exit_code"}}` on
//! stdout besides its line on stderr; usage errors (exit 2) are text.
//!
//! Reaching the agent (global flags; each has an environment variable):
//! - `--agent ADDRESS` (`NINE9S_AGENT`, default
//!   `unix:nine9s-data/control.sock`): `unix:PATH`, the local control
//!   socket the agent makes in its data dir (relative paths from the
//!   working directory), or an `http://` or `https://` URL. On the socket
//!   the agent knows the caller by its uid (its own user or root: admin)
//!   and no token is sent; ctl first checks the socket is served by its
//!   own user or root. A missing socket exits 3, saying so.
//! - A token goes only to an `https://` agent: `authorization: Bearer
//!   TOKEN` on every call, the token being `--token TOKEN`
//!   (`NINE9S_TOKEN`) or the content of `--token-file FILE`
//!   (`NINE9S_TOKEN_FILE`; surrounding whitespace ignored); not both. A
//!   token with an `http://` agent is a usage error (exit 2): whatever
//!   listens on a port would get it. ctl never reads a token it was not
//!   given.
//! - An `https://` agent needs `--ca FILE` (`NINE9S_CA`), the PEM CA that
//!   signed its certificate (no system roots are used); the server name is
//!   the URL's host. `--cert FILE` and `--key FILE` (`NINE9S_CERT`,
//!   `NINE9S_KEY`), both or neither, present a client certificate. None of
//!   the three goes with an `http://` agent. (`ctl sign --key` is the
//!   signing key, a flag of its own.)
//!
//! Signing: `ctl keygen --out DIR` makes `DIR/nine9s.key` and
//! `DIR/nine9s.pub`; `ctl sign DIR --key KEYFILE` writes `DIR/release.sig`;
//! `ctl stage DIR` sends it along when it is there.
//!
//! Upgrading the agent itself: `ctl agent restart [--reason TEXT] [--wait
//! [--timeout DURATION]]` (admin) has the agent's supervisor, which holds
//! the sockets, start a new worker from the agent binary now on disk and
//! retire the serving one once it has finished its requests; connections
//! wait meanwhile, none is refused. The agent answers before the handover;
//! `--wait` then asks the agent (`AgentInfo`, every 50 ms, through the
//! connections the handover closes) until a new worker serves, and prints
//! the old and new worker and the binary's sha256 (exit 1 after
//! `--timeout`, default 60s, or as soon as the agent reports the new
//! worker failed: its exit status and last lines on stderr, and which
//! worker serves — the old one, or one from the binary that served). The request carries no request id, so it is
//! retried only when it could not be sent (no connection could be made);
//! one cut short is not retried: `ctl info` then shows whether the worker
//! changed. `ctl status` and `ctl info` show the agent's processes: the
//! supervisor, the worker, its uptime and binary, and how the previous
//! worker ended if it died.
//!
//! Every mutating command sends a request id (`--request-id`, or a random
//! one), and a retry after a transport failure sends the same id, so the
//! agent never acts twice on one invocation.

#![forbid(unsafe_code)]

#[macro_use]
mod out;
mod commands;
mod credentials;
mod follow;
mod handshake;
mod json;
mod local;
mod new;
mod render;
mod rollout;
mod rpc;

use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use credentials::AccessFlags;

/// Stage, upgrade, downgrade and roll back the releases of a nine9s agent;
/// restart the agent itself on a new binary.
#[derive(Parser)]
#[command(
    name = "ctl",
    version,
    after_help = "Examples:\n  ctl stage plugins/nine9s-0.2.0\n  ctl upgrade --to 0.2.0 --wait\n  ctl status\n  ctl rollback\n  ctl --agent https://edge-1:50051 --ca ca.pem --token-file deploy.token history --limit 5"
)]
struct Cli {
    /// The agent: `unix:PATH` (its local control socket, DATA/control.sock;
    /// no token), or its gRPC URL (https:// for a token; http:// without);
    /// `rollout` takes it once per agent.
    #[arg(
        long,
        global = true,
        env = "NINE9S_AGENT",
        default_value = DEFAULT_AGENT,
        value_name = "ADDRESS",
        value_parser = agent_url,
        action = ArgAction::Append
    )]
    agent: Vec<String>,
    /// The data dir of an agent on this machine: talk to it over its local
    /// socket, DATA/control.sock (the agent's own `--data-dir` and
    /// variable, so one `NINE9S_DATA_DIR` serves both). An `--agent` typed
    /// on the command line wins over the variable.
    #[arg(long, global = true, env = "NINE9S_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// `table` for people, `json` (one document on stdout; one per line for
    /// `watch`) for scripts.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(flatten)]
    access: AccessFlags,
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    #[command(flatten)]
    Agent(Command),
    /// Roll a release out to several agents: stage it everywhere, switch a
    /// canary, then the rest in waves; halt and roll back on the first
    /// failure. `rollout undo`, `rollout status` and `rollout history`
    /// act on the fleet's rollouts.
    ///
    /// The agents are `--agent URL` given once per agent (with the global
    /// credentials), or `--fleet FILE`: TOML `[[agent]]` tables with
    /// `address`, and optionally `name`, `token_file`, `ca`, `cert`, `key`
    /// (top-level keys of the same names apply to every agent; relative
    /// paths are relative to the file). The first agent that needs the
    /// release is the canary.
    ///
    /// The target may be newer or older than what an agent runs: it is
    /// upgraded or downgraded. A rollout holds every agent with a lease
    /// while it runs: a second rollout over any of them is refused (exit
    /// 5), and so are single-agent switches without --force. Every switch
    /// is conditional on the release the rollout found active, and every
    /// command carries a request id derived from the rollout id and its
    /// attempt, so running the same command again after an interruption
    /// resumes the attempt without acting twice, and running it again
    /// after it ended (halted, undone) is a new attempt. The rollout id is
    /// derived from the release, the version and the agents' canonical
    /// addresses.
    ///
    /// Exit codes: 0 converged; 4 halted and rolled back; 3 some agent
    /// could not be reached; 5 another rollout holds some agent (nothing
    /// done); 6 converged but for skipped agents (--max-unavailable); 1
    /// otherwise (a stage refused, a rollback that failed); 2 bad usage.
    #[command(
        after_help = "Examples:\n  ctl rollout --to 0.2.0 --release-dir plugins/nine9s-0.2.0 --fleet fleet.toml --max-parallel 5 --soak 30s\n  ctl rollout --to 0.2.0 --release-dir plugins/nine9s-0.2.0 --agent http://10.0.0.1:50051 --agent http://10.0.0.2:50051 --token-file deploy.token --dry-run\n  ctl --output json rollout --to 0.2.0 --release-dir rel --fleet fleet.toml   # a report for scripts"
    )]
    Rollout(RolloutArgs),
    #[command(flatten)]
    Local(Local),
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct RolloutArgs {
    #[command(subcommand)]
    action: Option<RolloutAction>,
    #[command(flatten)]
    start: StartRollout,
}

impl RolloutArgs {
    /// The fleet file, whichever action names it.
    fn fleet(&self) -> Option<&std::path::Path> {
        match &self.action {
            None => self.start.fleet.as_deref(),
            Some(
                RolloutAction::Undo(UndoArgs { fleet, .. })
                | RolloutAction::Status { fleet }
                | RolloutAction::History { fleet }
                | RolloutAction::Resume { fleet },
            ) => fleet.as_deref(),
        }
    }
}

#[derive(clap::Args)]
struct StartRollout {
    /// The version to roll out: newer or older than what the agents run
    /// (each is upgraded or downgraded, with its plan and state migration).
    #[arg(long, value_name = "VERSION", value_parser = version, required = true)]
    to: Option<semver::Version>,
    /// The release directory (release.toml, and release.sig if signed).
    #[arg(long, value_name = "DIR", required = true)]
    release_dir: Option<PathBuf>,
    /// The library to upload, instead of looking it up.
    #[arg(long, value_name = "PATH")]
    library: Option<PathBuf>,
    /// The agents, from a TOML file (instead of --agent).
    #[arg(long, value_name = "FILE")]
    fleet: Option<PathBuf>,
    /// Agents switched at once after the canary (and rolled back at once
    /// after a halt).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1000))]
    max_parallel: u16,
    /// Agents (a number, or a percentage of the fleet) that may be skipped
    /// when they cannot be reached or refuse the release, instead of
    /// stopping the rollout; exit 6 names them, and running the rollout
    /// again picks them up.
    #[arg(long, value_name = "N|P%", default_value = "0")]
    max_unavailable: rollout::Budget,
    /// Steps, comma-separated: how many agents (`1`) or what share of the
    /// fleet (`20%`) run the target once the step is done, and pauses
    /// between them (`pause 10m`, or `pause` until `ctl rollout resume`).
    /// `canary W%` (W as `ctl upgrade --canary` takes it) first serves the
    /// target to W of the requests beside the active release on the next
    /// step's agents, through the pause after it; then the canary is
    /// judged against the active release on each agent (as the analysis
    /// below) and promoted by that step, or dropped and the rollout halts.
    /// Only for releases that keep no state, as any canary. E.g. `canary
    /// 10%,pause 5m,1,20%,100%`. Default: one canary agent, then the rest
    /// in waves.
    #[arg(long, value_name = "STEPS")]
    steps: Option<rollout::Steps>,
    /// The analysis after each step (the canary is the first): on every
    /// agent the step switched, the new release's error rate may exceed
    /// the one of the release it replaced there by at most this many
    /// percentage points, else the rollout halts and rolls back. Judged
    /// once each has served 100 requests there.
    #[arg(long, value_name = "PCT", default_value = "1%", value_parser = share)]
    max_error_increase: f64,
    /// ... and its p99 latency be at most this many times the old one's
    /// (or within 10 ms of it).
    #[arg(long, value_name = "RATIO", default_value = "2", value_parser = ratio)]
    max_p99_ratio: f64,
    /// No analysis between steps: each agent's soak alone decides, and
    /// the canaries of `canary W%` steps are promoted unjudged.
    #[arg(long, conflicts_with_all = ["max_error_increase", "max_p99_ratio"])]
    no_analysis: bool,
    /// The soak of every switch (default: each agent's own).
    #[arg(long, value_name = "DURATION", value_parser = soak)]
    soak: Option<Duration>,
    /// How long one agent's verdict may take before the rollout halts.
    #[arg(long, value_name = "DURATION", value_parser = timeout, default_value = "10m")]
    timeout: Duration,
    /// Names this rollout: its request ids derive from it (at most 64
    /// printable ASCII characters, no spaces; default: derived from the
    /// release, the version and the agents).
    #[arg(long, value_name = "ID", value_parser = rollout_id)]
    rollout_id: Option<String>,
    /// Why: recorded in every agent's history (at most 1024 characters).
    #[arg(long, value_name = "TEXT", value_parser = reason)]
    reason: Option<String>,
    /// Read every agent's status and print the canary and the waves;
    /// change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Take over the agents another rollout holds (an abandoned one);
    /// recorded on each agent.
    #[arg(long)]
    force: bool,
    /// After a halt, leave the release staged on the agents that were
    /// never switched to it (by default it is removed: that needs the
    /// admin role, else it stays, and the summary says so).
    #[arg(long)]
    keep_staged: bool,
}

#[derive(Subcommand)]
enum RolloutAction {
    /// Return every agent a rollout switched to the release it had before
    /// (read from each agent's history), permanent at once, and remove
    /// the release where it was only staged.
    ///
    /// The rollout is the newest any agent recorded, or --rollout-id.
    /// Exit codes as for a rollout: 0 undone; 5 another rollout holds
    /// some agent; 3 some agent could not be reached; 1 a switch back
    /// failed.
    #[command(
        after_help = "Examples:\n  ctl rollout undo --fleet fleet.toml\n  ctl rollout undo --fleet fleet.toml --rollout-id 0.2.0-3f2a9c41d0e7"
    )]
    Undo(UndoArgs),
    /// Each agent's active release and soak, and every rollout holding
    /// some agent: its id, owner, step, agents done / pending / skipped,
    /// the soak left, and whether its ctl still renews it.
    #[command(
        after_help = "Examples:\n  ctl rollout status --fleet fleet.toml\n  ctl --output json rollout status --fleet fleet.toml"
    )]
    Status {
        /// The agents, from a TOML file (instead of --agent).
        #[arg(long, value_name = "FILE")]
        fleet: Option<PathBuf>,
    },
    /// Let a rollout paused by `--steps ...,pause,...` go on.
    #[command(after_help = "Examples:\n  ctl rollout resume --fleet fleet.toml")]
    Resume {
        /// The agents, from a TOML file (instead of --agent).
        #[arg(long, value_name = "FILE")]
        fleet: Option<PathBuf>,
    },
    /// Past rollouts of the fleet, newest first, from the records each
    /// agent keeps (its last 100).
    #[command(after_help = "Examples:\n  ctl rollout history --fleet fleet.toml")]
    History {
        /// The agents, from a TOML file (instead of --agent).
        #[arg(long, value_name = "FILE")]
        fleet: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct UndoArgs {
    /// The agents, from a TOML file (instead of --agent).
    #[arg(long, value_name = "FILE")]
    fleet: Option<PathBuf>,
    /// The rollout to undo (default: the newest any agent recorded).
    #[arg(long, value_name = "ID", value_parser = rollout_id)]
    rollout_id: Option<String>,
    /// Agents switched back at once.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1000))]
    max_parallel: u16,
    /// Why: recorded in every agent's history (at most 1024 characters).
    #[arg(long, value_name = "TEXT", value_parser = reason)]
    reason: Option<String>,
    /// Take over the agents another rollout holds.
    #[arg(long)]
    force: bool,
    /// Leave the release staged where the rollout never switched to it.
    #[arg(long)]
    keep_staged: bool,
}

/// The commands that need no agent.
#[derive(Subcommand)]
enum Local {
    /// Create a release signing key (needs no agent).
    ///
    /// Writes DIR/nine9s.key (secret, owner-only; never overwritten) and
    /// DIR/nine9s.pub (for the agent's --trusted-keys directory).
    #[command(after_help = "Examples:\n  ctl keygen --out ~/.nine9s")]
    Keygen {
        /// Where to write the keys (created if needed).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Sign a release directory (needs no agent).
    ///
    /// Writes DIR/release.sig over release.toml and the library's sha256;
    /// `stage` sends it along.
    #[command(
        after_help = "Examples:\n  ctl sign plugins/nine9s-0.2.0 --key ~/.nine9s/nine9s.key && ctl stage plugins/nine9s-0.2.0"
    )]
    Sign {
        /// Directory holding release.toml.
        dir: PathBuf,
        /// The secret key file from `ctl keygen` (here --key is the signing
        /// key, not the TLS client key).
        #[arg(long, value_name = "KEYFILE")]
        key: PathBuf,
        /// The library to sign, instead of looking it up as `stage` does.
        #[arg(long)]
        library: Option<PathBuf>,
    },
    /// Start a release of your own (needs no agent).
    ///
    /// Writes DIR/Cargo.toml (a cdylib on the nine9s SDK), DIR/src/lib.rs (a
    /// service that counts its hellos and carries the count across
    /// upgrades as state) and DIR/release.toml; the directory's name names
    /// the crate and the release. DIR must not exist.
    #[command(
        after_help = "Examples:\n  ctl new myservice && cargo build --release --manifest-path myservice/Cargo.toml\n  agent --bootstrap myservice --data-dir myservice-data"
    )]
    New {
        /// The crate's directory; its last component is the name.
        #[arg(value_parser = new::crate_name)]
        dir: PathBuf,
        /// The SDK crate to depend on (plugins/sdk of a nine9s checkout);
        /// by default the one ctl was built with.
        #[arg(long, value_name = "PATH")]
        sdk: Option<PathBuf>,
    },
    /// Print a shell completion script (needs no agent).
    ///
    /// For example: `ctl completions bash > /etc/bash_completion.d/ctl`.
    #[command(
        after_help = "Examples:\n  ctl completions bash > /etc/bash_completion.d/ctl\n  ctl completions zsh > \"${fpath[1]}/_ctl\""
    )]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// The commands that talk to the agent.
#[derive(Subcommand)]
enum Command {
    /// Upload a release directory (release.toml + its library).
    #[command(
        after_help = "Examples:\n  ctl stage plugins/nine9s-0.2.0\n  ctl stage my-release --library target/release/libmy_service.so --reason 'fix #42'"
    )]
    Stage {
        /// Directory holding release.toml (and release.sig, if signed).
        dir: PathBuf,
        /// The library to upload, instead of looking it up.
        #[arg(long)]
        library: Option<PathBuf>,
        #[command(flatten)]
        request: Request,
    },
    /// List the releases the agent knows.
    #[command(
        after_help = "Examples:\n  ctl releases\n  ctl --output json releases | jq -r '.[] | select(.state == \"old\") | .version'"
    )]
    Releases,
    /// Switch to a higher version.
    #[command(
        after_help = "Examples:\n  ctl upgrade --to 0.2.0 --dry-run\n  ctl upgrade --to 0.2.0 --wait --timeout 5m\n  ctl upgrade --to 0.2.0 --expect-active 0.1.0 --request-id deploy-42 --soak 30s\n  ctl upgrade --to 0.2.0 --canary 10%\n  ctl upgrade --to 0.2.0 --canary-header x-canary=1"
    )]
    Upgrade(Switch),
    /// Switch to a lower version.
    #[command(
        after_help = "Examples:\n  ctl downgrade --to 0.1.0 --permanent\n  ctl downgrade --to 0.2.0 --dry-run"
    )]
    Downgrade(Switch),
    /// Return to the previous permanent release (it is permanent at once).
    #[command(
        after_help = "Examples:\n  ctl rollback\n  ctl rollback --state snapshot --reason 'bad counts'\n  ctl rollback --expect-active 0.3.0 --dry-run"
    )]
    Rollback {
        /// Migrate the running state down, or restore the snapshot taken
        /// when the release was left.
        #[arg(long, value_enum, default_value_t = StateFrom::Migrate)]
        state: StateFrom,
        /// Print the plan and run the checks; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        request: Checked,
        /// Accepted for symmetry with upgrade: the target is permanent at once.
        #[arg(long, conflicts_with = "dry_run")]
        wait: bool,
        /// Only drop the canary of VERSION: refused, with nothing rolled
        /// back, if it is not the canary any more (the health gate or
        /// someone else dropped it first).
        #[arg(long, value_name = "VERSION")]
        expect_canary: Option<semver::Version>,
    },
    /// Finish the canary's switch: upgrade (or downgrade) to the canary's
    /// release, which then soaks as any switch does.
    #[command(after_help = "Examples:\n  ctl promote\n  ctl promote --wait")]
    Promote {
        /// Wait until the release is permanent after its soak (as
        /// `upgrade --wait`).
        #[arg(long)]
        wait: bool,
        /// Promote even though a fleet rollout holds the agent.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        request: Request,
    },
    /// Make the current release permanent now.
    #[command(
        after_help = "Examples:\n  ctl make-permanent 0.2.0\n  ctl make-permanent 0.2.0 --expect-active 0.2.0"
    )]
    MakePermanent {
        #[arg(value_parser = version)]
        version: semver::Version,
        #[command(flatten)]
        request: Checked,
    },
    /// Forget a release that is neither permanent nor current.
    #[command(after_help = "Examples:\n  ctl remove 0.1.0")]
    Remove {
        #[arg(value_parser = version)]
        version: semver::Version,
        #[command(flatten)]
        request: Checked,
    },
    /// The active release, the soak, the lifecycle states and the loaded
    /// libraries.
    #[command(after_help = "Examples:\n  ctl status\n  ctl --output json status | jq -r .active")]
    Status,
    /// The transitions, oldest first.
    #[command(
        after_help = "Examples:\n  ctl history --limit 10\n  ctl --output json history --after 120 --limit 50"
    )]
    History {
        /// Only the last N (with --after: the next N, 100 if 0).
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// Page on: the transitions after this id (JSON: `more` says
        /// whether there are others after the page).
        #[arg(long, value_name = "ID")]
        after: Option<u64>,
    },
    /// Print every lifecycle event as it happens, until Ctrl-C.
    #[command(
        after_help = "Examples:\n  ctl watch\n  ctl --output json watch --after 0   # every event the agent keeps, one per line"
    )]
    Watch {
        /// Start after this event id (0: every event the agent still keeps).
        /// Without it: only what happens from now on.
        #[arg(long, value_name = "ID")]
        after: Option<u64>,
    },
    /// What the agent is: its version, service, defaults and processes.
    #[command(
        after_help = "Examples:\n  ctl info\n  ctl --agent https://edge-1:50051 --ca ca.pem --token-file ops.token info"
    )]
    Info,
    /// The agent itself: its processes.
    #[command(after_help = "Examples:\n  ctl agent restart --wait --reason 'agent 0.2 binary'")]
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
}

/// `ctl agent ...`.
#[derive(Subcommand)]
enum AgentCommand {
    /// Upgrade the agent itself (admin): a new worker from the agent binary
    /// now on disk takes over from the serving one.
    ///
    /// The supervisor keeps the sockets: connections wait while the workers
    /// hand over, none is refused. The agent answers before the handover;
    /// --wait follows it.
    #[command(
        after_help = "Examples:\n  ctl agent restart\n  ctl agent restart --wait --timeout 2m --reason 'new agent binary'"
    )]
    Restart(Restart),
}

#[derive(clap::Args)]
struct Restart {
    /// Why: recorded by the agent (at most 1024 characters).
    #[arg(long, value_name = "TEXT", value_parser = reason)]
    reason: Option<String>,
    /// Wait until a new worker serves (exit 0), asking the agent every
    /// 50 ms; exit 1 if the new worker fails (its exit status and last
    /// stderr lines are printed; the agent goes on serving). With
    /// `--output json` one document is printed when the wait ends.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this long (exit 1).
    #[arg(
        long,
        value_name = "DURATION",
        value_parser = timeout,
        default_value = "60s",
        requires = "wait"
    )]
    timeout: Duration,
}

/// What every mutating command may say about itself.
#[derive(clap::Args, Clone)]
struct Request {
    /// Why: recorded in the history (at most 1024 characters).
    #[arg(long, value_name = "TEXT", value_parser = reason)]
    reason: Option<String>,
    /// Makes the command idempotent: a retry with the same id returns the
    /// first outcome (at most 128 printable ASCII characters; default: a
    /// random id per invocation).
    #[arg(long, value_name = "ID", value_parser = request_id)]
    request_id: Option<String>,
}

/// A mutating command that can also be made conditional.
#[derive(clap::Args, Clone)]
struct Checked {
    #[command(flatten)]
    request: Request,
    /// Refuse (exit 1, changing nothing) unless this version is active.
    #[arg(long, value_name = "VERSION", value_parser = version)]
    expect_active: Option<semver::Version>,
    /// Run it even though a fleet rollout holds the agent (`ctl rollout
    /// status` shows which); recorded in the agent's history.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct Switch {
    /// The version to switch to.
    #[arg(long, value_name = "VERSION", value_parser = version)]
    to: semver::Version,
    /// Soak period before the release becomes permanent (default: the
    /// agent's; at most 7 days).
    #[arg(long, value_name = "DURATION", value_parser = soak, conflicts_with_all = ["permanent", "no_permanent"])]
    soak: Option<Duration>,
    /// Make the release permanent at once.
    #[arg(long, conflicts_with = "no_permanent")]
    permanent: bool,
    /// Leave the release current: a restart returns to the permanent one.
    #[arg(long)]
    no_permanent: bool,
    /// Print the plan and run every check that needs no traffic; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Wait until the release is permanent after its soak (exit 0) or rolled
    /// back by the health gate (exit 4). With `--output json` the reply is
    /// printed at once; the exit code tells how the wait ended.
    #[arg(long, conflicts_with_all = ["no_permanent", "dry_run"])]
    wait: bool,
    /// Give up waiting after this long (exit 1).
    #[arg(long, value_name = "DURATION", value_parser = timeout, requires = "wait")]
    timeout: Option<Duration>,
    /// Instead of switching, serve this share of requests with the release
    /// (`10%`, `0.5%`) beside the active one, until `ctl promote` finishes
    /// the switch or `ctl rollback` drops it. Only for releases that keep
    /// no state.
    #[arg(
        long,
        value_name = "PERCENT",
        value_parser = rollout::canary_weight,
        conflicts_with_all = ["canary_header", "soak", "permanent", "no_permanent", "dry_run", "wait"]
    )]
    canary: Option<u16>,
    /// As --canary, for the requests with this header (NAME, or NAME=VALUE
    /// for that value only).
    #[arg(
        long,
        value_name = "NAME[=VALUE]",
        value_parser = canary_header,
        conflicts_with_all = ["soak", "permanent", "no_permanent", "dry_run", "wait"]
    )]
    canary_header: Option<(String, String)>,
    /// Where the target's state comes from: the running state migrated, or
    /// the target's own last snapshot (a release the agent fell back past
    /// at boot, with its last checkpoint).
    #[arg(long, value_enum, conflicts_with_all = ["canary", "canary_header"])]
    state: Option<StateFrom>,
    /// Set by `ctl promote`: the switch is refused unless this is the
    /// canary still.
    #[arg(skip)]
    expected_canary: Option<semver::Version>,
    #[command(flatten)]
    request: Checked,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum StateFrom {
    Migrate,
    Snapshot,
}

/// The agent `ctl` talks to when none is named: the local socket of the
/// agent whose data dir is the default one under the working directory.
const DEFAULT_AGENT: &str = "unix:nine9s-data/control.sock";

/// The longest soak the agent accepts, and the longest `--timeout`.
const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

fn version(text: &str) -> Result<semver::Version, String> {
    semver::Version::parse(text).map_err(|e| format!("not a version (e.g. 0.2.0): {e}"))
}

fn agent_url(text: &str) -> Result<String, String> {
    if text.starts_with("unix:") {
        return match local::socket_path(text) {
            Some(_) => Ok(text.to_owned()),
            None => Err("unix: needs the socket's path, e.g. unix:nine9s-data/control.sock".into()),
        };
    }
    let uri: tonic::transport::Uri = text
        .parse()
        .map_err(|e| format!("not a URL (e.g. http://127.0.0.1:50051): {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(text.to_owned()),
        _ => Err("not unix:PATH, nor an http:// or https:// URL with a host".into()),
    }
}

/// A share in percent (`1%`, `0.5%`), 0% to 100%, as a fraction.
fn share(text: &str) -> Result<f64, String> {
    let number = text
        .strip_suffix('%')
        .ok_or_else(|| format!("{text:?} is not a percentage (e.g. 1%)"))?;
    match number.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p / 100.0),
        _ => Err(format!("{text:?}: a percentage is 0% to 100%")),
    }
}

/// A ratio of 1 to 1000 (`2`, `1.5`).
fn ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if (1.0..=1000.0).contains(&r) => Ok(r),
        _ => Err(format!("{text:?}: a ratio is a number from 1 to 1000")),
    }
}

/// A duration above zero and at most 7 days.
fn bounded_duration(text: &str) -> Result<Duration, String> {
    // Any number above 7 days in milliseconds (the smallest unit) is too
    // long in every unit; refusing it first keeps the parse from overflowing.
    let number: String = text
        .trim()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let too_long = || format!("{text:?} is longer than 7 days");
    if number
        .parse::<f64>()
        .is_ok_and(|n| n > WEEK.as_millis() as f64)
    {
        return Err(too_long());
    }
    let duration = nine9s_manifest::parse_duration(text)?;
    if duration.is_zero() {
        Err(format!("{text:?} is not above zero"))
    } else if duration > WEEK {
        Err(too_long())
    } else {
        Ok(duration)
    }
}

fn soak(text: &str) -> Result<Duration, String> {
    bounded_duration(text)
}

fn timeout(text: &str) -> Result<Duration, String> {
    bounded_duration(text)
}

fn reason(text: &str) -> Result<String, String> {
    match text.chars().count() {
        0..=1024 => Ok(text.to_owned()),
        n => Err(format!("{n} characters; at most 1024")),
    }
}

/// `NAME` or `NAME=VALUE`.
fn canary_header(text: &str) -> Result<(String, String), String> {
    let (name, value) = text.split_once('=').unwrap_or((text, ""));
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(format!("{name:?} is not a header name"));
    }
    if !value
        .chars()
        .all(|c| c == ' ' || c == '\t' || c.is_ascii_graphic())
    {
        return Err("the value must be visible ASCII".into());
    }
    Ok((name.to_ascii_lowercase(), value.to_owned()))
}

fn rollout_id(text: &str) -> Result<String, String> {
    if text.is_empty() || text.len() > rollout::MAX_ROLLOUT_ID {
        Err(format!(
            "must be 1 to {} characters",
            rollout::MAX_ROLLOUT_ID
        ))
    } else if !text.bytes().all(|b| b.is_ascii_graphic()) {
        Err("must be printable ASCII without spaces".into())
    } else {
        Ok(text.to_owned())
    }
}

fn request_id(text: &str) -> Result<String, String> {
    if text.is_empty() || text.len() > 128 {
        Err("must be 1 to 128 characters".into())
    } else if !text.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        Err("must be printable ASCII".into())
    } else {
        Ok(text.to_owned())
    }
}

/// Credentials or TLS files that do not go together, agents that cannot
/// be listed: the same exit (2) and format as the usage errors clap finds
/// itself.
pub fn usage_error(usage: String) -> ! {
    Cli::command()
        .error(clap::error::ErrorKind::ValueValidation, usage)
        .exit()
}

/// The agents of `ctl rollout`: the fleet file's, or one per `--agent`,
/// each with its credentials read and checked. `Err` is a usage error.
fn fleet(
    agents: &[String],
    agent_typed: bool,
    fleet: Option<&std::path::Path>,
    access: &AccessFlags,
) -> Result<Vec<rollout::Node>, String> {
    let members = match fleet {
        Some(_) if agent_typed => {
            return Err(
                "--fleet and --agent do not go together: list the agents in one place".into(),
            )
        }
        Some(path) => rollout::fleet::read(path)?,
        None => {
            let mut seen = std::collections::HashSet::new();
            agents
                .iter()
                .map(|address| {
                    if !seen.insert(address) {
                        return Err(format!("--agent {address} is given twice"));
                    }
                    Ok(rollout::fleet::Member {
                        name: address.clone(),
                        address: address.clone(),
                        files: rollout::fleet::Files::default(),
                    })
                })
                .collect::<Result<_, _>>()?
        }
    };
    members
        .into_iter()
        .map(|member| {
            let connection = access
                .with_files(&member.files)
                .connect(&member.address)
                .map_err(|e| format!("{}: {e}", member.name))?;
            Ok(rollout::Node {
                name: member.name,
                address: member.address,
                agent: rpc::Agent::new(connection),
            })
        })
        .collect()
}

/// Why `ctl` failed, which decides the exit code.
#[derive(Debug)]
pub enum Failure {
    /// The agent refused or failed the operation; `reason` is its stable
    /// code (ErrorInfo.reason), when it sent one.
    Failed {
        error: anyhow::Error,
        reason: Option<String>,
    },
    /// The agent could not be reached.
    Unreachable(anyhow::Error),
    /// `--wait`: the release failed its soak and was rolled back.
    RolledBack(anyhow::Error),
    /// Another rollout holds some agent: nothing was done.
    Leased(anyhow::Error),
    /// A rollout converged on every agent but those it skipped.
    Skipped(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Failed {
            error: e.into(),
            reason: None,
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let matches = Cli::command().get_matches();
    // Only a URL typed on the command line conflicts with --fleet; one
    // from the environment gives way to it.
    let agent_typed = matches.value_source("agent") == Some(ValueSource::CommandLine);
    let data_dir_typed = matches.value_source("data_dir") == Some(ValueSource::CommandLine);
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some(dir) = &cli.data_dir {
        match (agent_typed, data_dir_typed) {
            (true, true) => usage_error(
                "--data-dir and --agent both name the agent: give one (--data-dir DIR is --agent unix:DIR/control.sock)".into(),
            ),
            // An --agent typed here names another agent than the one of
            // the NINE9S_DATA_DIR in the environment.
            (true, false) => {}
            (false, _) => {
                if data_dir_typed && matches!(cli.command, Top::Rollout(ref args) if args.fleet().is_some()) {
                    usage_error("--data-dir and --fleet do not go together: a rollout's agents are in the fleet file".into());
                }
                cli.agent = vec![format!("unix:{}", local::path(dir).display())];
            }
        }
    }
    let output = cli.output;
    let result = match cli.command {
        Top::Local(Local::Keygen { out }) => commands::keygen(&out, cli.output),
        Top::Local(Local::Sign { dir, key, library }) => {
            commands::sign(&dir, &key, library, cli.output)
        }
        Top::Local(Local::New { dir, sdk }) => new::run(&dir, sdk.as_deref(), cli.output),
        Top::Local(Local::Completions { shell }) => {
            clap_complete::generate(shell, &mut Cli::command(), "ctl", &mut std::io::stdout());
            Ok(())
        }
        Top::Rollout(args) => {
            let nodes = fleet(&cli.agent, agent_typed, args.fleet(), &cli.access)
                .unwrap_or_else(|usage| usage_error(usage));
            // Recorded with the rollout on every agent, for people.
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            match args.action {
                None => {
                    let start = args.start;
                    let (Some(to), Some(release_dir)) = (start.to, start.release_dir) else {
                        usage_error("ctl rollout needs --to and --release-dir".into())
                    };
                    let settings = rollout::Settings {
                        to,
                        release_dir,
                        library: start.library,
                        max_parallel: usize::from(start.max_parallel),
                        max_unavailable: start.max_unavailable,
                        steps: start.steps.map(|s| s.0).unwrap_or_default(),
                        gate: (!start.no_analysis).then_some(rollout::Gate {
                            max_error_increase: start.max_error_increase,
                            max_p99_ratio: start.max_p99_ratio,
                        }),
                        soak: start.soak,
                        timeout: start.timeout,
                        rollout_id: start.rollout_id,
                        reason: start.reason,
                        dry_run: start.dry_run,
                        force: start.force,
                        keep_staged: start.keep_staged,
                        command,
                    };
                    rollout::run(nodes, settings, cli.output).await
                }
                Some(RolloutAction::Undo(undo)) => {
                    let settings = rollout::undo::Settings {
                        rollout_id: undo.rollout_id,
                        max_parallel: usize::from(undo.max_parallel),
                        reason: undo.reason,
                        force: undo.force,
                        keep_staged: undo.keep_staged,
                        command,
                    };
                    rollout::undo::run(nodes, settings, cli.output).await
                }
                Some(RolloutAction::Status { .. }) => {
                    rollout::status::status_of(nodes, cli.output).await
                }
                Some(RolloutAction::Resume { .. }) => rollout::resume(nodes, cli.output).await,
                Some(RolloutAction::History { .. }) => {
                    rollout::status::history(nodes, cli.output).await
                }
            }
        }
        Top::Agent(command) => {
            let [url] = cli.agent.as_slice() else {
                usage_error(format!(
                    "--agent is given {} times; only `ctl rollout` drives several agents",
                    cli.agent.len()
                ))
            };
            match cli.access.connect(url) {
                // Nothing to retry: no agent has its socket there.
                Ok(_)
                    if local::socket_path(url)
                        .is_some_and(|path| matches!(path.try_exists(), Ok(false))) =>
                {
                    let path = local::socket_path(url).expect("a socket");
                    Err(Failure::Unreachable(anyhow::anyhow!(
                        "{}",
                        local::not_running(&path)
                    )))
                }
                Ok(connection) => {
                    let agent = rpc::Agent::new(connection);
                    commands::run(&agent, cli.output, command).await
                }
                Err(usage) => usage_error(usage),
            }
        }
    };
    let code = match result {
        Ok(()) => 0,
        Err(failure) => {
            let (code, kind, error, reason) = match failure {
                Failure::Failed { error, reason } => (1, "failed", error, reason),
                Failure::Unreachable(error) => (3, "unreachable", error, None),
                Failure::RolledBack(error) => (4, "rolled_back", error, None),
                Failure::Leased(error) => (5, "leased", error, None),
                Failure::Skipped(error) => (6, "skipped", error, None),
            };
            match &reason {
                Some(reason) => eprintln!("ctl: error: {error:#} [{reason}]"),
                None => eprintln!("ctl: error: {error:#}"),
            }
            // A script asking for JSON gets one document either way.
            if output == Output::Json && !out::printed() {
                json::print(&json::error(
                    kind,
                    &format!("{error:#}"),
                    reason.as_deref(),
                    code,
                ));
            }
            code
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_bounded_and_never_panic() {
        assert_eq!(soak("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(soak("7h"), Ok(Duration::from_secs(7 * 3600)));
        assert!(soak("0s").is_err());
        assert!(soak("169h").is_err());
        assert!(soak("99999999999999999999h").is_err());
        assert!(soak("1e400").is_err());
        assert!(soak("").is_err());
        assert!(timeout("604800000ms").is_ok());
        assert!(timeout("604800001ms").is_err());
    }

    #[test]
    fn shares_and_ratios_are_bounded() {
        assert_eq!(share("1%"), Ok(0.01));
        assert_eq!(share("0%"), Ok(0.0));
        for bad in ["1", "-1%", "101%", "NaN%", "inf%", "%"] {
            assert!(share(bad).is_err(), "{bad}");
        }
        assert_eq!(ratio("1.5"), Ok(1.5));
        for bad in ["0.5", "NaN", "inf", "1001", "x"] {
            assert!(ratio(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flag_values() {
        assert!(version("0.2.0").is_ok());
        assert!(version("nine").is_err());
        assert!(agent_url("http://127.0.0.1:50051").is_ok());
        assert!(agent_url("https://agent.example").is_ok());
        assert!(agent_url("127.0.0.1:50051").is_err());
        assert!(agent_url("unix:nine9s-data/control.sock").is_ok());
        assert!(agent_url("unix:").is_err());
        assert!(agent_url("ftp://x").is_err());
        assert!(agent_url("not a url").is_err());
        assert!(request_id("deploy-42").is_ok());
        assert_eq!(rollout::canary_weight("10%"), Ok(100));
        assert_eq!(rollout::canary_weight("0.5%"), Ok(5));
        assert_eq!(rollout::canary_weight("100"), Ok(1000));
        assert!(rollout::canary_weight("0%").is_err());
        assert!(rollout::canary_weight("0.05%").is_err());
        assert!(rollout::canary_weight("101%").is_err());
        assert!(rollout::canary_weight("ten").is_err());
        assert_eq!(
            canary_header("X-Canary=1"),
            Ok(("x-canary".into(), "1".into()))
        );
        assert_eq!(
            canary_header("x-beta"),
            Ok(("x-beta".into(), String::new()))
        );
        assert!(canary_header("bad name=1").is_err());
        assert!(canary_header("=1").is_err());
        assert!(request_id("").is_err());
        assert!(request_id("é").is_err());
        assert!(request_id(&"x".repeat(129)).is_err());
        assert!(reason(&"é".repeat(1024)).is_ok());
        assert!(reason(&"x".repeat(1025)).is_err());
    }

    /// The example command lines of `--help`, each cut at its first shell
    /// operator or comment, as words (single quotes group words).
    fn examples(command: &clap::Command) -> Vec<Vec<String>> {
        let mut found = Vec::new();
        let help = command
            .get_after_help()
            .map(ToString::to_string)
            .unwrap_or_default();
        for line in help.lines().filter_map(|l| l.trim().strip_prefix("ctl ")) {
            let mut words = vec!["ctl".to_owned()];
            for (i, part) in line.split('\'').enumerate() {
                if i % 2 == 1 {
                    words.push(part.to_owned());
                    continue;
                }
                let mut ended = false;
                for word in part.split_whitespace() {
                    if ["|", ">", "&&", "#"].contains(&word) {
                        ended = true;
                        break;
                    }
                    words.push(word.to_owned());
                }
                if ended {
                    break;
                }
            }
            found.push(words);
        }
        for sub in command.get_subcommands() {
            found.extend(examples(sub));
        }
        found
    }

    #[test]
    fn every_command_has_examples_that_parse() {
        fn check(command: &clap::Command, path: &str) {
            for sub in command.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_subcommands().next().is_none() {
                    let help = sub
                        .get_after_help()
                        .map(ToString::to_string)
                        .unwrap_or_default();
                    assert!(help.starts_with("Examples:"), "{name} has no examples");
                }
                check(sub, &name);
            }
        }
        let cli = Cli::command();
        check(&cli, "ctl");
        let all = examples(&cli);
        assert!(all.len() > 20);
        for words in all {
            if let Err(e) = Cli::try_parse_from(&words) {
                panic!("{words:?} does not parse: {e}");
            }
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sign_has_its_own_key_flag() {
        let cli = Cli::try_parse_from(["ctl", "sign", "rel", "--key", "s.key"]).unwrap();
        assert!(matches!(
            cli.command,
            Top::Local(Local::Sign { key, .. }) if key == std::path::Path::new("s.key")
        ));
        assert!(Cli::try_parse_from(["ctl", "sign", "rel"]).is_err());
        assert!(Cli::try_parse_from(["ctl", "keygen", "--out", "k"]).is_ok());
        // --key elsewhere is the TLS client key.
        let cli = Cli::try_parse_from(["ctl", "status", "--key", "k.pem"]).unwrap();
        assert!(cli.access.connect("https://agent:1").is_err());
        assert!(Cli::try_parse_from(["ctl", "status", "--cert", "c", "--key", "k"]).is_ok());
        assert!(Cli::try_parse_from(["ctl", "--cert", "c", "--key", "k", "status"]).is_ok());
        assert!(
            Cli::try_parse_from(["ctl", "status", "--token", "t", "--token-file", "f"]).is_err()
        );
    }

    #[test]
    fn wait_refuses_what_never_ends() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|_| ());
        assert!(parse(&["ctl", "upgrade", "--to", "0.2.0", "--wait"]).is_ok());
        assert!(parse(&[
            "ctl",
            "upgrade",
            "--to",
            "0.2.0",
            "--wait",
            "--no-permanent"
        ])
        .is_err());
        assert!(parse(&["ctl", "upgrade", "--to", "0.2.0", "--wait", "--dry-run"]).is_err());
        assert!(parse(&["ctl", "upgrade", "--to", "0.2.0", "--timeout", "5s"]).is_err());
        assert!(parse(&[
            "ctl",
            "upgrade",
            "--to",
            "0.2.0",
            "--soak",
            "99999999999999999999h"
        ])
        .is_err());
        assert!(parse(&["ctl", "--agent", "localhost", "status"]).is_err());
    }

    #[test]
    fn agent_restart_flags() {
        let restart = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["ctl", "agent", "restart"], args].concat())?;
            match cli.command {
                Top::Agent(Command::Agent {
                    command: AgentCommand::Restart(restart),
                }) => Ok::<_, clap::Error>(restart),
                _ => panic!("not agent restart"),
            }
        };
        let plain = restart(&[]).unwrap();
        assert!(!plain.wait && plain.reason.is_none());
        assert_eq!(plain.timeout, Duration::from_secs(60));
        let waiting = restart(&["--wait", "--timeout", "90s", "--reason", "new build"]).unwrap();
        assert!(waiting.wait);
        assert_eq!(waiting.timeout, Duration::from_secs(90));
        assert_eq!(waiting.reason.as_deref(), Some("new build"));
        assert!(restart(&["--timeout", "5s"]).is_err());
        assert!(restart(&["--wait", "--timeout", "0s"]).is_err());
        assert!(restart(&["--wait", "--timeout", "169h"]).is_err());
        assert!(restart(&["--reason", &"x".repeat(1025)]).is_err());
        // The global --agent flag still goes anywhere.
        let cli = Cli::try_parse_from(["ctl", "agent", "restart", "--agent", "http://h:1"]);
        assert_eq!(cli.unwrap().agent, ["http://h:1"]);
        assert!(Cli::try_parse_from(["ctl", "agent"]).is_err());
    }
}
