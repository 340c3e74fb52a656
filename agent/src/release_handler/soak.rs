//! The soak watcher: looks at the soaking release every tick — its health
//! check, and its share of failed requests — and sends the verdict to the
//! actor, which decides (roll back, make permanent, go on).
//!
//! The health check is plugin code: it runs here, outside the actor, on a
//! blocking thread with a time limit (`--health-timeout`). A check that
//! does not answer in time is a failed check, and a hung one cannot hold
//! up `ctl rollback`, which the actor keeps taking meanwhile. While an
//! automatic rollback is pending, the watcher keeps ticking the actor so
//! it retries.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nine9s_manifest::Version;

use super::{Engine, Job, Soak};

/// How often the soaking release is looked at.
const TICK: Duration = Duration::from_millis(100);

/// Fewest requests a soaking release must have served before its error
/// rate counts.
const MIN_REQUESTS_FOR_RATE: u64 = 10;

/// One look at the soaking release.
#[derive(Debug)]
pub struct Verdict {
    pub version: Version,
    /// The end of the soak looked at: a verdict on an earlier soak of the
    /// same version (queued while it was switched away and back) is stale.
    pub until_ms: i64,
    /// `Err(why)` when it is unhealthy.
    pub health: Result<(), String>,
}

/// The canary is unhealthy.
#[derive(Debug)]
pub struct CanaryFailure {
    /// The instance judged (`Loaded::id`): a canary started since, of the
    /// same version or not, is not the one that failed.
    pub instance: u64,
    pub reason: String,
}

/// Watches soaks (and the canary) until `stopped` resolves.
pub async fn watch(engine: Engine, stopped: impl Future<Output = ()>) {
    tokio::pin!(stopped);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A health check still running, and on which release: the next check
    // of that release waits for it; a hung check of a release rolled back
    // since does not hold up the soak of the next one.
    let checking: Arc<Mutex<Option<Version>>> = Arc::default();
    // The canary's, apart: a hung check of a canary must not hold up the
    // soak of its release once promoted.
    let checking_canary: Arc<Mutex<Option<Version>>> = Arc::default();
    loop {
        tokio::select! {
            () = &mut stopped => return,
            _ = tick.tick() => {}
        }
        let verdict = match engine.shared.view().soak {
            Soak::Soaking { version, until_ms } => {
                if checking.lock().unwrap_or_else(|e| e.into_inner()).as_ref() == Some(&version) {
                    continue;
                }
                look(&engine, version, until_ms, &checking).await
            }
            // The actor retries the rollback when its back-off allows.
            Soak::RollingBack { version, .. } => Some(Verdict {
                version,
                until_ms: 0,
                health: Ok(()),
            }),
            Soak::Idle | Soak::Held { .. } => None,
        };
        if let Some(verdict) = verdict {
            if engine.send(Job::Soak(verdict)).is_err() {
                return;
            }
        }
        if let Some(failure) = look_at_canary(&engine, &checking_canary).await {
            if engine.send(Job::CanaryFailed(failure)).is_err() {
                return;
            }
        }
    }
}

async fn look(
    engine: &Engine,
    version: Version,
    until_ms: i64,
    checking: &Arc<Mutex<Option<Version>>>,
) -> Option<Verdict> {
    let active = engine.runtime().active();
    if active.version != version {
        return None;
    }
    let config = engine.config();
    let counters = active.counters();
    *checking.lock().unwrap_or_else(|e| e.into_inner()) = Some(version.clone());
    let done = Arc::clone(checking);
    let instance = Arc::clone(&active);
    drop(active);
    let health = judge(config, instance, counters, done).await;
    Some(Verdict {
        version,
        until_ms,
        health,
    })
}

/// One look at the canary, if there is one and it is not being checked
/// already: `Some` if it is unhealthy.
async fn look_at_canary(
    engine: &Engine,
    checking: &Arc<Mutex<Option<Version>>>,
) -> Option<CanaryFailure> {
    let canary = engine.runtime().canary()?;
    let version = canary.loaded.version.clone();
    let id = canary.loaded.id();
    {
        let mut checking = checking.lock().unwrap_or_else(|e| e.into_inner());
        if checking.as_ref() == Some(&version) {
            return None;
        }
        *checking = Some(version.clone());
    }
    let config = engine.config();
    let counters = canary.loaded.counters();
    let instance = Arc::clone(&canary.loaded);
    drop(canary);
    let health = judge(config, instance, counters, Arc::clone(checking)).await;
    health.err().map(|reason| CanaryFailure {
        instance: id,
        reason,
    })
}

/// Calls `instance`'s health check on a blocking thread with the time
/// limit, then its share of failed requests: `Err(why)` if unhealthy.
/// `checking` names the release while its check runs.
async fn judge(
    config: &crate::config::Config,
    instance: Arc<crate::runtime::Loaded>,
    counters: crate::runtime::Counters,
    checking: Arc<Mutex<Option<Version>>>,
) -> Result<(), String> {
    let check = tokio::task::spawn_blocking(move || {
        let result = instance.instance.health();
        let mut checking = checking.lock().unwrap_or_else(|e| e.into_inner());
        if checking.as_ref() == Some(&instance.version) {
            *checking = None;
        }
        result
    });
    let health = match tokio::time::timeout(config.health_timeout, check).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(format!("health check failed: {e}")),
        Ok(Err(e)) => Err(format!("health check crashed: {e}")),
        Err(_) => Err(format!(
            "health check did not answer within {} ms",
            config.health_timeout.as_millis()
        )),
    };
    health.and_then(|()| {
        if counters.served < MIN_REQUESTS_FOR_RATE {
            return Ok(());
        }
        let rate = counters.errors as f64 / counters.served as f64;
        if rate > config.max_error_rate {
            Err(format!(
                "{} of {} requests failed ({} panics): {:.1}% is over the {:.1}% threshold",
                counters.errors,
                counters.served,
                counters.panics,
                rate * 100.0,
                config.max_error_rate * 100.0
            ))
        } else {
            Ok(())
        }
    })
}
