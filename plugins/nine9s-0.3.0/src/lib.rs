//! nine9s 0.3.0: counts requests per path, remembering when each path was
//! first asked for. `GET /` answers `Hello world 3 !`; `GET /count` answers
//! the number of `/` requests (the same total as 0.2.0); `GET /stats`
//! answers one line per path: `count first_seen_ms path`.
//!
//! State version 2: those lines, `count\tfirst_seen_ms\tpath\n`. It
//! migrates up from 0.2.0's v1 (a little-endian `u64` count of `/`) and
//! back down to it.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use nine9s_sdk::{Migration, Plugin, Request, Response};

/// Distinct paths tracked; the rest are counted under `(other)`.
const MAX_PATHS: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PathStats {
    count: u64,
    /// 0 when unknown (counted by an older release).
    first_seen_ms: u64,
}

type Stats = BTreeMap<String, PathStats>;

pub struct Nine9s {
    stats: Mutex<Stats>,
}

impl Nine9s {
    fn record(&self, path: &str) {
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let key = if stats.len() >= MAX_PATHS && !stats.contains_key(path) {
            "(other)"
        } else {
            path
        };
        stats
            .entry(key.to_owned())
            .or_insert(PathStats {
                count: 0,
                first_seen_ms: now_ms(),
            })
            .count += 1;
    }

    fn hello_count(&self) -> u64 {
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.get("/").map_or(0, |s| s.count)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn encode(stats: &Stats) -> Vec<u8> {
    let mut out = String::new();
    for (path, s) in stats {
        out.push_str(&format!("{}\t{}\t{}\n", s.count, s.first_seen_ms, path));
    }
    out.into_bytes()
}

fn decode(bytes: &[u8]) -> Result<Stats, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("state v2 is not UTF-8: {e}"))?;
    let mut stats = Stats::new();
    for line in text.lines() {
        let mut fields = line.splitn(3, '\t');
        let (Some(count), Some(first), Some(path)) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(format!("state v2: malformed line {line:?}"));
        };
        let number = |s: &str| {
            s.parse::<u64>()
                .map_err(|e| format!("state v2: {s:?}: {e}"))
        };
        stats.insert(
            path.to_owned(),
            PathStats {
                count: number(count)?,
                first_seen_ms: number(first)?,
            },
        );
    }
    Ok(stats)
}

/// v1 (0.2.0: one count of `/`) -> v2.
fn up_from_v1(state: &[u8]) -> Result<Vec<u8>, String> {
    let count = u64::from_le_bytes(
        state
            .try_into()
            .map_err(|_| format!("state v1 is 8 bytes, got {}", state.len()))?,
    );
    let mut stats = Stats::new();
    if count > 0 {
        stats.insert(
            "/".to_owned(),
            PathStats {
                count,
                first_seen_ms: 0,
            },
        );
    }
    Ok(encode(&stats))
}

/// v2 -> v1: keeps the count of `/`; the other paths have no place in v1.
fn down_to_v1(state: &[u8]) -> Result<Vec<u8>, String> {
    let stats = decode(state)?;
    let count = stats.get("/").map_or(0, |s| s.count);
    Ok(count.to_le_bytes().to_vec())
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        from: 1,
        to: 2,
        run: up_from_v1,
    },
    Migration {
        from: 2,
        to: 1,
        run: down_to_v1,
    },
];

impl Plugin for Nine9s {
    const STATE_VERSION: u32 = 2;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        let stats = state.map(decode).transpose()?.unwrap_or_default();
        Ok(Nine9s {
            stats: Mutex::new(stats),
        })
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match (request.method, request.path) {
            ("GET", "/") => {
                self.record("/");
                Response::text("Hello world 3 !")
            }
            ("GET", "/count") => Response::text(self.hello_count().to_string()),
            ("GET", "/stats") => {
                let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let lines: String = stats
                    .iter()
                    .map(|(path, s)| format!("{} {} {}\n", s.count, s.first_seen_ms, path))
                    .collect();
                Response::text(lines)
            }
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        encode(&self.stats.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn migrations() -> &'static [Migration] {
        MIGRATIONS
    }
}

nine9s_sdk::export_plugin!(Nine9s, name = "nine9s");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_up_and_back_down_keeps_the_count() {
        let v1 = 41u64.to_le_bytes();
        let v2 = up_from_v1(&v1).unwrap();
        let plugin = Nine9s::init(Some(&v2)).unwrap();
        plugin.record("/");
        plugin.record("/elsewhere");
        assert_eq!(plugin.hello_count(), 42);
        assert_eq!(down_to_v1(&plugin.snapshot()).unwrap(), 42u64.to_le_bytes());
    }

    #[test]
    fn corrupt_state_is_an_error() {
        assert!(decode(b"12\tnot-a-number\t/\n").is_err());
        assert!(up_from_v1(b"short").is_err());
    }
}
