//! The soak watcher: looks at the soaking release every tick — its health
//! check, and its share of failed requests — and sends the verdict to the
//! actor, which decides (roll back, make permanent, go on).
//!
//! The health check is plugin code: it runs here, outside the actor, on a
//! plugin-call lane of its own ([`super::calls`]) with a time limit
//! (`--health-timeout`). A check that does not answer in time is a failed
//! check, and a hung one cannot hold up `ctl rollback`, which the actor
//! keeps taking meanwhile, nor the checks of another instance — of the
//! same version too: what is being checked is marked by instance. An instance with a call stuck past the
//! request timeout is unhealthy without asking it. While an automatic
//! rollback is pending, the watcher keeps ticking the actor so it retries.

use std::future::Future;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use nine9s_manifest::Version;

use super::calls::Lane;
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
    // A health check still running, and on which instance (`Loaded::id`):
    // the next check of that instance waits for it; a hung check of an
    // instance left since — rolled back, even if its version is soaking
    // again on a new one — holds up nothing.
    let checking: Checking = Arc::default();
    // The canary's, apart: a hung check of a canary must not hold up the
    // soak of its release once promoted.
    let checking_canary: Checking = Arc::default();
    // Each on a lane of its own, for the same reason.
    let lane = Lane::new("nine9s-health");
    let canary_lane = Lane::new("nine9s-canary-health");
    loop {
        tokio::select! {
            () = &mut stopped => return,
            _ = tick.tick() => {}
        }
        let verdict = match engine.shared.view().soak {
            Soak::Soaking { version, until_ms } => {
                look(&engine, version, until_ms, &checking, &lane).await
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
        if let Some(failure) = look_at_canary(&engine, &checking_canary, &canary_lane).await {
            if engine.send(Job::CanaryFailed(failure)).is_err() {
                return;
            }
        }
    }
}

/// The instance (`Loaded::id`) whose health check is running, if any.
type Checking = Arc<Mutex<Option<u64>>>;

/// Marks `id` as being checked; `false` if it already is.
fn start_check(checking: &Checking, id: u64) -> bool {
    let mut checking = checking.lock();
    if *checking == Some(id) {
        return false;
    }
    *checking = Some(id);
    true
}

/// One look at the soaking release, unless its instance's last check is
/// still running.
async fn look(
    engine: &Engine,
    version: Version,
    until_ms: i64,
    checking: &Checking,
    lane: &Lane,
) -> Option<Verdict> {
    let active = engine.runtime().active();
    if active.version != version || !start_check(checking, active.id()) {
        return None;
    }
    let config = engine.config();
    let counters = active.counters();
    let done = Arc::clone(checking);
    let instance = Arc::clone(&active);
    drop(active);
    let health = judge(config, instance, counters, done, lane).await;
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
    checking: &Checking,
    lane: &Lane,
) -> Option<CanaryFailure> {
    let canary = engine.runtime().canary()?;
    let id = canary.loaded.id();
    if !start_check(checking, id) {
        return None;
    }
    let config = engine.config();
    let counters = canary.loaded.counters();
    let instance = Arc::clone(&canary.loaded);
    drop(canary);
    let health = judge(config, instance, counters, Arc::clone(checking), lane).await;
    health.err().map(|reason| CanaryFailure {
        instance: id,
        reason,
    })
}

/// Calls `instance`'s health check on `lane` with the time
/// limit, then its share of failed requests: `Err(why)` if unhealthy. A
/// call stuck past the request timeout is enough: the check is not asked.
/// `checking` names the instance while its check runs.
async fn judge(
    config: &crate::config::Config,
    instance: Arc<crate::runtime::Loaded>,
    counters: crate::runtime::Counters,
    checking: Checking,
    lane: &Lane,
) -> Result<(), String> {
    let id = instance.id();
    let unmark = move || {
        let mut checking = checking.lock();
        if *checking == Some(id) {
            *checking = None;
        }
    };
    if counters.stuck > 0 {
        unmark();
        return Err(format!(
            "{} of its calls ran past the request timeout ({} ms) and have not returned",
            counters.stuck,
            config
                .limits
                .request_timeout
                .map_or(0, |limit| limit.as_millis())
        ));
    }
    let check = lane.call_async(config.health_timeout, move || {
        let result = instance.instance.health();
        unmark();
        result
    });
    let health = match check.await {
        Ok(Some(Ok(()))) => Ok(()),
        Ok(Some(Err(e))) => Err(format!("health check failed: {e}")),
        Ok(None) => Err(format!(
            "health check did not answer within {} ms",
            config.health_timeout.as_millis()
        )),
        Err(e) => Err(format!("health check crashed: {e}")),
    };
    health.and_then(|()| {
        if counters.served < MIN_REQUESTS_FOR_RATE {
            return Ok(());
        }
        let rate = counters.errors as f64 / counters.served as f64;
        if rate > config.max_error_rate {
            let timed_out = match counters.timed_out {
                0 => String::new(),
                n => format!(", {n} past the request timeout"),
            };
            Err(format!(
                "{} of {} requests failed ({} panics{timed_out}): {:.1}% is over the {:.1}% threshold",
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
