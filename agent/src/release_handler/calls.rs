//! Every call the engine makes into a release's code — rehearsals, hooks
//! after a switch, checkpoint snapshots, starting a canary, health checks,
//! an instance's `stop` and its library's unload — runs here: on a
//! [`Lane`], a thread kept from one call to the next (a thread per call
//! would come and go thousands of times), with a deadline. Plugin code is
//! foreign: nothing can cancel it. So a call past its deadline keeps its
//! thread, the lane starts a new one for the next call, and the caller
//! decides what the overrun means ([`Called::Expired`]).
//!
//! If the *serving* instance is the one that does not return (its snapshot
//! hangs behind the closed gate), it is watched a while longer
//! ([`watch_wedged`]); if it never returns, the worker exits and the
//! supervisor starts a new one on the permanent release with its last
//! checkpoint, as after a crash.
//!
//! A service's instance (ABI v3) taken out of service — the old one after
//! a switch, or a canary let go of — is retired off the actor
//! ([`PluginCalls::retire`]): its requests under way may stream for as long
//! as `--drain-timeout`, and `ctl rollback` must not wait for them.
//!
//! Requests are not called here: the data plane calls `handle` itself
//! (`runtime`), and `stuck` answers a request past its time limit. What
//! such calls leave behind — threads held by calls abandoned past the
//! request timeout — is counted here ([`PluginCalls::abandoned`]) until
//! the actor can have the worker replaced to reclaim them.

use std::sync::{mpsc, Arc};
use std::time::Duration;

use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use tokio::sync::oneshot;

use crate::error::{Error, Reason, Result};
use crate::runtime::Loaded;

/// Longest a rehearsal (migration, init, hooks and health check on the
/// trial instance) may take before the switch is refused.
pub const REHEARSAL_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest an instance's `stop`, `destroy` and its library's unload may
/// take before the engine stops waiting for them.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the serving instance may stay inside a call abandoned behind
/// the gate before it counts as wedged and the worker is replaced.
const WEDGED_AFTER: Duration = Duration::from_secs(10);

/// The worker's exit code when it leaves because its serving instance is
/// wedged (EX_SOFTWARE): the supervisor starts another.
const EXIT_WEDGED: i32 = 70;

/// A call into a release, as its deadline found it.
pub(super) enum Called<T> {
    Done(T),
    /// Still running on an abandoned thread; its result, if it ever ends,
    /// comes here.
    Expired(mpsc::Receiver<T>),
}

/// One call, as a lane's thread runs it.
type Job = Box<dyn FnOnce() + Send>;

/// A thread plugin calls run on one after the other; replaced when a call
/// overruns its deadline.
pub(super) struct Lane {
    name: &'static str,
    worker: Mutex<Option<mpsc::Sender<Job>>>,
}

impl Lane {
    pub(super) fn new(name: &'static str) -> Lane {
        Lane {
            name,
            worker: Mutex::new(None),
        }
    }

    /// Runs `job` on the lane's thread, after the calls before it; starts
    /// the thread if there is none.
    fn run(&self, job: Job) -> Result<()> {
        let mut worker = self.worker.lock();
        if worker.is_none() {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name(self.name.into())
                .spawn(move || {
                    // Ends when the lane lets go of the sender.
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                })
                .map_err(Error::io("cannot start a thread for plugin calls"))?;
            *worker = Some(tx);
        }
        let sent = worker.as_ref().map(|tx| tx.send(job));
        if !matches!(sent, Some(Ok(()))) {
            *worker = None;
            return Err(Error::refused(
                Reason::Internal,
                "the thread for plugin calls is gone; the next call starts a new one",
            ));
        }
        Ok(())
    }

    /// Leaves the current thread to the call it is in: the next call gets
    /// a new one.
    fn abandon(&self) {
        self.worker.lock().take();
    }

    /// Runs `call` on the lane and waits at most `limit` for it, blocking
    /// this thread (the actor's). Past it, the thread is abandoned to the
    /// call, and the call's result, if it ever ends, comes on the receiver
    /// returned.
    pub(super) fn call<T: Send + 'static>(
        &self,
        limit: Duration,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Called<T>> {
        let (tx, rx) = mpsc::channel();
        self.run(Box::new(move || {
            let _ = tx.send(call());
        }))?;
        match rx.recv_timeout(limit) {
            Ok(done) => Ok(Called::Done(done)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.abandon();
                Ok(Called::Expired(rx))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.abandon();
                Err(ended_mid_call())
            }
        }
    }

    /// [`Lane::call`] for a task: awaits the call instead of blocking.
    /// `None` if it did not return within `limit` (its thread abandoned).
    pub(super) async fn call_async<T: Send + 'static>(
        &self,
        limit: Duration,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Option<T>> {
        let (tx, rx) = oneshot::channel();
        self.run(Box::new(move || {
            let _ = tx.send(call());
        }))?;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(done)) => Ok(Some(done)),
            Ok(Err(_)) => {
                self.abandon();
                Err(ended_mid_call())
            }
            Err(_) => {
                self.abandon();
                Ok(None)
            }
        }
    }
}

fn ended_mid_call() -> Error {
    Error::refused(
        Reason::Internal,
        "the thread for plugin calls ended in the middle of a call",
    )
}

/// The actor's calls into releases, and the threads request calls left
/// behind.
pub(super) struct PluginCalls {
    lane: Lane,
    /// Where retired services are stopped and unloaded.
    retiring: Arc<Lane>,
    /// Calls stuck past the request timeout in instances the engine has
    /// let go of: their threads stay held until a new worker takes over.
    abandoned: u64,
}

