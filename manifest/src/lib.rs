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
//!
//! [`Manifest::parse`] refuses anything out of bounds (sizes, counts, a
//! `library` that is not a bare `.so` file name) before it is used, so the
//! agent can take a manifest from the network and record it safely.
//! Release signatures are in [`signature`].
#![forbid(unsafe_code)]

mod duration;
mod locate;
mod plan;
pub mod signature;

use std::path::Path;

pub use duration::parse_duration;
pub use locate::locate_library;
pub use plan::{Plan, PlanOrigin, Step};
pub use semver::Version;
use semver::VersionReq;
use serde::Deserialize;
pub use signature::{PublicKey, SecretKey, SignatureError, TrustedKeys, SIGNATURE_FILE};

/// The longest `release.toml` accepted, in bytes.
pub const MAX_MANIFEST: usize = 64 * 1024;
/// The longest `name` and `version`, in characters.
pub const MAX_NAME: usize = 64;
pub const MAX_VERSION: usize = 64;
/// The longest `library` file name, in bytes (the usual file system limit).
pub const MAX_LIBRARY: usize = 255;
/// At most this many routes, each at most `MAX_ROUTE` characters.
pub const MAX_ROUTES: usize = 256;
pub const MAX_ROUTE: usize = 1024;
/// At most this many `[[upgrade]]` and as many `[[downgrade]]` plans, each
/// of at most `MAX_STEPS` steps.
pub const MAX_PLANS: usize = 64;
pub const MAX_STEPS: usize = 32;

/// A parsed and validated `release.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub version: Version,
    /// File name of the library: a bare `*.so` name, never a path, so
    /// that it can only be looked up beside `release.toml` or in a cargo
    /// target directory.
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

    /// Parses and validates a `release.toml` text; nothing it accepts is
    /// over the limits above.
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse_as(text, true)
    }

    /// Parses a `release.toml` an agent recorded when it staged the
    /// release, perhaps under older, looser rules: its syntax, version and
    /// plans, not the limits on new uploads (a release staged before them
    /// stays usable).
    pub fn parse_recorded(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse_as(text, false)
    }

    fn parse_as(text: &str, strict: bool) -> Result<Manifest, ManifestError> {
        if strict {
            Manifest::check_text(text)?;
        }
        let raw: RawManifest =
            toml::from_str(text).map_err(|e| ManifestError::Syntax(e.message().to_owned()))?;
        if strict {
            raw.check_limits()?;
        }
        if raw.name.is_empty()
            || !raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(invalid(format!(
                "name {:?} must be non-empty letters, digits, '-' or '_'",
                raw.name
            )));
        }
        let version = Version::parse(&raw.version)
            .map_err(|_| ManifestError::Version(raw.version.clone()))?;
        raw.into_manifest(version)
    }

    fn check_text(text: &str) -> Result<(), ManifestError> {
        if text.len() > MAX_MANIFEST {
            return Err(invalid(format!(
                "it is {} bytes; at most {MAX_MANIFEST} (64 KiB)",
                text.len()
            )));
        }
        Ok(())
    }
}

impl RawManifest {
    /// The limits on a new upload; the errors quote the values, so lengths first.
    fn check_limits(&self) -> Result<(), ManifestError> {
        let name_len = self.name.chars().count();
        if name_len > MAX_NAME {
            return Err(invalid(format!(
                "name is {name_len} characters; at most {MAX_NAME}"
            )));
        }
        let version_len = self.version.chars().count();
        if version_len > MAX_VERSION {
            return Err(invalid(format!(
                "version is {version_len} characters; at most {MAX_VERSION}"
            )));
        }
        check_library(&self.library)?;
        check_routes(&self.routes)?;
        for (word, plans) in [
            (
                "upgrade",
                self.upgrade.iter().map(|p| &p.steps).collect::<Vec<_>>(),
            ),
            (
                "downgrade",
                self.downgrade.iter().map(|p| &p.steps).collect(),
            ),
        ] {
            if plans.len() > MAX_PLANS {
                return Err(invalid(format!(
                    "{} [[{word}]] plans; at most {MAX_PLANS}",
                    plans.len()
                )));
            }
            if let Some(steps) = plans.iter().find(|s| s.len() > MAX_STEPS) {
                return Err(invalid(format!(
                    "a [[{word}]] plan has {} steps; at most {MAX_STEPS}",
                    steps.len()
                )));
            }
        }
        Ok(())
    }

