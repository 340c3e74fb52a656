//! Starting up: installing the bootstrap release on an empty data
//! directory, or coming back on the permanent release with its last
//! snapshot. If the permanent release cannot be started (its library or
//! its state no longer loads, or a store from before the invariants has
//! none), the agent falls back to the release that was permanent most
//! recently and starts — and says so loudly, in the log, the history and
//! the events. It never reinstalls the bootstrap over an existing store.
//!
//! A release that was current when the previous agent died (no clean
//! stop recorded) is marked failed: a crash-looping release must not look
//! healthy. After a clean stop it is only demoted to old. A worker that
//! died by a fault signal of its own (SIGSEGV, SIGABRT, ...) while an
//! upgrade or downgrade was under way fails the release it was switching
//! to (the transition itself is recorded as aborted).
//!
//! A self-upgrade's new worker may already serve the permanent release
//! with the state handed over ([`Preloaded`]): boot adopts that instance
//! instead of loading the release again, and refuses to start if the
//! store says to serve anything else.

use std::collections::BTreeMap;
use std::sync::Arc;

use nine9s_manifest::{Manifest, Version};

use super::catalog::{inspect, open, register, Signed};
use super::handoff::restore_carry;
use super::journal::{Changes, Journal, Origin};
use super::machine::{self, Entry, Lifecycle};
use crate::artifacts::{Artifacts, Upload};
use crate::config::{Bootstrap, Config};
use crate::error::{Error, Result};
use crate::handover::Preloaded;
use crate::model::{now_ms, Event, EventKind, Release, Transition, TransitionKind, BUILT_IN};
use crate::runtime::{Loaded, Runtime};
use crate::store::Store;

/// The sample release compiled into the agent (see build.rs).
const EMBEDDED_MANIFEST: &str = include_str!("../../../plugins/nine9s-0.1.0/release.toml");
const EMBEDDED_LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libnine9s_0_1_0.so"));

/// The sha256 of the sample release compiled into the agent.
pub(crate) fn embedded_sha256() -> &'static str {
    static SHA256: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA256.get_or_init(|| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(EMBEDDED_LIBRARY))
    })
}

/// What a boot produced.
pub(super) struct Booted {
    pub config: Config,
    pub journal: Journal,
    pub artifacts: Artifacts,
    pub lifecycle: Lifecycle,
    pub runtime: Arc<Runtime>,
    pub service: String,
}

pub(super) fn boot(config: Config, preloaded: Option<Preloaded>) -> Result<Booted> {
    std::fs::create_dir_all(&config.data_dir).map_err(Error::io(format!(
        "cannot create {}",
        config.data_dir.display()
    )))?;
    let store = Arc::new(Store::open_waiting(
        &config.data_dir.join("db"),
        config.keep_history,
        config.store_wait,
    )?);
    let artifacts = Artifacts::open(config.data_dir.join("artifacts"))
        .map_err(Error::io("cannot open the artifact store"))?;
    let clean = store.mark_running()?;
    let journal = Journal::new(Arc::clone(&store));
    let aborted = store.abort_running()?;
    for t in &aborted {
        tracing::warn!(id = t.id, kind = %t.kind, from = ?t.from, to = ?t.to, "transition interrupted by the previous stop, recorded as aborted");
        journal.transitions().aborted(t);
    }
    let releases = store.releases()?;
    let (lifecycle, runtime, service, message) = if releases.is_empty() {
        if preloaded.is_some() {
            return Err(not_preloaded("an empty store"));
        }
        let (lifecycle, loaded, service) = install(&journal, &artifacts, &config.bootstrap)?;
        (lifecycle, Arc::new(Runtime::new(loaded)), service, None)
    } else {
        let (lifecycle, runtime, service, message) = resume(
            &journal,
            &artifacts,
            &releases,
            Resume {
                unclean: !clean,
                previous_exit: config.previous_exit.as_deref(),
                preloaded,
            },
        )?;
        let lifecycle = match config.previous_exit.as_deref() {
            Some(how) if release_caused(Some(how)) => {
                fail_switch_targets(&journal, lifecycle, &aborted, how)?
            }
            _ => lifecycle,
        };
        (lifecycle, runtime, service, message)
    };
    let serving = runtime.active().version.clone();
    close_canary(&journal, &serving, config.previous_exit.as_deref())?;
    let mut started = Event::new(EventKind::AgentStarted).version(&serving);
    started.message = message;
    journal.emit(started);
    store.flush()?;
    Ok(Booted {
        config,
        journal,
        artifacts,
        lifecycle,
        runtime,
        service,
    })
}

