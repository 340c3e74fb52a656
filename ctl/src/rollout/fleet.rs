//! The fleet file of `ctl rollout --fleet FILE`: which agents a rollout
//! drives and how `ctl` reaches each of them. TOML, one `[[agent]]` table
//! per agent, in rollout order (the first one that needs the release is
//! the canary):
//!
//! ```toml
//! # Defaults for every agent below (each may set its own instead).
//! token_file = "deploy.token"
//! ca = "ca.pem"
//!
//! [[agent]]
//! name = "edge-1"                       # optional: the address by default
//! address = "https://10.0.0.11:50051"
//!
//! [[agent]]
//! address = "https://10.0.0.12:50051"
//! token_file = "edge-2.token"
//! cert = "ctl.pem"                      # a client certificate (with key)
//! key = "ctl.key"
//! ```
//!
//! Relative paths are relative to the fleet file's directory, so a fleet
//! directory can be moved whole. Unknown keys are refused: a misspelt
//! `token-file` must not silently send no token. Files are only named
//! here; `credentials` reads them, before the first call.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// At most this many agents: a fleet file is written by people or
/// generated, and a runaway generator should not open a million sockets.
pub const MAX_AGENTS: usize = 10_000;

/// One agent of the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub address: String,
    pub files: Files,
}

/// The credential files of one agent; `None` falls back to the global
/// flags (`--token-file`, `--ca`, `--cert`, `--key`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Files {
    pub token_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl Files {
    /// Each of `self`'s files, or else `defaults`'s.
    fn or(self, defaults: &Files) -> Files {
        Files {
            token_file: self.token_file.or_else(|| defaults.token_file.clone()),
            ca: self.ca.or_else(|| defaults.ca.clone()),
            cert: self.cert.or_else(|| defaults.cert.clone()),
            key: self.key.or_else(|| defaults.key.clone()),
        }
    }

    fn relative_to(self, base: &Path) -> Files {
        let resolve = |p: Option<PathBuf>| p.map(|p| base.join(p));
        Files {
            token_file: resolve(self.token_file),
            ca: resolve(self.ca),
            cert: resolve(self.cert),
            key: resolve(self.key),
        }
    }
}

#[derive(Deserialize)]
struct FleetFile {
    #[serde(flatten)]
    defaults: Files,
    #[serde(default)]
    agent: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    name: Option<String>,
    address: String,
    #[serde(flatten)]
    files: Files,
}

/// Reads and checks the fleet file at `path`.
pub fn read(path: &Path) -> Result<Vec<Member>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--fleet: cannot read {}: {e}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base).map_err(|e| format!("--fleet {}: {e}", path.display()))
}

/// The agents of a fleet file's `text`, its relative paths taken from
/// `base`; every agent's address is `unix:PATH` or an http(s) URL, and names and
/// addresses are unique.
pub fn parse(text: &str, base: &Path) -> Result<Vec<Member>, String> {
    // serde's flatten cannot see unknown keys of flattened tables, so
    // they are refused by hand below.
    let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    refuse_unknown(&table)?;
    let file: FleetFile = toml::from_str(text).map_err(|e| e.to_string())?;
    if file.agent.is_empty() {
        return Err("no [[agent]] table: a fleet needs at least one agent".into());
    }
    if file.agent.len() > MAX_AGENTS {
        return Err(format!("{} agents; at most {MAX_AGENTS}", file.agent.len()));
    }
    let mut names = HashSet::new();
    let mut addresses = HashSet::new();
    let mut members = Vec::with_capacity(file.agent.len());
    for (i, entry) in file.agent.into_iter().enumerate() {
        let at = |what: String| format!("agent #{}: {what}", i + 1);
        crate::agent_url(&entry.address)
            .map_err(|e| at(format!("address {:?}: {e}", entry.address)))?;
        let name = entry.name.unwrap_or_else(|| entry.address.clone());
        if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
            return Err(at(format!(
                "name {name:?}: 1 to 128 characters, no control characters"
            )));
        }
        if !addresses.insert(entry.address.clone()) {
            return Err(at(format!("address {} is listed twice", entry.address)));
        }
        if !names.insert(name.clone()) {
            return Err(at(format!("name {name:?} is used twice")));
        }
        members.push(Member {
            name,
            address: entry.address,
            files: entry.files.or(&file.defaults).relative_to(base),
        });
    }
    Ok(members)
}

/// The address of an agent as a rollout names it, whatever the spelling:
/// `scheme://IP:PORT` with the host resolved (its lowest IPv4 address if
/// it has one: `localhost` is `127.0.0.1`), or `unix:` and the socket's
/// absolute path with its directories' links resolved. An address that
/// does not resolve stays as given, its host lowercased; it cannot be
/// reached anyway, and the rollout says so.
pub async fn canonical(address: &str) -> String {
    if let Some(path) = crate::local::socket_path(address) {
        return format!("unix:{}", real_path(&path).display());
    }
    let Ok(uri) = address.parse::<tonic::transport::Uri>() else {
        return address.to_owned();
    };
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return address.to_owned();
    };
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let resolved = tokio::net::lookup_host((host, port))
        .await
        .map(|found| lowest(found.map(|a| a.ip())));
    match resolved {
        Ok(Some(IpAddr::V6(ip))) => format!("{scheme}://[{ip}]:{port}"),
        Ok(Some(ip)) => format!("{scheme}://{ip}:{port}"),
        _ => format!("{scheme}://{}:{port}", host.to_ascii_lowercase()),
    }
}