    fn into_manifest(self, version: Version) -> Result<Manifest, ManifestError> {
        let upgrade = self
            .upgrade
            .into_iter()
            .map(|p| {
                Ok(PlanFrom {
                    from: parse_range(&p.from)?,
                    steps: plan::parse_steps(&p.steps)?,
                })
            })
            .collect::<Result<_, ManifestError>>()?;
        let downgrade = self
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
            name: self.name,
            version,
            library: self.library,
            routes: self.routes,
            blocking: self.blocking,
            upgrade,
            downgrade,
        })
    }
}

fn invalid(why: String) -> ManifestError {
    ManifestError::Invalid(why)
}

/// `library` must be a bare file name: it is joined to the release
/// directory (and to cargo target directories), and a path would let a
/// manifest point anywhere on the machine.
fn check_library(library: &str) -> Result<(), ManifestError> {
    const BESIDE: &str = "library must be the file name of a .so beside release.toml";
    if library.is_empty() {
        return Err(invalid(format!("{BESIDE}; it is empty")));
    }
    if library.len() > MAX_LIBRARY {
        return Err(invalid(format!(
            "library is {} bytes; at most {MAX_LIBRARY} ({BESIDE})",
            library.len()
        )));
    }
    let why = if library.contains('/') {
        Some("not a path")
    } else if library == "." || library == ".." {
        Some("not . or ..")
    } else if library.chars().any(char::is_control) {
        Some("without control characters")
    } else if !library.ends_with(".so") {
        Some("ending in .so")
    } else {
        None
    };
    match why {
        Some(why) => Err(invalid(format!("{BESIDE}, {why}: {library:?}"))),
        None => Ok(()),
    }
}