/// A canary is not a lifecycle state: a restart forgets it. One that was
/// serving when the last process ended gets its end in the history, as
/// `ctl rollback` would have recorded it.
fn close_canary(journal: &Journal, serving: &Version, previous_exit: Option<&str>) -> Result<()> {
    let store = &journal.store;
    let Some(canary) = store.canary()? else {
        return Ok(());
    };
    let how = previous_exit
        .map(|how| format!(" (its worker {how})"))
        .unwrap_or_default();
    let origin = Origin::automatic(format!(
        "the canary of {canary} ended: the agent restarted{how}"
    ));
    journal
        .begin(
            TransitionKind::Rollback,
            Some(&canary),
            Some(serving),
            &origin,
        )?
        .succeed(&Changes::default())?;
    store.set_canary(None)?;
    tracing::warn!(%canary, "the canary serving when the agent stopped is gone: a restart forgets canaries");
    Ok(())
}

/// A self-upgrade's new worker serves the state handed over, but the store
/// says to serve something else: it stops, and the supervisor starts a
/// worker from the binary that served, which starts from the store.
fn not_preloaded(what: &str) -> Error {
    Error::refused(
        crate::error::Reason::Internal,
        format!("the state handed over is not that of the release {what} says to serve; this worker stops"),
    )
}

/// First start on an empty data directory: installs the bootstrap release
/// as permanent.
fn install(
    journal: &Journal,
    artifacts: &Artifacts,
    bootstrap: &Bootstrap,
) -> Result<(Lifecycle, Loaded, String)> {
    let (manifest_toml, bytes, signed) = match bootstrap {
        // Part of the agent binary: trusted as the agent is.
        Bootstrap::Embedded => (
            EMBEDDED_MANIFEST.to_owned(),
            EMBEDDED_LIBRARY.to_vec(),
            Signed {
                by: Some(BUILT_IN.to_owned()),
                signature: String::new(),
            },
        ),
        Bootstrap::Dir(dir) => {
            let manifest = Manifest::read_dir(dir)?;
            let library =
                nine9s_manifest::locate_library(dir, &manifest).map_err(Error::InvalidArtifact)?;
            let text = std::fs::read_to_string(dir.join("release.toml"))
                .map_err(Error::io(format!("cannot read {}", dir.display())))?;
            let bytes = std::fs::read(&library)
                .map_err(Error::io(format!("cannot read {}", library.display())))?;
            (text, bytes, Signed::default())
        }
    };
    let manifest = Manifest::parse(&manifest_toml)?;
    // The bootstrap release goes through the same checks as an upload:
    // written as one, probed out of process, then adopted.
    let mut upload = Upload::create(artifacts.dir(), None)
        .map_err(Error::io("cannot write the bootstrap release"))?;
    upload
        .write(&bytes)
        .map_err(Error::io("cannot write the bootstrap release"))?;
    let upload = upload
        .finish()
        .map_err(Error::io("cannot write the bootstrap release"))?;
    let report = inspect(&manifest, &upload)?;
    let guard = journal.begin(
        TransitionKind::Install,
        None,
        Some(&manifest.version),
        &Origin::default(),
    )?;
    let installed = register(
        artifacts,
        &manifest,
        &manifest_toml,
        upload,
        report.state_version,
        signed,
    )
    .and_then(|release| {
        let instance = open(artifacts, &release)?
            .instantiate(None)
            .map_err(|e| Error::Plugin {
                version: release.version.clone(),
                during: "init",
                source: e,
            })?;
        Ok((release, instance))
    });
    let (release, instance) = match installed {
        Ok(installed) => installed,
        Err(e) => return Err(guard.fail(e, &Changes::default())),
    };
    let empty = Lifecycle::new(BTreeMap::new(), release.version.clone());
    let (lifecycle, _) = empty.apply(machine::Event::Installed {
        version: release.version.clone(),
        at_ms: now_ms(),
    })?;
    let record = settled(&lifecycle, release);
    guard.succeed(&Changes {
        records: vec![record.clone()],
        moved: vec![record.clone()],
        removed: Vec::new(),
    })?;
    tracing::info!(name = %record.name, version = %record.version, "installed the bootstrap release as permanent");
    Ok((
        lifecycle,
        Loaded::new(record.version.clone(), record.blocking, instance),
        record.name,
    ))
}

