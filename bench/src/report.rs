//! The figures: what a run measured, turned into percentiles, ratios and
//! pass/fail targets, and rendered as one JSON line; the percentile and
//! rounding helpers the other modes' lines use too.

use std::time::Duration;

use nine9s_proto::{Transition, TransitionResult};
use serde_json::{json, Value};

use crate::control::Cycling;
use crate::load::Tally;
use crate::Options;

/// Throughput of the agent over the bare server's, at least.
const THROUGHPUT_TARGET: f64 = 0.95;
const SWITCH_WAIT_TARGET_US: u64 = 1000;
const UPGRADE_P50_TARGET_US: u64 = 10_000;
const RSS_GROWTH_TARGET_KIB: i64 = 1024;
/// Error samples in the report.
const ERRORS_SHOWN: usize = 10;

/// Everything a completed run measured.
pub struct Figures {
    pub bare: Tally,
    pub steady: Tally,
    pub cycling_load: Tally,
    pub cycling: Cycling,
    /// The transitions of the cycle under load, from History.
    pub transitions: Vec<Transition>,
    /// Wall time of each `ctl upgrade` / `ctl downgrade` process.
    pub ctl_us: Vec<u64>,
    pub count_reported: u64,
    /// CPU time of the bare server in phase a and of the agent in phase b.
    pub cpu: (Duration, Duration),
    /// The agent's VmRSS before and after the cycle under load.
    pub rss_kib: (u64, u64),
    /// Plugin libraries the agent maps, before and after that cycle.
    pub mapped: (usize, usize),
    /// The data dir's store on disk before and after that cycle.
    pub store_kib: (u64, u64),
}

/// The JSON line of `--worker-crashes` or `--self-upgrades`, and whether
/// its correctness targets held.
pub struct Outcome {
    pub json: String,
    pub passed: bool,
}

pub struct Report {
    pub json: String,
    /// The correctness targets held: nothing failed or refused, the counts
    /// match, every cycle switched.
    pub correct: bool,
}

