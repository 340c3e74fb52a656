//! The bench's gRPC side: switching releases with `Upgrade` and
//! `Downgrade` (timed as the client sees them), the upgrade/downgrade
//! cycle run under load, removing a release, and reading the transitions
//! back from `History`.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nine9s_proto::{
    HistoryRequest, Permanence, RemoveRequest, Transition, TransitionRequest, TransitionResult,
};

use crate::procs::{AgentProcess, Client};

/// No switch should take this long; past it the agent is stuck.
const RPC_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub enum Direction {
    Upgrade,
    Downgrade,
}

pub struct Control {
    client: Client,
}

/// What the cycle under load did.
#[derive(Debug, Default)]
pub struct Cycling {
    pub done: u32,
    /// Wall time of every Upgrade and Downgrade call.
    pub rpc_us: Vec<u64>,
    /// Why the cycle stopped early.
    pub error: Option<String>,
    /// The probe's readings, at the start and after every tenth of the cycles.
    pub samples: Vec<u64>,
    pub elapsed: Duration,
}

impl Control {
    pub async fn connect(agent: &AgentProcess) -> anyhow::Result<Control> {
        let client = agent
            .client()
            .await
            .with_context(|| format!("cannot reach the agent's gRPC at {}", agent.grpc))?;
        Ok(Control { client })
    }

    /// Switches to `version`, permanent at once; returns the call's wall time.
    pub async fn switch(
        &mut self,
        direction: Direction,
        version: &str,
    ) -> anyhow::Result<Duration> {
        let request = TransitionRequest {
            version: version.to_owned(),
            permanence: Permanence::Immediate as i32,
            ..Default::default()
        };
        let started = Instant::now();
        let call = async {
            match direction {
                Direction::Upgrade => self.client.upgrade(request).await,
                Direction::Downgrade => self.client.downgrade(request).await,
            }
        };
        let reply = tokio::time::timeout(RPC_TIMEOUT, call)
            .await
            .map_err(|_| anyhow!("{direction:?} to {version}: no reply within {RPC_TIMEOUT:?}"))?
            .map_err(|status| {
                anyhow!(
                    "{direction:?} to {version}: {:?}: {}",
                    status.code(),
                    status.message()
                )
            })?;
        let elapsed = started.elapsed();
        let transition = reply
            .into_inner()
            .transition
            .ok_or_else(|| anyhow!("{direction:?} to {version}: the reply has no transition"))?;
        if transition.result() != TransitionResult::Ok {
            bail!(
                "{direction:?} to {version}: result {:?}: {}",
                transition.result(),
                transition.error
            );
        }
        Ok(elapsed)
    }

    /// `cycles` times 0.2.0 -> 0.3.0 -> 0.2.0, back to back; stops at the
    /// first failure. `probe` is read now and then (the agent's memory: a
    /// steady climb tells a leak per switch from a one-off growth).
    pub async fn cycle(&mut self, cycles: u32, mut probe: impl FnMut() -> Option<u64>) -> Cycling {
        let mut cycling = Cycling::default();
        let every = (cycles / 10).max(1);
        cycling.samples.extend(probe());
        let started = Instant::now();
        'cycles: for _ in 0..cycles {
            for (direction, version) in [
                (Direction::Upgrade, "0.3.0"),
                (Direction::Downgrade, "0.2.0"),
            ] {
                match self.switch(direction, version).await {
                    Ok(elapsed) => cycling.rpc_us.push(micros(elapsed)),
                    Err(e) => {
                        cycling.error = Some(format!("cycle {}: {e:#}", cycling.done + 1));
                        break 'cycles;
                    }
                }
            }
            cycling.done += 1;
            if cycling.done % every == 0 {
                cycling.samples.extend(probe());
            }
        }
        cycling.elapsed = started.elapsed();
        cycling
    }

    /// Forgets a release that is neither permanent nor current.
    pub async fn remove(&mut self, version: &str) -> anyhow::Result<()> {
        let request = RemoveRequest {
            version: version.to_owned(),
            ..Default::default()
        };
        tokio::time::timeout(RPC_TIMEOUT, self.client.remove(request))
            .await
            .map_err(|_| anyhow!("Remove {version}: no reply within {RPC_TIMEOUT:?}"))?
            .map_err(|status| {
                anyhow!(
                    "Remove {version}: {:?}: {}",
                    status.code(),
                    status.message()
                )
            })?;
        Ok(())
    }

    /// The id of the latest transition, 0 if none.
    pub async fn last_transition_id(&mut self) -> anyhow::Result<u64> {
        Ok(self.history(1).await?.last().map_or(0, |t| t.id))
    }

    /// The transitions recorded after the one with id `after`.
    pub async fn transitions_after(&mut self, after: u64) -> anyhow::Result<Vec<Transition>> {
        let mut all = self.history(0).await?;
        all.retain(|t| t.id > after);
        Ok(all)
    }

    async fn history(&mut self, limit: u32) -> anyhow::Result<Vec<Transition>> {
        let reply = tokio::time::timeout(
            RPC_TIMEOUT,
            self.client.history(HistoryRequest {
                limit,
                ..Default::default()
            }),
        )
        .await
        .map_err(|_| anyhow!("History: no reply within {RPC_TIMEOUT:?}"))?
        .map_err(|status| anyhow!("History: {:?}: {}", status.code(), status.message()))?;
        Ok(reply.into_inner().transitions)
    }
}

pub fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}
