//! Starting up: installing the bootstrap release on an empty data
//! directory, or resuming the permanent release with its last snapshot;
//! and registering a release's library (shared with staging).

use std::sync::Arc;
use std::time::Instant;

use nine9s_host::Library;
use nine9s_manifest::Manifest;

use super::finish;
use super::handoff::restore_carry;
use crate::artifacts::{sha256_hex, Artifacts};
use crate::config::Bootstrap;
use crate::error::{Error, Result};
use crate::model::{now_ms, Outcome, Release, ReleaseState, TransitionKind};
use crate::runtime::Loaded;
use crate::store::Store;

/// The sample release compiled into the agent (see build.rs).
const EMBEDDED_MANIFEST: &str = include_str!("../../../plugins/nine9s-0.1.0/release.toml");
const EMBEDDED_LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libnine9s_0_1_0.so"));

/// Writes the artifact and checks that it is the plugin the manifest says.
pub(super) fn register(
    store: &Store,
    artifacts: &Artifacts,
    manifest: &Manifest,
    manifest_toml: &str,
    bytes: &[u8],
) -> Result<(Release, Arc<Library>)> {
    let sha256 = sha256_hex(bytes);
    let path = artifacts
        .put(&sha256, bytes)
        .map_err(Error::io("cannot write the artifact"))?;
    let referenced = store.releases()?.iter().any(|r| r.sha256 == sha256);
    let discard = |e: Error| {
        if !referenced {
            let _ = artifacts.remove(&sha256);
        }
        e
    };
    let library = Library::open(&path).map_err(|e| {
        discard(Error::InvalidArtifact(format!(
            "{} {}: {e}",
            manifest.name, manifest.version
        )))
    })?;
    if library.name() != manifest.name || library.version() != manifest.version.to_string() {
        return Err(discard(Error::InvalidArtifact(format!(
            "release.toml says {} {}, but the library is {} {}",
            manifest.name,
            manifest.version,
            library.name(),
            library.version()
        ))));
    }
    let release = Release {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        state: ReleaseState::Staged,
        sha256,
        size: bytes.len() as u64,
        staged_at_ms: now_ms(),
        state_version: library.state_version(),
        routes: manifest.routes.clone(),
        blocking: manifest.blocking,
        permanent_since_ms: None,
        manifest: manifest_toml.to_owned(),
    };
    Ok((release, library))
}

/// First start on an empty data directory: installs the bootstrap release
/// as permanent.
pub(super) fn install(
    store: &Store,
    artifacts: &Artifacts,
    bootstrap: &Bootstrap,
) -> Result<(Loaded, String)> {
    let (manifest_toml, bytes) = match bootstrap {
        Bootstrap::Embedded => (EMBEDDED_MANIFEST.to_owned(), EMBEDDED_LIBRARY.to_vec()),
        Bootstrap::Dir(dir) => {
            let manifest = Manifest::read_dir(dir)?;
            let library =
                nine9s_manifest::locate_library(dir, &manifest).map_err(Error::InvalidArtifact)?;
            let text = std::fs::read_to_string(dir.join("release.toml"))
                .map_err(Error::io(format!("cannot read {}", dir.display())))?;
            let bytes = std::fs::read(&library)
                .map_err(Error::io(format!("cannot read {}", library.display())))?;
            (text, bytes)
        }
    };
    let manifest = Manifest::parse(&manifest_toml)?;
    let mut t = store.begin(
        TransitionKind::Install,
        None,
        Some(&manifest.version),
        false,
    )?;
    let started = Instant::now();
    let installed = register(store, artifacts, &manifest, &manifest_toml, &bytes).and_then(
        |(mut release, library)| {
            let instance = library.instantiate(None).map_err(|e| Error::Plugin {
                version: release.version.clone(),
                during: "init",
                source: e,
            })?;
            release.state = ReleaseState::Permanent;
            release.permanent_since_ms = Some(now_ms());
            Ok((release, instance))
        },
    );
    match installed {
        Ok((release, instance)) => {
            finish(&mut t, started, None);
            store.commit(&t, std::slice::from_ref(&release))?;
            tracing::info!(name = %release.name, version = %release.version, "installed the bootstrap release as permanent");
            Ok((
                Loaded::new(release.version, release.blocking, instance),
                release.name,
            ))
        }
        Err(e) => {
            finish(&mut t, started, Some(&e));
            store.commit(&t, &[])?;
            Err(e)
        }
    }
}

/// A restart: comes back on the permanent release with its last snapshot.
/// A release that was only current is demoted to old.
pub(super) fn resume(
    store: &Store,
    artifacts: &Artifacts,
    releases: &[Release],
    permanent: &Release,
) -> Result<(Loaded, String)> {
    let abandoned: Vec<Release> = releases
        .iter()
        .filter(|r| r.state == ReleaseState::Current)
        .map(|r| Release {
            state: ReleaseState::Old,
            ..r.clone()
        })
        .collect();
    let library =
        Library::open(&artifacts.path(&permanent.sha256)).map_err(|source| Error::Load {
            version: permanent.version.clone(),
            source,
        })?;
    let snapshot = store.last_snapshot(&permanent.version)?;
    let state = match &snapshot {
        // A release that keeps no state starts fresh, whatever was saved.
        Some(_) if library.state_version() == 0 => None,
        None => None,
        Some(s) => restore_carry(&library, s)?
            .apply(&s.bytes)
            .map_err(|e| Error::Plugin {
                version: permanent.version.clone(),
                during: "state migration",
                source: e,
            })?,
    };
    let instance = library
        .instantiate(state.as_deref())
        .map_err(|e| Error::Plugin {
            version: permanent.version.clone(),
            during: "init",
            source: e,
        })?;
    for current in &abandoned {
        let mut t = store.begin(
            TransitionKind::Restart,
            Some(&current.version),
            Some(&permanent.version),
            true,
        )?;
        t.outcome = Outcome::Ok;
        t.error = Some(format!(
            "the agent restarted while {} was current but not permanent; back on permanent {}",
            current.version, permanent.version
        ));
        store.commit(&t, std::slice::from_ref(current))?;
        tracing::warn!(current = %current.version, permanent = %permanent.version, "came back on the permanent release");
    }
    tracing::info!(
        version = %permanent.version,
        restored = snapshot.is_some(),
        "resumed the permanent release"
    );
    Ok((
        Loaded::new(permanent.version.clone(), permanent.blocking, instance),
        permanent.name.clone(),
    ))
}