impl Report {
    pub fn new(options: &Options, figures: &Figures, agent_exit: String) -> Report {
        let Figures {
            bare,
            steady,
            cycling_load,
            cycling,
            transitions,
            ctl_us,
            count_reported,
            cpu,
            rss_kib,
            mapped,
            store_kib,
        } = figures;
        let cpu_us_per_request = |cpu: Duration, tally: &Tally| {
            (tally.ok > 0).then(|| cpu.as_secs_f64() * 1e6 / tally.ok as f64)
        };
        let bare_cpu_us = cpu_us_per_request(cpu.0, bare);
        let plugin_cpu_us = cpu_us_per_request(cpu.1, steady);
        let served = steady.ok + cycling_load.ok;
        let failed = steady.failed + cycling_load.failed;
        let refused = steady.refused + cycling_load.refused;
        // Every request the bench sends the agent under load is `GET /`.
        let hello_200 = served;
        let counts_exact = hello_200 == *count_reported;
        let plugin_over_bare = steady.rps() / bare.rps();

        let mut switch_waits: Vec<u64> = transitions.iter().map(|t| t.switch_wait_us).collect();
        let mut durations: Vec<u64> = transitions.iter().map(|t| t.duration_us).collect();
        let transitions_not_ok = transitions
            .iter()
            .filter(|t| t.result() != TransitionResult::Ok)
            .count();
        let max_switch_wait_us = switch_waits.iter().max().copied();
        let mut rpc_us = cycling.rpc_us.clone();
        let mut ctl_us = ctl_us.clone();
        let upgrade_p50_us = percentile(&mut rpc_us, 0.5);
        let rss_growth_kib = rss_kib.1 as i64 - rss_kib.0 as i64;

        let all_cycles = cycling.error.is_none()
            && cycling.done == options.cycles
            && transitions_not_ok == 0
            && transitions.len() == 2 * options.cycles as usize;
        let targets = json!({
            "zero_failed": failed == 0,
            "zero_refused": refused == 0,
            "counts_exact": counts_exact,
            "all_cycles": all_cycles,
            "throughput": plugin_over_bare >= THROUGHPUT_TARGET,
            "switch_wait": max_switch_wait_us.is_some_and(|w| w <= SWITCH_WAIT_TARGET_US),
            "upgrade_p50": upgrade_p50_us.is_some_and(|p| p <= UPGRADE_P50_TARGET_US),
            "rss_growth": rss_growth_kib <= RSS_GROWTH_TARGET_KIB,
        });
        let correct = failed == 0 && refused == 0 && counts_exact && all_cycles;

        let errors: Vec<String> = [
            ("bare", bare),
            ("steady", steady),
            ("cycling", cycling_load),
        ]
        .iter()
        .flat_map(|(phase, tally)| tally.errors.iter().map(move |e| format!("{phase}: {e}")))
        .chain(cycling.error.clone())
        .take(ERRORS_SHOWN)
        .collect();
        let report = json!({
            "mode": if options.short { "short" } else { "full" },
            "connections": options.connections,
            "phase_seconds": options.phase.as_secs_f64(),
            "cycles": options.cycles,
            "cycles_done": cycling.done,
            "cycling_seconds": round(cycling.elapsed.as_secs_f64(), 3),
            "bare_rps": round(bare.rps(), 0),
            "plugin_rps": round(steady.rps(), 0),
            "cycling_rps": round(cycling_load.rps(), 0),
            "plugin_over_bare": round(plugin_over_bare, 3),
            "bare_cpu_us_per_request": bare_cpu_us.map(|v| round(v, 2)),
            "plugin_cpu_us_per_request": plugin_cpu_us.map(|v| round(v, 2)),
            "plugin_cpu_over_bare": bare_cpu_us.zip(plugin_cpu_us).map(|(b, p)| round(p / b, 3)),
            "bare": latency(&bare.latencies_us),
            "steady": latency(&steady.latencies_us),
            "cycling": latency(&cycling_load.latencies_us),
            "served": served,
            "failed": failed,
            "refused": refused,
            "bare_failed": bare.failed,
            "bare_refused": bare.refused,
            "hello_200": hello_200,
            "count_reported": count_reported,
            "counts_exact": counts_exact,
            "transitions": transitions.len(),
            "transitions_not_ok": transitions_not_ok,
            "max_switch_wait_us": max_switch_wait_us,
            "switch_waits_over_target": switch_waits.iter().filter(|&&w| w > SWITCH_WAIT_TARGET_US).count(),
            "switch_wait_us": { "p50": percentile(&mut switch_waits, 0.5), "p99": percentile(&mut switch_waits, 0.99) },
            "transition_duration_us": { "p50": percentile(&mut durations, 0.5), "p99": percentile(&mut durations, 0.99) },
            "upgrade_rpc_ms": { "p50": upgrade_p50_us.map(ms), "p99": percentile(&mut rpc_us, 0.99).map(ms) },
            "ctl_upgrade_ms": { "p50": percentile(&mut ctl_us, 0.5).map(ms), "p99": percentile(&mut ctl_us, 0.99).map(ms) },
            "rss_kib_before": rss_kib.0,
            "rss_kib_after": rss_kib.1,
            "rss_growth_kib": rss_growth_kib,
            "rss_kib_during_cycling": cycling.samples,
            "store_kib_before": store_kib.0,
            "store_kib_after": store_kib.1,
            "mapped_plugin_libraries_before": mapped.0,
            "mapped_plugin_libraries_after": mapped.1,
            "agent_exit": agent_exit,
            "errors": errors,
            "targets": targets,
        });
        Report {
            json: report.to_string(),
            correct,
        }
    }
}

pub fn latency(samples_us: &[u32]) -> Value {
    let mut sorted = samples_us.to_vec();
    json!({
        "p50_us": percentile(&mut sorted, 0.5),
        "p99_us": percentile(&mut sorted, 0.99),
        "p999_us": percentile(&mut sorted, 0.999),
        "max_us": sorted.last(),
    })
}

/// Nearest-rank percentile; sorts `samples` in place.
pub fn percentile<T: Copy + Ord>(samples: &mut [T], p: f64) -> Option<T> {
    samples.sort_unstable();
    let rank = (p * samples.len() as f64).ceil() as usize;
    samples.get(rank.max(1) - 1).copied()
}

pub fn ms(us: u64) -> f64 {
    round(us as f64 / 1000.0, 3)
}

pub fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<u64> = (1..=1000).rev().collect();
        assert_eq!(percentile(&mut samples, 0.5), Some(500));
        assert_eq!(percentile(&mut samples, 0.99), Some(990));
        assert_eq!(percentile(&mut samples, 0.999), Some(999));
        assert_eq!(percentile(&mut [7u64], 0.999), Some(7));
        assert_eq!(percentile::<u64>(&mut [], 0.5), None);
    }
}
