//! How replies look on a terminal: short sentences and aligned tables.

use std::path::Path;

use nine9s_proto as pb;

use crate::Switch;

pub fn state_name(state: i32) -> &'static str {
    match pb::ReleaseState::try_from(state) {
        Ok(pb::ReleaseState::Staged) => "staged",
        Ok(pb::ReleaseState::Current) => "current",
        Ok(pb::ReleaseState::Permanent) => "permanent",
        Ok(pb::ReleaseState::Old) => "old",
        Ok(pb::ReleaseState::Failed) => "failed",
        _ => "unknown",
    }
}

/// Prints rows with every column padded to its widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// A duration given in microseconds, in the unit that keeps its digits.
fn ms(us: u64) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else {
        format!("{:.1} ms", us as f64 / 1000.0)
    }
}

/// `YYYY-MM-DD HH:MM:SS` UTC from milliseconds since the epoch.
fn time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn staged(reply: &pb::StageReply, library: &Path) {
    let Some(r) = &reply.release else { return };
    if reply.already_staged {
        println!(
            "{} {} was already staged (sha256 {})",
            r.name, r.version, r.sha256
        );
    } else {
        println!(
            "staged {} {} from {} ({} bytes, sha256 {})",
            r.name,
            r.version,
            library.display(),
            r.size,
            r.sha256
        );
    }
}

pub fn releases(releases: &[pb::Release]) {
    let rows: Vec<Vec<String>> = releases
        .iter()
        .map(|r| {
            vec![
                r.version.clone(),
                state_name(r.state).to_owned(),
                format!("v{}", r.state_version),
                r.sha256.chars().take(12).collect(),
                time(r.staged_at_ms),
                r.routes.join(" "),
            ]
        })
        .collect();
    table(
        &[
            "VERSION",
            "STATE",
            "STATE-FORMAT",
            "SHA256",
            "STAGED (UTC)",
            "ROUTES",
        ],
        &rows,
    );
}

fn plan(plan: &pb::Plan) {
    println!(
        "plan {} -> {} ({}): {}",
        plan.from_version,
        plan.to_version,
        plan.origin,
        plan.steps.join(", ")
    );
    for check in &plan.checks {
        println!("  ok  {check}");
    }
}

pub fn switched(word: &str, switch: &Switch, reply: &pb::TransitionReply) {
    let Some(t) = &reply.transition else {
        if let Some(p) = &reply.plan {
            plan(p);
        }
        println!("dry run: nothing changed");
        return;
    };
    let then = if switch.permanent {
        format!("{} is permanent", t.to_version)
    } else if switch.no_permanent {
        format!(
            "{} is current; `ctl make-permanent {}` keeps it across restarts",
            t.to_version, t.to_version
        )
    } else {
        format!(
            "{} is current and becomes permanent if it stays healthy through its soak",
            t.to_version
        )
    };
    println!(
        "{word}d {} -> {} in {} (requests held {}); {then}",
        t.from_version,
        t.to_version,
        ms(t.duration_us),
        ms(t.switch_wait_us)
    );
}

pub fn rolled_back(dry_run: bool, reply: &pb::TransitionReply) {
    if dry_run {
        if let Some(p) = &reply.plan {
            plan(p);
        }
        println!("dry run: nothing changed");
    } else if let Some(t) = &reply.transition {
        println!(
            "rolled back {} -> {} in {} (requests held {}); {} is permanent",
            t.from_version,
            t.to_version,
            ms(t.duration_us),
            ms(t.switch_wait_us),
            t.to_version
        );
    }
}

pub fn status(s: &pb::StatusReply) {
    println!("active:    {}", s.active_version);
    println!("permanent: {}", s.permanent_version);
    if !s.current_version.is_empty() {
        let soak = if s.soak_remaining_ms > 0 {
            format!(
                " (soaking, {:.1} s left)",
                s.soak_remaining_ms as f64 / 1000.0
            )
        } else {
            String::new()
        };
        println!("current:   {}{soak}", s.current_version);
    }
    println!("uptime:    {:.1} s", s.uptime_ms as f64 / 1000.0);
    println!();
    releases(&s.releases);
    println!();
    let rows: Vec<Vec<String>> = s
        .libraries
        .iter()
        .map(|l| {
            let role = if l.active {
                "active"
            } else if l.lingering {
                "lingering (released, still mapped)"
            } else {
                "draining"
            };
            vec![
                l.version.clone(),
                role.to_owned(),
                l.in_flight.to_string(),
                l.served.to_string(),
                l.errors.to_string(),
                l.path.clone(),
            ]
        })
        .collect();
    table(
        &["LIBRARY", "ROLE", "IN-FLIGHT", "SERVED", "ERRORS", "PATH"],
        &rows,
    );
}

pub fn history(transitions: &[pb::Transition]) {
    let rows: Vec<Vec<String>> = transitions
        .iter()
        .map(|t| {
            let mut note = t.error.clone();
            if !t.reason.is_empty() {
                if !note.is_empty() {
                    note.push_str("; ");
                }
                note.push_str(&t.reason);
            }
            vec![
                t.id.to_string(),
                time(t.started_at_ms),
                if t.automatic {
                    format!("{} (auto)", t.kind)
                } else {
                    t.kind.clone()
                },
                t.from_version.clone(),
                t.to_version.clone(),
                t.result.clone(),
                ms(t.duration_us),
                ms(t.switch_wait_us),
                note,
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "TIME (UTC)",
            "KIND",
            "FROM",
            "TO",
            "RESULT",
            "DURATION",
            "HELD",
            "NOTE",
        ],
        &rows,
    );
}

#[cfg(test)]
mod tests {
    use super::time;

    #[test]
    fn durations() {
        assert_eq!(super::ms(57), "57 µs");
        assert_eq!(super::ms(1_250), "1.2 ms");
        assert_eq!(super::ms(30_002_700), "30002.7 ms");
    }

    #[test]
    fn utc_time() {
        assert_eq!(time(0), "1970-01-01 00:00:00");
        assert_eq!(time(1_795_000_000_000), "2026-11-18 11:06:40");
    }
}
