//! The catalog of releases the agent knows: staging (inspecting an upload
//! out of process, then recording the release and its library), removing,
//! pruning old releases beyond `--keep-old`, and collecting artifacts
//! nothing references.
//!
//! The catalog owns the artifacts ([`Catalog`]): the rest of the engine
//! opens a release's library, or asks for room, through it.

use std::sync::Arc;

use nine9s_host::{Library, LoadError};
use nine9s_manifest::{Manifest, Version};

use super::actor::Actor;
use super::journal::Origin;
use super::{machine, Reply};
use crate::artifacts::{Artifacts, Uploaded};
use crate::error::{Error, Reason, Result};
use crate::failpoint::crash_point;
use crate::model::{now_ms, Release, ReleaseState, TransitionKind};
use crate::probe;

/// Room kept free on the data dir's filesystem beyond what a stage writes:
/// the store must still be able to journal and checkpoint.
pub const FREE_SPACE_MARGIN: u64 = 16 * 1024 * 1024;

/// The releases' library files, content-addressed.
pub(super) struct Catalog {
    artifacts: Artifacts,
}

impl Catalog {
    pub(super) fn new(artifacts: Artifacts) -> Catalog {
        Catalog { artifacts }
    }

    /// See [`open`].
    pub(super) fn open(&self, release: &Release) -> Result<Arc<Library>> {
        open(&self.artifacts, release)
    }

    /// See [`verified`]: the file checked, and its path.
    pub(super) fn verified(&self, release: &Release) -> Result<std::path::PathBuf> {
        verified(&self.artifacts, release)?;
        Ok(self.artifacts.path(&release.sha256))
    }

    pub(super) fn free_space(&self) -> std::io::Result<u64> {
        self.artifacts.free_space()
    }
}

