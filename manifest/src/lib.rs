//! `release.toml`: what a nine9s release is (name, version, library,
//! routes) and, optionally, its upgrade plans — the appup of nine9s.
//!
//! ```toml
//! name = "nine9s"
//! version = "0.3.0"
//! library = "libnine9s_0_3_0.so"
//! routes = ["/", "/count", "/stats"]
//! blocking = false       # true: the handler may block on I/O
//!
//! [[upgrade]]            # how to come here from an older release
//! from = ">=0.2.0, <0.3.0"
//! steps = ["load", "migrate", "switch", "drain", "unload"]
//!
//! [[downgrade]]          # how to go from here to an older release
//! to = "0.2.0"
//! steps = ["load", "migrate", "switch", "drain", "unload"]
//! ```
//! With no plan written for a pair of versions, the agent derives one.
#![forbid(unsafe_code)]

mod duration;
mod locate;
mod plan;

use std::path::Path;

pub use duration::parse_duration;
pub use locate::locate_library;
pub use plan::{Plan, PlanOrigin, Step};
pub use semver::Version;
use semver::VersionReq;
use serde::Deserialize;

/// A parsed and validated `release.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub version: Version,
    /// File name (or path relative to the release directory) of the library.
    pub library: String,
    /// The paths the release serves, for plans and dry runs; informative.
    pub routes: Vec<String>,
    /// The handler may block (file or network I/O, sleeps): the agent then
    /// lets it block without holding up other requests.
    pub blocking: bool,
    pub upgrade: Vec<PlanFrom>,
    pub downgrade: Vec<PlanTo>,
}

/// A written plan for upgrading to this release from matching versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanFrom {
    pub from: VersionReq,
    pub steps: Vec<Step>,
}

/// A written plan for downgrading from this release to matching versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanTo {
    pub to: VersionReq,
    pub steps: Vec<Step>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid release.toml: {0}")]
    Syntax(String),
    #[error("invalid release.toml: version {0:?} is not a semantic version (like 0.2.0)")]
    Version(String),
    #[error("invalid release.toml: version range {0:?}: {1}")]
    Range(String, String),
    #[error("invalid release.toml: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    version: String,
    library: String,
    #[serde(default)]
    routes: Vec<String>,
    #[serde(default)]
    blocking: bool,
    #[serde(default)]
    upgrade: Vec<RawPlanFrom>,
    #[serde(default)]
    downgrade: Vec<RawPlanTo>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlanFrom {
    from: String,
    steps: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlanTo {
    to: String,
    steps: Vec<String>,
}

impl Manifest {
    /// Reads `DIR/release.toml`.
    pub fn read_dir(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join("release.toml");
        let text = std::fs::read_to_string(&path).map_err(|source| ManifestError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Manifest::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let raw: RawManifest =
            toml::from_str(text).map_err(|e| ManifestError::Syntax(e.message().to_owned()))?;
        let version = Version::parse(&raw.version)
            .map_err(|_| ManifestError::Version(raw.version.clone()))?;
        if raw.name.is_empty()
            || !raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(ManifestError::Invalid(format!(
                "name {:?} must be non-empty letters, digits, '-' or '_'",
                raw.name
            )));
        }
        if raw.library.is_empty() {
            return Err(ManifestError::Invalid(
                "library must name the release's .so file".into(),
            ));
        }
        let upgrade = raw
            .upgrade
            .into_iter()
            .map(|p| {
                Ok(PlanFrom {
                    from: parse_range(&p.from)?,
                    steps: plan::parse_steps(&p.steps)?,
                })
            })
            .collect::<Result<_, ManifestError>>()?;
        let downgrade = raw
            .downgrade
            .into_iter()
            .map(|p| {
                Ok(PlanTo {
                    to: parse_range(&p.to)?,
                    steps: plan::parse_steps(&p.steps)?,
                })
            })
            .collect::<Result<_, ManifestError>>()?;
        Ok(Manifest {
            name: raw.name,
            version,
            library: raw.library,
            routes: raw.routes,
            blocking: raw.blocking,
            upgrade,
            downgrade,
        })
    }
}

/// A bare version means exactly that version (not cargo's caret default).
fn parse_range(text: &str) -> Result<VersionReq, ManifestError> {
    let exact;
    let text = if Version::parse(text.trim()).is_ok() {
        exact = format!("={}", text.trim());
        &exact
    } else {
        text
    };
    VersionReq::parse(text).map_err(|e| ManifestError::Range(text.to_owned(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_manifest() {
        let m = Manifest::parse("name = \"nine9s\"\nversion = \"0.2.0\"\nlibrary = \"lib.so\"\n")
            .unwrap();
        assert_eq!(m.version, Version::new(0, 2, 0));
        assert!(m.upgrade.is_empty());
    }

    #[test]
    fn bare_version_in_a_plan_is_exact() {
        let m = Manifest::parse(
            "name = \"a\"\nversion = \"0.3.0\"\nlibrary = \"l.so\"\n[[upgrade]]\nfrom = \"0.2.0\"\nsteps = [\"load\", \"switch\"]\n",
        )
        .unwrap();
        assert!(m.upgrade[0].from.matches(&Version::new(0, 2, 0)));
        assert!(!m.upgrade[0].from.matches(&Version::new(0, 2, 1)));
    }

    #[test]
    fn typos_are_refused() {
        let err =
            Manifest::parse("name = \"a\"\nversion = \"0.3.0\"\nlibary = \"l.so\"\n").unwrap_err();
        assert!(err.to_string().contains("libary"), "{err}");
        let err =
            Manifest::parse("name = \"a\"\nversion = \"three\"\nlibrary = \"l.so\"\n").unwrap_err();
        assert!(err.to_string().contains("three"), "{err}");
    }
}