impl PluginCalls {
    pub(super) fn new() -> PluginCalls {
        PluginCalls {
            lane: Lane::new("nine9s-plugin-calls"),
            retiring: Arc::new(Lane::new("nine9s-retire")),
            abandoned: 0,
        }
    }

    /// Runs `call` within `limit` (see [`Lane::call`]).
    pub(super) fn call<T: Send + 'static>(
        &self,
        limit: Duration,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Called<T>> {
        self.lane.call(limit, call)
    }

    /// Lets go of an instance: if this was the last reference, its `stop`,
    /// `destroy` and its library's unload run on the lane, within
    /// [`STOP_TIMEOUT`] (past it, they are left to that thread, and the
    /// library stays loaded).
    pub(super) fn unload(&self, loaded: Option<Arc<Loaded>>) {
        let Some(loaded) = loaded else { return };
        let version = loaded.version.clone();
        match self.call(STOP_TIMEOUT, move || drop(loaded)) {
            Ok(Called::Done(())) => {}
            Ok(Called::Expired(_)) => {
                tracing::error!(%version, "the release's stop (or destroy) did not return within {} s: it is left running, and its library loaded", STOP_TIMEOUT.as_secs())
            }
            Err(e) => tracing::error!(%version, error = %e, "cannot let go of the old instance"),
        }
    }

    /// Retires a service's old instance (after a switch, or a canary's)
    /// in the background, on `tokio`: its
    /// requests under way finish, up to `finish` (`--drain-timeout`,
    /// whether the plan has a `drain` step or not), and those left then
    /// are cancelled; then, once others
    /// let go of it (up to `grace`), its `stop` and unload run on the
    /// retiring lane within [`STOP_TIMEOUT`].
    ///
    /// `left`: the sha256 of its state as the switch took it. Requests it
    /// still served after that may have changed its state, and those
    /// changes did not cross: its state is taken again before it stops,
    /// and a difference is reported, never lost without a word.
    pub(super) fn retire(
        &self,
        tokio: &tokio::runtime::Handle,
        old: Arc<Loaded>,
        left: Option<[u8; 32]>,
        finish: Duration,
        grace: Duration,
    ) {
        let lane = Arc::clone(&self.retiring);
        tokio.spawn(async move {
            let waiting = Arc::clone(&old);
            // A wait on the port's own signal: no release code runs here.
            let finished = tokio::task::spawn_blocking(move || waiting.instance.wait_calls(finish))
                .await
                .unwrap_or(false);
            if !finished {
                let cancelled = old.cancel_at_drain_end();
                tracing::warn!(
                    version = %old.version,
                    cancelled,
                    drain_timeout_ms = finish.as_millis() as u64,
                    "requests still under way on the old release when its drain ended were cancelled"
                );
            }
            if let Some(left) = left {
                let checked = Arc::clone(&old);
                let after = lane.call_async(STOP_TIMEOUT, move || checked.take_snapshot()).await;
                match after {
                    Ok(Some(Ok(state))) if <[u8; 32]>::from(Sha256::digest(&state)) != left => {
                        tracing::error!(
                            version = %old.version,
                            "requests the old release served after the switch took its state changed that state: those changes were not carried to the release that serves now (a service should refuse writes once it has handed its state over)"
                        );
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => tracing::warn!(version = %old.version, error = %e, "cannot check whether the old release's state changed after the switch"),
                    Ok(None) | Err(_) => tracing::warn!(version = %old.version, "the old release's snapshot did not return: whether its state changed after the switch is unknown"),
                }
            }
            crate::runtime::drain(&old, grace).await;
            let version = old.version.clone();
            match lane.call_async(STOP_TIMEOUT, move || drop(old)).await {
                Ok(Some(())) => tracing::debug!(%version, "old release retired"),
                Ok(None) => tracing::error!(%version, "the release's stop (or destroy) did not return within {} s: it is left running, and its library loaded", STOP_TIMEOUT.as_secs()),
                Err(e) => tracing::error!(%version, error = %e, "cannot let go of the old instance"),
            }
        });
    }

    /// Counts `stuck` request calls abandoned in an instance the engine
    /// let go of.
    pub(super) fn abandoned(&mut self, stuck: u64) {
        self.abandoned += stuck;
    }

    /// The abandoned calls counted so far, to reclaim now.
    pub(super) fn take_abandoned(&mut self) -> u64 {
        std::mem::take(&mut self.abandoned)
    }

    pub(super) fn any_abandoned(&self) -> bool {
        self.abandoned > 0
    }
}

/// The serving instance did not return from a call abandoned behind the
/// gate. If it does not within [`WEDGED_AFTER`] either, it is wedged: the
/// worker exits, and the supervisor starts another on the permanent
/// release with its last checkpoint, as after a crash.
pub(super) fn watch_wedged<T: Send + 'static>(serving: &Loaded, late: mpsc::Receiver<T>) {
    let version = serving.version.clone();
    let watched = std::thread::Builder::new()
        .name("nine9s-wedged".into())
        .spawn(move || {
            if late.recv_timeout(WEDGED_AFTER).is_err() {
                tracing::error!(%version, "the serving instance has not returned from a call for {} s: it is wedged; this worker exits, and the supervisor starts another on the permanent release with its last checkpoint", WEDGED_AFTER.as_secs());
                std::process::exit(EXIT_WEDGED);
            }
        });
    if let Err(e) = watched {
        tracing::error!(error = %e, "cannot watch the abandoned call");
    }
}