/// The lowest IPv4 address, else the lowest.
fn lowest(ips: impl Iterator<Item = IpAddr>) -> Option<IpAddr> {
    ips.min_by_key(|ip| (ip.is_ipv6(), *ip))
}

/// `path` absolute, with the links of its directory resolved (the socket
/// itself may not exist: its agent may be down).
fn real_path(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir)
            .map(|dir| dir.join(name))
            .unwrap_or(absolute),
        _ => absolute,
    }
}

const FILE_KEYS: [&str; 4] = ["token_file", "ca", "cert", "key"];

fn refuse_unknown(table: &toml::Table) -> Result<(), String> {
    for key in table.keys() {
        if key != "agent" && !FILE_KEYS.contains(&key.as_str()) {
            return Err(unknown(key, "at the top"));
        }
    }
    let Some(agents) = table.get("agent").and_then(toml::Value::as_array) else {
        return Ok(());
    };
    for (i, agent) in agents.iter().enumerate() {
        let Some(agent) = agent.as_table() else {
            continue;
        };
        for key in agent.keys() {
            if !matches!(key.as_str(), "name" | "address") && !FILE_KEYS.contains(&key.as_str()) {
                return Err(unknown(key, &format!("in agent #{}", i + 1)));
            }
        }
    }
    Ok(())
}

fn unknown(key: &str, place: &str) -> String {
    format!(
        "unknown key {key:?} {place} (known: name, address, {})",
        FILE_KEYS.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn agents_in_order_with_defaults_and_paths_from_the_file() {
        let text = r#"
            token_file = "deploy.token"
            ca = "/etc/nine9s/ca.pem"

            [[agent]]
            name = "edge-1"
            address = "https://10.0.0.11:50051"

            [[agent]]
            address = "http://127.0.0.1:50052"
            token_file = "own.token"
        "#;
        let fleet = parse(text, Path::new("/srv/fleet")).unwrap();
        assert_eq!(fleet.len(), 2);
        assert_eq!(fleet[0].name, "edge-1");
        assert_eq!(
            fleet[0].files.token_file.as_deref(),
            Some(Path::new("/srv/fleet/deploy.token"))
        );
        assert_eq!(
            fleet[0].files.ca.as_deref(),
            Some(Path::new("/etc/nine9s/ca.pem"))
        );
        assert_eq!(fleet[1].name, "http://127.0.0.1:50052");
        assert_eq!(
            fleet[1].files.token_file.as_deref(),
            Some(Path::new("/srv/fleet/own.token"))
        );
        assert_eq!(fleet[1].files.cert, None);
    }

    #[test]
    fn mistakes_are_named() {
        let err = |text: &str| parse(text, Path::new(".")).unwrap_err();
        assert!(err("").contains("no [[agent]]"));
        assert!(err("[[agent]]\naddress = \"10.0.0.1:50051\"").contains("agent #1: address"));
        assert!(
            err("[[agent]]\naddress = \"http://a:1\"\ntoken-file = \"t\"")
                .contains("unknown key \"token-file\" in agent #1")
        );
        assert!(
            err("tokenfile = \"t\"\n[[agent]]\naddress = \"http://a:1\"")
                .contains("unknown key \"tokenfile\" at the top")
        );
        assert!(
            err("[[agent]]\naddress = \"http://a:1\"\n[[agent]]\naddress = \"http://a:1\"")
                .contains("listed twice")
        );
        assert!(err(
            "[[agent]]\nname = \"x\"\naddress = \"http://a:1\"\n[[agent]]\nname = \"x\"\naddress = \"http://b:1\""
        )
        .contains("used twice"));
        assert!(err("[[agent]]\nname = \"\"\naddress = \"http://a:1\"").contains("name"));
        assert!(err("[[agent]]\nname = \"x\"").contains("address"));
    }

    #[tokio::test]
    async fn one_agent_has_one_canonical_address_however_spelt() {
        let ip = canonical("http://127.0.0.1:50051").await;
        assert_eq!(ip, "http://127.0.0.1:50051");
        assert_eq!(canonical("http://localhost:50051").await, ip);
        assert_eq!(canonical("http://LOCALHOST:50051/").await, ip);
        assert_eq!(
            canonical("https://[::1]:50051").await,
            "https://[::1]:50051"
        );
        assert_eq!(canonical("http://127.0.0.1").await, "http://127.0.0.1:80");
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let via_link = canonical(&format!("unix:{}/link/control.sock", dir.path().display())).await;
        let direct = canonical(&format!("unix:{}/control.sock", real.display())).await;
        assert_eq!(via_link, direct);
        assert!(direct.starts_with("unix:/"), "{direct}");
    }

    proptest! {
        /// Whatever the text, parsing answers (never panics), and what it
        /// accepts is a usable fleet.
        #[test]
        fn parsing_never_panics(text in "(\\[\\[agent\\]\\]\n|address = \"http://h:[0-9]{1,2}\"\n|name = \"[a-z]{0,3}\"\n|token_file = \"[a-z]{1,3}\"\n|x = 1\n|[\\[\\]=\"a-z\n ]{0,8})*") {
            if let Ok(fleet) = parse(&text, Path::new("/f")) {
                prop_assert!(!fleet.is_empty());
                let unique: HashSet<_> = fleet.iter().map(|m| &m.address).collect();
                prop_assert_eq!(unique.len(), fleet.len());
                for m in &fleet {
                    prop_assert!(m.files.token_file.as_ref().is_none_or(|p| p.starts_with("/f")));
                }
            }
        }
    }
}
