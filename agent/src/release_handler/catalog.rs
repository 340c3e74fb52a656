//! The catalog of releases the agent knows: staging (checking and
//! recording a release and its library), removing, pruning old releases
//! beyond `--keep-old`, and collecting artifacts nothing references.

use std::sync::Arc;

use nine9s_host::Library;
use nine9s_manifest::{Manifest, Version};

use super::actor::Actor;
use super::journal::Origin;
use super::{machine, Reply};
use crate::artifacts::{sha256_hex, Artifacts};
use crate::error::{Error, Reason, Result};
use crate::failpoint::crash_point;
use crate::model::{now_ms, Release, ReleaseState, TransitionKind};
use crate::store::Store;

/// Room kept free on the data dir's filesystem beyond what a stage writes:
/// the store must still be able to journal and checkpoint.
pub(super) const FREE_SPACE_MARGIN: u64 = 16 * 1024 * 1024;

impl Actor {
    /// Checks and records a release: the manifest, the digest, free space,
    /// and that the library is a nine9s plugin of the right name and
    /// version. Staging the same version with the same bytes again is a
    /// no-op.
    pub(super) fn stage(
        &mut self,
        manifest_toml: &str,
        sha256: &str,
        bytes: &[u8],
        origin: &Origin,
    ) -> Result<Reply> {
        let manifest = Manifest::parse(manifest_toml)?;
        if manifest.name != self.shared.service {
            return Err(Error::refused(
                Reason::WrongService,
                format!(
                    "this agent runs the service {:?}; release.toml names {:?}",
                    self.shared.service, manifest.name
                ),
            ));
        }
        let actual = sha256_hex(bytes);
        if !actual.eq_ignore_ascii_case(sha256) {
            return Err(Error::InvalidArtifact(format!(
                "the upload is corrupt: sha256 {actual} ({} bytes), but the header says {sha256}",
                bytes.len()
            )));
        }
        let store = Arc::clone(&self.shared.journal.store);
        if let Some(existing) = store.release(&manifest.version)? {
            if existing.sha256 == actual && existing.manifest == manifest_toml {
                return Ok(Reply::Staged {
                    release: existing,
                    already_staged: true,
                });
            }
            return Err(Error::refused(
                Reason::VersionConflict,
                format!(
                    "{} {} is already staged with other contents (sha256 {}); remove it first or give the new build another version",
                    manifest.name, manifest.version, existing.sha256
                ),
            ));
        }
        let free = self
            .artifacts
            .free_space()
            .map_err(Error::io("cannot read the free space of the data dir"))?;
        let needed = bytes.len() as u64 + FREE_SPACE_MARGIN;
        if free < needed {
            return Err(Error::refused(
                Reason::DiskFull,
                format!(
                    "not enough free space in the data dir to stage {} {}: {} MiB free, {} MiB needed (the library plus {} MiB kept for the store)",
                    manifest.name,
                    manifest.version,
                    free / (1024 * 1024),
                    needed.div_ceil(1024 * 1024),
                    FREE_SPACE_MARGIN / (1024 * 1024)
                ),
            ));
        }
        let shared = Arc::clone(&self.shared);
        let guard =
            shared
                .journal
                .begin(TransitionKind::Stage, None, Some(&manifest.version), origin)?;
        crash_point("stage:begun");
        match register(&store, &self.artifacts, &manifest, manifest_toml, bytes) {
            Ok((release, _library)) => {
                crash_point("stage:checked");
                self.commit_event(
                    guard,
                    machine::Event::Staged {
                        version: release.version.clone(),
                    },
                    std::slice::from_ref(&release),
                )?;
                tracing::info!(version = %release.version, sha256 = %release.sha256, "release staged");
                Ok(Reply::Staged {
                    release,
                    already_staged: false,
                })
            }
            Err(e) => Err(guard.fail(e, &Default::default())),
        }
    }

    /// Forgets a release (not the permanent, current or active one) and
    /// deletes artifacts no release references.
    pub(super) fn remove(&mut self, version: &Version, origin: &Origin) -> Result<Reply> {
        self.lifecycle.check_remove(version)?;
        let release = self
            .shared
            .store()
            .release(version)?
            .ok_or_else(|| Error::UnknownVersion(version.clone()))?;
        self.forget(version, origin)?;
        let collected = self.collect_garbage()?;
        tracing::info!(%version, "release removed");
        Ok(Reply::Removed {
            release: Some(release),
            collected,
        })
    }

    /// Removes a release's record and snapshots, as a journalled transition.
    /// Its artifact goes with the next garbage collection.
    fn forget(&mut self, version: &Version, origin: &Origin) -> Result<()> {
        self.lifecycle.check_remove(version)?;
        let shared = Arc::clone(&self.shared);
        let guard = shared
            .journal
            .begin(TransitionKind::Remove, Some(version), None, origin)?;
        crash_point("remove:begun");
        // Snapshots first: a failure between the two leaves the release
        // listed, as the lifecycle still has it.
        let store = shared.store();
        if let Err(e) = store
            .remove_snapshots(version)
            .and_then(|()| store.remove_release(version))
        {
            return Err(guard.fail(e.into(), &Default::default()));
        }
        crash_point("remove:forgotten");
        self.commit_event(
            guard,
            machine::Event::Removed {
                version: version.clone(),
            },
            &[],
        )?;
        Ok(())
    }

    /// Removes the oldest `old` releases beyond the configured number.
    pub(super) fn prune_old(&mut self) -> Result<()> {
        let mut old: Vec<(Option<i64>, Version)> = self
            .lifecycle
            .versions()
            .filter_map(|v| {
                let entry = self.lifecycle.entry(v)?;
                (entry.state == ReleaseState::Old).then(|| (entry.permanent_since_ms, v.clone()))
            })
            .collect();
        // Least recently permanent first (never permanent, or rolled back
        // from, before all); the rollback target is never pruned.
        old.sort();
        let keep = self.shared.config.keep_old;
        let excess = old.len().saturating_sub(keep);
        let target = self.lifecycle.rollback_target().ok();
        let doomed: Vec<Version> = old
            .into_iter()
            .map(|(_, v)| v)
            .filter(|v| Some(v) != target.as_ref())
            .take(excess)
            .collect();
        for version in &doomed {
            let origin = Origin::automatic(format!("more than {keep} old releases are kept"));
            self.forget(version, &origin)?;
            tracing::info!(%version, keep, "old release pruned");
        }
        if excess > 0 {
            self.collect_garbage()?;
        }
        Ok(())
    }

    pub(super) fn collect_garbage(&self) -> Result<Vec<String>> {
        let releases = self.shared.store().releases()?;
        let keep: Vec<&str> = releases.iter().map(|r| r.sha256.as_str()).collect();
        let removed = self
            .artifacts
            .collect_garbage(&keep)
            .map_err(Error::io("cannot collect unreferenced artifacts"))?;
        for sha in &removed {
            tracing::info!(sha256 = %sha, "unreferenced artifact deleted");
        }
        Ok(removed)
    }
}

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
        failure: None,
    };
    Ok((release, library))
}