fn check_routes(routes: &[String]) -> Result<(), ManifestError> {
    if routes.len() > MAX_ROUTES {
        return Err(invalid(format!(
            "{} routes; at most {MAX_ROUTES}",
            routes.len()
        )));
    }
    for route in routes {
        let len = route.chars().count();
        if len > MAX_ROUTE {
            return Err(invalid(format!(
                "a route is {len} characters; at most {MAX_ROUTE}"
            )));
        }
        if !route.starts_with('/') {
            return Err(invalid(format!("route {route:?} must start with '/'")));
        }
    }
    Ok(())
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
    fn a_recorded_manifest_is_read_under_the_rules_it_was_staged_with() {
        let old = "name = \"a\"\nversion = \"0.3.0\"\nlibrary = \"target/release/l.so\"\nroutes = [\"count\"]\n";
        assert!(Manifest::parse(old).is_err());
        let m = Manifest::parse_recorded(old).unwrap();
        assert_eq!(m.library, "target/release/l.so");
        assert!(
            Manifest::parse_recorded("name = \"a b\"\nversion = \"1\"\nlibrary = \"l.so\"\n")
                .is_err()
        );
    }
    use proptest::prelude::*;

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

    fn with(field: &str) -> String {
        format!("name = \"a\"\nversion = \"0.3.0\"\nlibrary = \"l.so\"\n{field}\n")
    }

    fn refused(text: &str, says: &str) {
        let err = Manifest::parse(text).unwrap_err();
        assert!(err.to_string().contains(says), "{err}");
        assert!(err.to_string().len() < 512, "the error quotes too much");
    }

    #[test]
    fn sizes_are_bounded() {
        refused(
            &format!("# {}\n{}", "x".repeat(MAX_MANIFEST), with("")),
            "at most 65536",
        );
        let version = format!("0.1.0-{}", "a".repeat(70_000 - 6));
        refused(
            &format!("name = \"a\"\nversion = \"{version}\"\nlibrary = \"l.so\"\n"),
            "at most",
        );
        let version = format!("0.1.0-{}", "a".repeat(59));
        refused(
            &format!("name = \"a\"\nversion = \"{version}\"\nlibrary = \"l.so\"\n"),
            "version is 65 characters; at most 64",
        );
        let version = format!("0.1.0-{}", "a".repeat(58));
        assert!(Manifest::parse(&format!(
            "name = \"a\"\nversion = \"{version}\"\nlibrary = \"l.so\"\n"
        ))
        .is_ok());
        let name = "n".repeat(65);
        refused(
            &format!("name = \"{name}\"\nversion = \"0.1.0\"\nlibrary = \"l.so\"\n"),
            "name is 65 characters",
        );
        refused(
            "name = \"\"\nversion = \"0.1.0\"\nlibrary = \"l.so\"\n",
            "non-empty",
        );
    }

    #[test]
    fn library_is_a_bare_file_name() {
        for bad in [
            "",
            "../../etc/evil.so",
            "/usr/lib/x.so",
            "sub/l.so",
            ".",
            "..",
            "l.so\\u0000",
            "l\\n.so",
            "libfoo.dylib",
            "l.so.1",
        ] {
            let text = format!("name = \"a\"\nversion = \"0.1.0\"\nlibrary = \"{bad}\"\n");
            refused(&text, "file name of a .so beside release.toml");
        }
        let long = format!("{}.so", "l".repeat(253));
        refused(
            &format!("name = \"a\"\nversion = \"0.1.0\"\nlibrary = \"{long}\"\n"),
            "at most 255",
        );
        let ok = format!("{}.so", "l".repeat(252));
        assert!(Manifest::parse(&format!(
            "name = \"a\"\nversion = \"0.1.0\"\nlibrary = \"{ok}\"\n"
        ))
        .is_ok());
        assert!(Manifest::parse(&with("")).is_ok());
    }

    #[test]
    fn routes_are_bounded() {
        assert!(Manifest::parse(&with("routes = [\"/\", \"/count\"]")).is_ok());
        refused(&with("routes = [\"count\"]"), "must start with '/'");
        let many = vec!["\"/\""; 257].join(",");
        refused(
            &with(&format!("routes = [{many}]")),
            "257 routes; at most 256",
        );
        let long = format!("\"/{}\"", "r".repeat(1024));
        refused(&with(&format!("routes = [{long}]")), "at most 1024");
    }

    #[test]
    fn plans_are_bounded() {
        let plan = "[[upgrade]]\nfrom = \"0.2.0\"\nsteps = [\"load\", \"switch\"]\n";
        assert!(Manifest::parse(&with(&plan.repeat(64))).is_ok());
        refused(&with(&plan.repeat(65)), "65 [[upgrade]] plans; at most 64");
        let hooks = vec!["\"hook:h\""; 31].join(",");
        let long =
            format!("[[downgrade]]\nto = \"0.2.0\"\nsteps = [\"load\", \"switch\", {hooks}]\n");
        refused(&with(&long), "33 steps; at most 32");
    }

    fn within_limits(m: &Manifest) -> bool {
        (1..=MAX_NAME).contains(&m.name.chars().count())
            && m.version.to_string().chars().count() <= MAX_VERSION
            && !m.library.contains('/')
            && m.library.ends_with(".so")
            && m.library.len() <= MAX_LIBRARY
            && m.routes.len() <= MAX_ROUTES
            && m.routes
                .iter()
                .all(|r| r.starts_with('/') && r.chars().count() <= MAX_ROUTE)
            && m.upgrade.len() <= MAX_PLANS
            && m.downgrade.len() <= MAX_PLANS
            && m.upgrade.iter().all(|p| p.steps.len() <= MAX_STEPS)
            && m.downgrade.iter().all(|p| p.steps.len() <= MAX_STEPS)
    }

    /// A TOML basic string holding `s` exactly.
    fn quoted(s: &str) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '"' | '\\' => {
                    out.push('\\');
                    out.push(c);
                }
                c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    fn list(items: &[String]) -> String {
        let quoted: Vec<String> = items.iter().map(|i| quoted(i)).collect();
        format!("[{}]", quoted.join(", "))
    }

    /// Manifests shaped like real ones, with each value often valid, often
    /// just past a limit, sometimes hostile; and a stray line now and then.
    fn manifest_text() -> impl Strategy<Value = String> {
        let name = prop_oneof![4 => "[a-z0-9_-]{1,70}", 1 => "[ -~]{0,10}"];
        let version = prop_oneof![
            4 => "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}",
            1 => "[0-9]\\.[0-9]\\.[0-9]-[a-z0-9]{55,62}",
            1 => "[ -~]{0,10}",
        ];
        let library = prop_oneof![
            6 => "[a-z0-9_]{1,20}\\.so",
            1 => "[a-z0-9_./]{0,20}\\.so",
            1 => "[a-z]{250,254}\\.so",
            1 => "\\PC{0,12}",
            1 => "[\\x00-\\x1f]{1,3}\\.so",
        ];
        let route = prop_oneof![
            50 => "/[a-z/]{0,10}",
            1 => "[a-z]{0,5}",
            1 => "/[a-z]{1020,1025}",
        ];
        let routes = prop_oneof![
            4 => proptest::collection::vec(route.clone(), 0..10),
            1 => proptest::collection::vec(route, 250..260),
        ];
        let step = prop_oneof![
            Just("migrate".to_owned()),
            Just("drain".to_owned()),
            "hook:[a-z]{1,5}",
        ];
        let steps = prop_oneof![
            3 => proptest::collection::vec(step.clone(), 0..5),
            1 => proptest::collection::vec(step, 25..40),
        ]
        .prop_map(|middle| {
            let mut steps = vec!["load".to_owned()];
            steps.extend(middle.into_iter().filter(|s| s.starts_with("hook:")));
            steps.push("switch".to_owned());
            steps
        });
        let plan = (proptest::bool::ANY, "0\\.[0-9]\\.[0-9]", steps);
        let plans = prop_oneof![
            4 => proptest::collection::vec(plan.clone(), 0..5),
            1 => proptest::collection::vec(plan, 60..70),
        ];
        let stray = proptest::option::weighted(0.1, "[ -~]{0,30}");
        (name, version, library, routes, plans, stray).prop_map(
            |(name, version, library, routes, plans, stray)| {
                let mut text = format!(
                    "name = {}\nversion = {}\nlibrary = {}\nroutes = {}\n",
                    quoted(&name),
                    quoted(&version),
                    quoted(&library),
                    list(&routes)
                );
                if let Some(stray) = stray {
                    text.push_str(&stray);
                    text.push('\n');
                }
                for (up, range, steps) in plans {
                    let (table, key) = if up {
                        ("upgrade", "from")
                    } else {
                        ("downgrade", "to")
                    };
                    text.push_str(&format!(
                        "[[{table}]]\n{key} = {}\nsteps = {}\n",
                        quoted(&range),
                        list(&steps)
                    ));
                }
                text
            },
        )
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(text in "(?s).{0,400}") {
            if let Ok(m) = Manifest::parse(&text) {
                proptest::prop_assert!(within_limits(&m));
            }
        }

        #[test]
        fn what_parses_is_within_limits(text in manifest_text()) {
            if let Ok(m) = Manifest::parse(&text) {
                proptest::prop_assert!(within_limits(&m), "{m:?}");
            }
        }

        #[test]
        fn valid_manifests_parse(
            name in "[a-zA-Z0-9_-]{1,64}",
            library in "[a-z0-9_]{1,20}\\.so",
            routes in proptest::collection::vec("/[a-z]{0,10}", 0..10),
        ) {
            let text = format!(
                "name = {name:?}\nversion = \"1.2.3\"\nlibrary = {library:?}\nroutes = {routes:?}\n"
            );
            let m = Manifest::parse(&text).unwrap();
            proptest::prop_assert_eq!(m.library, library);
            proptest::prop_assert_eq!(m.routes, routes);
        }
    }
}