impl Actor {
    /// Records a release whose upload was checked ([`inspect`]): the same
    /// version with the same bytes again is a no-op, with other bytes a
    /// conflict.
    pub(super) fn stage(&mut self, staging: Staging, origin: &Origin) -> Result<Reply> {
        let Staging {
            manifest_toml,
            upload,
            state_version,
            signed,
        } = staging;
        let manifest = Manifest::parse(&manifest_toml)?;
        check_service(&manifest, &self.shared.service)?;
        let store = Arc::clone(&self.shared.journal.store);
        if let Some(existing) = store.release(&manifest.version)? {
            if existing.sha256 == upload.sha256 && existing.manifest == manifest_toml {
                // The same release again. If its artifact was damaged since
                // (a boot fell back past it), these bytes — checked against
                // the same digest, and probed — put it right.
                // Not on a read that timed out: hung storage is not mended
                // by writing to it from the engine's thread.
                let damaged = match self
                    .catalog
                    .artifacts
                    .verified(&existing.sha256, existing.size)
                {
                    Ok(verified) => verified.is_err(),
                    Err(e) => e.kind() != std::io::ErrorKind::TimedOut,
                };
                if damaged {
                    self.catalog
                        .artifacts
                        .repair(upload)
                        .map_err(Error::io("cannot repair the artifact"))?;
                    tracing::warn!(version = %existing.version, sha256 = %existing.sha256, "the release's artifact was damaged; staging it again repaired it");
                }
                return Ok(Reply::Staged {
                    release: existing,
                    already_staged: true,
                });
            }
            // The sample compiled into the agent, built again by cargo from
            // the same source: other bytes (another compiler invocation),
            // the same release. The one installed stays.
            if existing.manifest == manifest_toml
                && existing.sha256 == super::boot::embedded_sha256()
            {
                tracing::info!(version = %existing.version, "this release is the sample compiled into the agent, already installed: the one built in stays");
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
        let shared = Arc::clone(&self.shared);
        let guard =
            shared
                .journal
                .begin(TransitionKind::Stage, None, Some(&manifest.version), origin)?;
        crash_point("stage:begun");
        match register(
            &self.catalog.artifacts,
            &manifest,
            &manifest_toml,
            upload,
            state_version,
            signed,
        ) {
            Ok(release) => {
                crash_point("stage:checked");
                self.commit_event(
                    guard,
                    machine::Event::Staged {
                        version: release.version.clone(),
                    },
                    std::slice::from_ref(&release),
                )?;
                tracing::info!(version = %release.version, sha256 = %release.sha256, identity = ?origin.identity, "release staged");
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
        if self.is_canary(version) {
            return Err(Error::refused(
                Reason::ReleaseInUse,
                format!(
                    "{version} serves as the canary: drop it (`ctl rollback`) or promote it first"
                ),
            ));
        }
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

    /// Removes a release's record and snapshots, as a journalled transition:
    /// both go in its commit, so a crash before it leaves the release known.
    /// Its artifact goes with the next garbage collection.
    fn forget(&mut self, version: &Version, origin: &Origin) -> Result<()> {
        self.lifecycle.check_remove(version)?;
        let shared = Arc::clone(&self.shared);
        let guard = shared
            .journal
            .begin(TransitionKind::Remove, Some(version), None, origin)?;
        crash_point("remove:begun");
        self.commit_event(
            guard,
            machine::Event::Removed {
                version: version.clone(),
            },
            &[],
        )?;
        crash_point("remove:forgotten");
        Ok(())
    }

    /// Removes the oldest `old` releases beyond the configured number.
    /// Whether `version` serves as the canary: its record and artifact stay.
    fn is_canary(&self, version: &Version) -> bool {
        self.shared
            .runtime
            .canary()
            .is_some_and(|canary| canary.loaded.version == *version)
    }

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
            .filter(|v| Some(v) != target.as_ref() && !self.is_canary(v))
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
            .catalog
            .artifacts
            .collect_garbage(&keep)
            .map_err(Error::io("cannot collect unreferenced artifacts"))?;
        for sha in &removed {
            tracing::info!(sha256 = %sha, "unreferenced artifact deleted");
        }
        Ok(removed)
    }
}

/// An upload that passed every check, for the engine to record.
#[derive(Debug)]
pub struct Staging {
    pub manifest_toml: String,
    pub upload: Uploaded,
    /// What the probe found: the plugin's state version.
    pub state_version: u32,
    /// Who signed it, and the signature (see [`Release::signed_by`]).
    pub signed: Signed,
}

/// A release's signature as staged.
#[derive(Debug, Default)]
pub struct Signed {
    /// The id of the trusted key that signed it, or [`crate::model::BUILT_IN`].
    pub by: Option<String>,
    /// The `release.sig` text; empty for none.
    pub signature: String,
}

pub fn check_service(manifest: &Manifest, service: &str) -> Result<()> {
    if manifest.name != service {
        return Err(Error::refused(
            Reason::WrongService,
            format!(
                "this agent runs the service {service:?}; release.toml names {:?}",
                manifest.name
            ),
        ));
    }
    Ok(())
}

/// Checks that a complete upload is the plugin `manifest` says, without
/// ever opening it in this process: its ELF headers, then a throwaway
/// probe process. Blocks for up to the probe's time limit.
pub fn inspect(manifest: &Manifest, upload: &Uploaded) -> Result<probe::Report> {
    let refused = |why: String| {
        Error::InvalidArtifact(format!(
            "the library of {} {} was refused: {why}",
            manifest.name, manifest.version
        ))
    };
    let report = probe::probe(upload.path()).map_err(|e| match e {
        probe::ProbeError::Refused(why) => refused(why),
        probe::ProbeError::Failed(why) => Error::refused(
            Reason::Internal,
            format!(
                "cannot inspect {} {}: {why}",
                manifest.name, manifest.version
            ),
        ),
    })?;
    if report.name != manifest.name || report.version != manifest.version.to_string() {
        return Err(refused(format!(
            "release.toml says {} {}, but the library is {} {}",
            manifest.name, manifest.version, report.name, report.version
        )));
    }
    Ok(report)
}

/// Opens a recorded release's library in this process, after checking
/// that its bytes are still those it was staged (and probed) with.
pub(crate) fn open(artifacts: &Artifacts, release: &Release) -> Result<Arc<Library>> {
    let file = verified(artifacts, release)?;
    // Loaded from the descriptor just hashed, not by path again.
    let library = Library::open_file(file.into()).map_err(|source| Error::Load {
        version: release.version.clone(),
        source,
    })?;
    recorded_as(release, library.name(), library.version())?;
    Ok(library)
}

/// A recorded release's library file, open, once its bytes are checked to
/// be still those it was staged (and probed) with.
pub(crate) fn verified(artifacts: &Artifacts, release: &Release) -> Result<std::fs::File> {
    match artifacts.verified(&release.sha256, release.size) {
        Ok(Ok(file)) => Ok(file),
        Ok(Err(actual)) => Err(Error::Corrupt {
            version: release.version.clone(),
            expected: release.sha256.clone(),
            actual,
        }),
        Err(e) => Err(Error::Load {
            version: release.version.clone(),
            source: LoadError::NotALibrary {
                path: artifacts.path(&release.sha256),
                reason: e.to_string(),
            },
        }),
    }
}

/// Checks that a library that opened as `name` `version` is the release
/// recorded.
pub(crate) fn recorded_as(release: &Release, name: &str, version: &str) -> Result<()> {
    if version != release.version.to_string() || name != release.name {
        return Err(Error::InvalidArtifact(format!(
            "the library of {} {} says it is {name} {version}",
            release.name, release.version,
        )));
    }
    Ok(())
}

/// Moves the artifact in place and makes its release record.
pub(super) fn register(
    artifacts: &Artifacts,
    manifest: &Manifest,
    manifest_toml: &str,
    upload: Uploaded,
    state_version: u32,
    signed: Signed,
) -> Result<Release> {
    let (sha256, size) = (upload.sha256.clone(), upload.size);
    artifacts
        .adopt(upload)
        .map_err(Error::io("cannot store the artifact"))?;
    Ok(Release {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        state: ReleaseState::Staged,
        sha256,
        size,
        staged_at_ms: now_ms(),
        state_version,
        routes: manifest.routes.clone(),
        blocking: manifest.blocking,
        permanent_since_ms: None,
        manifest: manifest_toml.to_owned(),
        failure: None,
        signed_by: signed.by,
        signature: signed.signature,
    })
}
