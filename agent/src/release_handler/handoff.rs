//! How a switch crosses from one release to another: which plan it
//! follows (written in the newer release's manifest, or derived) and how
//! the state goes over (as is, migrated by one of the two libraries, or
//! not at all).

use std::sync::Arc;

use nine9s_host::{CallError, Library};
use nine9s_manifest::{Manifest, Plan, Version};

use crate::error::{Error, Reason, Result};
use crate::model::{Release, Snapshot};
use crate::probe::Carried;
use crate::runtime::Loaded;

/// How state crosses from the old release to the new one.
#[derive(Clone)]
pub(super) enum Carry {
    /// The new release starts fresh (one side keeps no state, or the plan
    /// has no migrate step).
    Fresh,
    /// Same state version: the snapshot is restored as is.
    Same,
    /// `library` migrates from one state version to the other.
    Migrate {
        library: Arc<Library>,
        from: u32,
        to: u32,
    },
}

impl Carry {
    pub(super) fn apply(&self, state: &[u8]) -> std::result::Result<Option<Vec<u8>>, CallError> {
        match self {
            Carry::Fresh => Ok(None),
            Carry::Same => Ok(Some(state.to_vec())),
            Carry::Migrate { library, from, to } => library.migrate(*from, *to, state).map(Some),
        }
    }

    /// Whose code a failed migration blames: the library that migrates.
    pub(super) fn migrator(&self, target: &Version) -> Version {
        match self {
            Carry::Migrate { library, .. } => {
                library.version().parse().unwrap_or_else(|_| target.clone())
            }
            Carry::Fresh | Carry::Same => target.clone(),
        }
    }

    /// The same, as the disposable rehearsal reports how it carried it.
    pub(super) fn carried(&self) -> Carried {
        match self {
            Carry::Fresh => Carried::Fresh,
            Carry::Same => Carried::Same,
            Carry::Migrate { library, from, to } => Carried::Migrated {
                from: *from,
                to: *to,
                name: library.name().to_owned(),
                version: library.version().to_owned(),
            },
        }
    }
}

/// How state crosses, in a plan report's words.
pub(super) fn describe(carried: &Carried) -> String {
    match carried {
        Carried::Fresh => "state: not carried (the new instance starts fresh)".into(),
        Carried::Same => "state: carried as is (same state version)".into(),
        Carried::Migrated {
            from,
            to,
            name,
            version,
        } => format!("state: migrated v{from} -> v{to} by {name} {version}"),
    }
}

/// The plan for going from one release to another: the one written in the
/// newer release's manifest for that pair, or the derived one.
pub(super) fn plan_for(from: &Release, to: &Release) -> Result<Plan> {
    let written = if to.version > from.version {
        Manifest::parse_recorded(&to.manifest)?
            .upgrade
            .into_iter()
            .find(|p| p.from.matches(&from.version))
            .map(|p| p.steps)
    } else {
        Manifest::parse_recorded(&from.manifest)?
            .downgrade
            .into_iter()
            .find(|p| p.to.matches(&to.version))
            .map(|p| p.steps)
    };
    Ok(match written {
        Some(steps) => Plan {
            origin: nine9s_manifest::PlanOrigin::Written,
            steps,
        },
        None => Plan::derived(),
    })
}

/// How state goes from the running instance to `library`: the newer of the
/// two libraries is asked first for a migration chain, then the older.
pub(super) fn carry_between(active: &Arc<Loaded>, library: &Arc<Library>) -> Result<Carry> {
    let old_library = active.instance.library();
    let (from, to) = (old_library.state_version(), library.state_version());
    if from == 0 || to == 0 {
        return Ok(Carry::Fresh);
    }
    if from == to {
        return Ok(Carry::Same);
    }
    let (newer, older) = if to > from {
        (library, old_library)
    } else {
        (old_library, library)
    };
    [newer, older]
        .into_iter()
        .find(|l| l.can_migrate(from, to))
        .map(|l| Carry::Migrate {
            library: Arc::clone(l),
            from,
            to,
        })
        .ok_or_else(|| Error::NoMigrationPath {
            from: active.version.clone(),
            from_state: from,
            to: library
                .version()
                .parse()
                .unwrap_or_else(|_| Version::new(0, 0, 0)),
            to_state: to,
        })
}

/// How a snapshot of the target's own release is restored into it.
pub(super) fn restore_carry(library: &Arc<Library>, snapshot: &Snapshot) -> Result<Carry> {
    let (from, to) = (snapshot.state_version, library.state_version());
    if from == to {
        Ok(Carry::Same)
    } else if library.can_migrate(from, to) {
        Ok(Carry::Migrate {
            library: Arc::clone(library),
            from,
            to,
        })
    } else {
        Err(unrestorable(snapshot, from, to))
    }
}

/// A stored snapshot of state version `from` that its release's library,
/// of state version `to`, cannot migrate.
pub(super) fn unrestorable(snapshot: &Snapshot, from: u32, to: u32) -> Error {
    Error::refused(
        Reason::NoMigrationPath,
        format!(
            "the snapshot of {} is state v{from}, its library wants v{to} and cannot migrate it",
            snapshot.version
        ),
    )
}

/// How the routes a release declares change from one release to another.
pub(super) fn route_changes(from: &[String], to: &[String]) -> String {
    let old_routes = from;
    let added: Vec<_> = to.iter().filter(|r| !old_routes.contains(r)).collect();
    let removed: Vec<_> = old_routes.iter().filter(|r| !to.contains(r)).collect();
    if added.is_empty() && removed.is_empty() {
        "routes: unchanged".into()
    } else {
        format!("routes: added {added:?}, removed {removed:?}")
    }
}