/// How the previous worker ended, and what this one already serves.
struct Resume<'a> {
    /// No clean stop recorded.
    unclean: bool,
    previous_exit: Option<&'a str>,
    preloaded: Option<Preloaded>,
}

/// A restart: comes back on the permanent release with its last snapshot,
/// or on the most recent release that was permanent and starts.
fn resume(
    journal: &Journal,
    artifacts: &Artifacts,
    releases: &[Release],
    resume: Resume<'_>,
) -> Result<(Lifecycle, Arc<Runtime>, String, Option<String>)> {
    let Resume {
        unclean,
        previous_exit,
        mut preloaded,
    } = resume;
    let store = &journal.store;
    let entries: BTreeMap<Version, Entry> = releases
        .iter()
        .map(|r| {
            (
                r.version.clone(),
                Entry {
                    state: r.state,
                    permanent_since_ms: r.permanent_since_ms,
                    failure: r.failure.clone(),
                },
            )
        })
        .collect();
    let stored = Lifecycle::new(entries, releases[0].version.clone());
    let mut unloadable = Vec::new();
    let mut serving = None;
    for candidate in stored.boot_candidates() {
        let release = releases
            .iter()
            .find(|r| r.version == candidate)
            .expect("a candidate is a stored release");
        // A release whose start killed the agent (not an error: a crash)
        // twice in a row is passed over, as one that does not load.
        let crashed = store.boot_attempt(&candidate, release_caused(previous_exit))?;
        if crashed >= CRASHED_STARTS {
            let why = format!(
                "starting it killed the agent {crashed} times in a row{}",
                previous_exit
                    .map(|how| format!(" (the last worker {how})"))
                    .unwrap_or_default()
            );
            tracing::error!(version = %candidate, "{why}; falling back to the one permanent before it");
            store.boot_started(&candidate)?;
            unloadable.push((candidate, why));
            continue;
        }
        if let Some(preloaded) = preloaded.take() {
            if preloaded.runtime.active().version != candidate || preloaded.sha256 != release.sha256
            {
                return Err(not_preloaded("the store"));
            }
            store.boot_started(&candidate)?;
            serving = Some((release, preloaded.runtime));
            break;
        }
        match start(store, artifacts, release) {
            Ok(loaded) => {
                store.boot_started(&candidate)?;
                serving = Some((release, Arc::new(Runtime::new(loaded))));
                break;
            }
            // Its library or its code failed: fall back to the one before.
            Err(e) if e.blames() == Some(&candidate) => {
                store.boot_started(&candidate)?;
                tracing::error!(version = %candidate, error = %e, "cannot start this release; falling back to the one permanent before it");
                unloadable.push((candidate, e.to_string()));
            }
            // Anything else (the store, a snapshot it cannot read) is not
            // the release's fault: refuse to start rather than fail it.
            Err(e) => return Err(e),
        }
    }
    let Some((release, runtime)) = serving else {
        return Err(Error::refused(
            crate::error::Reason::Internal,
            format!(
                "no release that was ever permanent can be started ({}); the store is kept as it is — stage a working release with another agent's data dir, or move {} aside to start over",
                if unloadable.is_empty() {
                    "none was ever permanent".to_owned()
                } else {
                    unloadable
                        .iter()
                        .map(|(v, e)| format!("{v}: {e}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                },
                store.path().display()
            ),
        ));
    };
    let fell_back = (!unloadable.is_empty()).then(|| {
        let passed_over = unloadable
            .iter()
            .map(|(v, e)| {
                // Its state is not lost: say how to bring it back.
                let kept = match store.last_snapshot(v) {
                    Ok(Some(s)) => format!(
                        " (its last checkpoint, taken at {} ms, is kept: once it loads again — stage it again if its artifact was damaged — `ctl upgrade --to {v} --state snapshot` brings it back with that state)",
                        s.taken_at_ms
                    ),
                    _ => String::new(),
                };
                format!("{v} could not be started: {e}{kept}")
            })
            .collect::<Vec<_>>()
            .join("; ");
        format!("FELL BACK to {}: {passed_over}", release.version)
    });
    let abandoned = stored.current().cloned();
    let (lifecycle, _) = stored.apply(machine::Event::Booted {
        serving: release.version.clone(),
        unclean,
        cause: previous_exit.map(str::to_owned),
        unloadable: unloadable.clone(),
        at_ms: now_ms(),
    })?;
    let changes = changes(&lifecycle, releases);
    if !changes.records.is_empty() {
        let mut notes = Vec::new();
        if let Some(current) = &abandoned {
            notes.push(if unclean {
                let how = previous_exit
                    .map(|how| format!(" (its worker {how})"))
                    .unwrap_or_default();
                format!("the agent died while {current} was current{how}; it is marked failed")
            } else {
                format!("the agent stopped while {current} was current but not permanent")
            });
        }
        notes.extend(fell_back.clone());
        let origin = Origin::automatic(notes.join("; "));
        let guard = journal.begin(
            TransitionKind::Restart,
            abandoned.as_ref().or(unloadable.first().map(|(v, _)| v)),
            Some(&release.version),
            &origin,
        )?;
        guard.succeed(&changes)?;
    }
    match &fell_back {
        Some(message) => tracing::error!(version = %release.version, "{message}"),
        None => tracing::info!(version = %release.version, "resumed the permanent release"),
    }
    Ok((lifecycle, runtime, release.name.clone(), fell_back))
}

/// A worker that died by a fault signal of its own (`how`) in the middle
/// of an upgrade or downgrade died of the release it was switching to —
/// its init, its state migration, its hooks — though that release behaved
/// in the disposable rehearsal: the release is failed, with why, so it no
/// longer looks staged and ready to try. The permanent release and the
/// one serving now are never failed for it (the machine's rule). Recorded
/// in a restart transition of its own, against the store as `resume` left
/// it.
fn fail_switch_targets(
    journal: &Journal,
    mut lifecycle: Lifecycle,
    aborted: &[Transition],
    how: &str,
) -> Result<Lifecycle> {
    let mut failed = Vec::new();
    for t in aborted {
        let (TransitionKind::Upgrade | TransitionKind::Downgrade, Some(to)) = (t.kind, &t.to)
        else {
            continue;
        };
        if lifecycle.entry(to).is_none() {
            continue;
        }
        let fault = format!("the worker {how} while switching to {to}");
        (lifecycle, _) = lifecycle.apply(machine::Event::SwitchFailed {
            to: to.clone(),
            fault: Some(fault.clone()),
        })?;
        if lifecycle.entry(to).and_then(|e| e.failure.as_ref()) == Some(&fault) {
            failed.push((to.clone(), fault));
        }
    }
    let Some((first, _)) = failed.first() else {
        return Ok(lifecycle);
    };
    let changes = changes(&lifecycle, &journal.store.releases()?);
    // Failed for the same cause already (a retry with a new request id).
    if changes.records.is_empty() {
        return Ok(lifecycle);
    }
    let notes = failed
        .iter()
        .map(|(version, fault)| format!("{fault}; {version} is marked failed"))
        .collect::<Vec<_>>()
        .join("; ");
    tracing::error!("{notes}");
    journal
        .begin(
            TransitionKind::Restart,
            Some(first),
            Some(lifecycle.active()),
            &Origin::automatic(notes),
        )?
        .succeed(&changes)?;
    Ok(lifecycle)
}

/// Boot attempts of one release that may end in a crash before it is
/// passed over.
const CRASHED_STARTS: u32 = 2;

/// Fatal signals a process raises by its own doing: an illegal
/// instruction, a trap, an abort, a bus error, an arithmetic fault, a
/// segfault, a bad system call.
const FAULT_SIGNALS: [i32; 7] = [4, 5, 6, 7, 8, 11, 31];

/// Whether the last worker ended by its own code's doing (`previous_exit`,
/// as `supervisor::describe` puts it: "was killed by SIGSEGV"). A SIGKILL or
/// SIGTERM comes from outside — systemd's stop timeout, the OOM killer, an
/// operator — and neither does an unknown end (the whole agent was
/// stopped) count against the release that was starting.
fn release_caused(previous_exit: Option<&str>) -> bool {
    previous_exit.is_some_and(|how| {
        FAULT_SIGNALS.iter().any(|&signal| {
            how.strip_prefix("was killed by ") == Some(crate::probe::signal_name(signal).as_str())
        })
    })
}

/// Starts a release's instance with its last snapshot.
fn start(store: &Store, artifacts: &Artifacts, release: &Release) -> Result<Loaded> {
    let library = open(artifacts, release)?;
    let snapshot = store.last_snapshot(&release.version)?;
    let state = match &snapshot {
        // A release that keeps no state starts fresh, whatever was saved.
        Some(_) if library.state_version() == 0 => None,
        None => None,
        Some(s) => restore_carry(&library, s)?
            .apply(&s.bytes)
            .map_err(|e| Error::Plugin {
                version: release.version.clone(),
                during: "state migration",
                source: e,
            })?,
    };
    let instance = library
        .instantiate(state.as_deref())
        .map_err(|e| Error::Plugin {
            version: release.version.clone(),
            during: "init",
            source: e,
        })?;
    tracing::info!(version = %release.version, restored = snapshot.is_some(), "started");
    Ok(Loaded::new(
        release.version.clone(),
        release.blocking,
        instance,
    ))
}

/// A release record as the lifecycle has it.
fn settled(lifecycle: &Lifecycle, mut release: Release) -> Release {
    if let Some(entry) = lifecycle.entry(&release.version) {
        release.state = entry.state;
        release.permanent_since_ms = entry.permanent_since_ms;
        release.failure = entry.failure.clone();
    }
    release
}

/// The records that differ from what the store holds.
fn changes(lifecycle: &Lifecycle, stored: &[Release]) -> Changes {
    let mut changes = Changes::default();
    for release in stored {
        let now = settled(lifecycle, release.clone());
        if now != *release {
            if now.state != release.state {
                changes.moved.push(now.clone());
            }
            changes.records.push(now);
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::release_caused;

    #[test]
    fn only_a_fatal_signal_of_its_own_counts_against_a_starting_release() {
        for own in [
            "SIGSEGV",
            "SIGABRT",
            "SIGBUS",
            "SIGILL",
            "SIGFPE",
            "signal 31",
        ] {
            assert!(
                release_caused(Some(&format!("was killed by {own}"))),
                "{own}"
            );
        }
        for outside in [
            Some("was killed by SIGKILL"),
            Some("was killed by signal 15"),
            Some("exited with code 1"),
            None,
        ] {
            assert!(!release_caused(outside), "{outside:?}");
        }
    }
}
