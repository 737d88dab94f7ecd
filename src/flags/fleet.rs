//! One flag state for a fleet of gateways: keeps this instance's overrides in step with the
//! database, and records the file's changes there once for the whole fleet.
//!
//! * **Overrides** are re-read when another instance (or the CLI) changes them — Postgres
//!   `NOTIFY tripgate_flags`, sent in the changing transaction — and every [`POLL`] as the
//!   backstop (a lost notification, SQLite's CLI in another process), so every instance
//!   serves a change within a second.
//! * **File changes**: each content the watcher swapped in is recorded, in order, through
//!   [`Storage::record_file_percent`], a compare-and-set on the fleet's last recorded
//!   percent: one entry however many instances see it, and the kill switch clears the
//!   override. While the database is down they wait here and the file still reloads.
//! * While the database cannot be reached, the last known state stays in force.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::{FlagsHandle, Override, Snapshot};
use crate::metrics::Metrics;
use crate::storage::Storage;
use crate::storage::flag_state::{
    AuditEntry, ChangeBy, FileLists, FileRecord, OverridePatch, OverrideRow, OverrideSet,
};

/// How often the overrides are re-read without a notification.
pub const POLL: Duration = Duration::from_millis(500);

/// Starts the sync until `shutdown` turns true.
pub fn spawn(
    handle: FlagsHandle,
    store: Storage,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let notified = Arc::new(Notify::new());
    store.forward_flag_changes(notified.clone());
    let file_changed = handle.file_changed();
    tokio::spawn(async move {
        // Whether reading the overrides, and recording the file's state, fail: each is
        // warned of once when it starts failing and told when it works again.
        let (mut reading_fails, mut recording_fails) = (false, false);
        loop {
            // The file's state first (a kill switch it records clears the override this
            // read then sees), but a record that keeps failing must not keep this instance
            // from the fleet's overrides: they are read all the same.
            let recorded = record_file_changes(&handle, &store).await;
            let read = refresh(&handle, &store, &metrics).await.map(|_| ());
            // Not migrated yet (a first start): no override to read, and the file's state
            // is recorded on a later round, once the migrations have run. A table missing
            // after them is a real failure, and warned of.
            let first_start = |e: &sqlx::Error| crate::storage::is_not_migrated(e) && !store.is_migrated();
            match read {
                Ok(()) if reading_fails => {
                    reading_fails = false;
                    tracing::info!("flag overrides readable again");
                }
                Err(e) if !reading_fails && !first_start(&e) => {
                    reading_fails = true;
                    tracing::warn!(error = %e, "cannot read the flag overrides; the last known flags stay in force");
                }
                _ => {}
            }
            match recorded {
                Ok(()) if recording_fails => {
                    recording_fails = false;
                    tracing::info!("the flags file's state recorded again");
                }
                Err(e) if !recording_fails && !first_start(&e) => {
                    recording_fails = true;
                    tracing::warn!(error = %e, "cannot record the flags file's state (changes of it are not audited, and its kill switch clears no override in the database, until it can)");
                }
                _ => {}
            }
            tokio::select! {
                _ = notified.notified() => {}
                _ = file_changed.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { return; }
                }
            }
        }
    })
}

/// Re-reads the overrides and swaps them in; true when they changed.
pub async fn refresh(handle: &FlagsHandle, store: &Storage, metrics: &Metrics) -> Result<bool, sqlx::Error> {
    let _one_at_a_time = handle.refreshing().await;
    let rows = store.flag_overrides().await?;
    let before = handle.snapshot();
    if !handle.set_overrides(overrides_of(&rows)) {
        return Ok(false);
    }
    let after = handle.snapshot();
    for row in &rows {
        if before.overrides.get(&row.flag) != after.overrides.get(&row.flag) {
            tracing::info!(
                flag = %row.flag,
                source = %row.source,
                actor = %row.actor,
                reason = %row.reason,
                active = row.active,
                percent = after.set.flags.get(&row.flag).map(|f| f.percent()),
                "flag override {}",
                if row.active { "in force" } else { "cleared" }
            );
            metrics.flag_changed(&row.flag, &row.source);
        }
    }
    report(metrics, &after);
    Ok(true)
}

/// Sets the flag gauges from `snapshot`: the percent in force, whether an override is.
pub fn report(metrics: &Metrics, snapshot: &Snapshot) {
    // The last load of either source: a file change made while an override holds is a
    // reload too (it is audited, not in force).
    metrics.flags_loaded(
        snapshot.percents(),
        snapshot.loaded_at_ms.max(snapshot.file_loaded_at_ms),
    );
    metrics.flags_overridden(snapshot.overridden());
}

/// The overrides in force among the stored rows.
pub fn overrides_of(rows: &[OverrideRow]) -> BTreeMap<String, Override> {
    rows.iter()
        .filter(|r| r.active)
        .map(|r| {
            (
                r.flag.clone(),
                Override {
                    threshold: r.percent_bp,
                    allow: r.allow.iter().cloned().collect(),
                    deny: r.deny.iter().cloned().collect(),
                    actor: r.actor.clone(),
                    source: r.source.clone(),
                    reason: r.reason.clone(),
                    at_ms: r.at,
                },
            )
        })
        .collect()
}

/// The flags file as the fleet last recorded it, for a gateway that starts while its own
/// file is bad or missing: the running gateways hold it as their last good flags (SPEC §4),
/// so this one serves the same cohorts instead of refusing to start. Without its `[guard]`
/// sections, which are not recorded: the guard waits for a good file. `Err` says why there
/// is nothing to stand in: no file recorded yet, or one recorded by the previous release
/// (its percent alone: the salt and lists are unknown, and guessing them would move drivers
/// between cohorts).
pub async fn last_recorded_file(store: &Storage) -> Result<super::FlagSet, String> {
    use crate::domain::TRIP_ACCEPT_FLAG;
    let none_yet = "no gateway has recorded a good flags file in the database yet";
    let rows = match store.recorded_file_flags().await {
        Ok(rows) => rows,
        // A first start: its migrations have not run yet.
        Err(e) if crate::storage::is_missing_table(&e) => return Err(none_yet.into()),
        // The previous release's database, before this release's migrations: a file it
        // recorded holds no salt and lists.
        Err(e) if crate::storage::is_not_migrated(&e) => {
            return Err(format!(
                "the database is not migrated to this release yet (the previous release records a flags file without its salt and lists): {e}"
            ));
        }
        Err(e) => {
            return Err(format!(
                "the fleet's last good flags could not be read from the database ({e})"
            ));
        }
    };
    let mut set = super::FlagSet::default();
    for (name, threshold, lists) in rows {
        let Some(lists) = lists else {
            if name == TRIP_ACCEPT_FLAG {
                return Err(format!(
                    "the database holds {name}'s percent from a previous release without its salt and lists"
                ));
            }
            // Another flag routes nothing: left out rather than guessed.
            continue;
        };
        set.flags.insert(
            name,
            super::Flag {
                threshold,
                salt: lists.salt,
                allow: lists.allow.into_iter().collect(),
                deny: lists.deny.into_iter().collect(),
                guard: None,
            },
        );
    }
    if !set.flags.contains_key(TRIP_ACCEPT_FLAG) {
        return Err(none_yet.into());
    }
    Ok(set)
}

/// Records, oldest first, each file content this instance loaded and has not recorded yet.
/// Stops at the first error (the rest wait for the next round, in order).
async fn record_file_changes(handle: &FlagsHandle, store: &Storage) -> Result<(), sqlx::Error> {
    while let Some(seen) = handle.next_file_seen() {
        for (flag, declared) in &seen.flags {
            let lists = FileLists {
                salt: declared.salt.clone(),
                allow: declared.allow.iter().cloned().collect(),
                deny: declared.deny.iter().cloned().collect(),
            };
            if let FileRecord::Recorded(recorded) = store
                .record_file_flag(flag, declared.threshold, Some(&lists), seen.at_ms)
                .await?
            {
                let (entry, cleared) = *recorded;
                tracing::info!(flag = %flag, from = ?entry.from, to = entry.to, in_force = entry.in_force, "flags file change recorded");
                if let Some(cleared) = cleared {
                    tracing::warn!(flag = %flag, override_percent = ?cleared.from, "kill switch: the flags file says 0; override cleared");
                }
            }
        }
        handle.file_seen_recorded();
    }
    Ok(())
}

/// Why an override could not be set or cleared.
#[derive(Debug, thiserror::Error)]
pub enum OverrideError {
    /// The flags file has no such flag.
    #[error("no flag {0:?} in the flags file")]
    UnknownFlag(String),
    /// The flags file says 0: the kill switch wins over any override.
    #[error("the flags file says {0} = 0 (the kill switch), which wins over any override; change the file first")]
    KillSwitch(String),
    /// A person changed the flag since the guard looked: people win.
    #[error("a person changed {0} since the guard looked; people win")]
    PeopleFirst(String),
    /// The database refused or cannot be reached; nothing changed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Sets `flag`'s override (API, CLI, console), given the percent the flags file declares
/// for it (`file_bp`, basis points; `None`: the file has no such flag): refused for a flag
/// the file does not have, and while the file's kill switch is on — this caller's copy's,
/// or the one the fleet's gateways last recorded.
pub async fn set_override(
    store: &Storage,
    file_bp: Option<u32>,
    flag: &str,
    patch: &OverridePatch,
    by: &ChangeBy,
) -> Result<AuditEntry, OverrideError> {
    set_override_unless_people(store, file_bp, flag, patch, by, None).await
}

/// [`set_override`] for the guard: also refused (`PeopleFirst`) when a person changed the
/// flag after `seen` (the newest change the guard accounted for; `None`: no condition).
pub async fn set_override_unless_people(
    store: &Storage,
    file_bp: Option<u32>,
    flag: &str,
    patch: &OverridePatch,
    by: &ChangeBy,
    seen: Option<i64>,
) -> Result<AuditEntry, OverrideError> {
    let declared = file_bp.ok_or_else(|| OverrideError::UnknownFlag(flag.to_owned()))?;
    if declared == 0 {
        return Err(OverrideError::KillSwitch(flag.to_owned()));
    }
    match store.set_flag_override(flag, patch, by, declared, seen).await? {
        OverrideSet::Set(set) => Ok(set.1),
        // The fleet's file says 0 (this caller's copy is behind or elsewhere).
        OverrideSet::KillSwitch => Err(OverrideError::KillSwitch(flag.to_owned())),
        OverrideSet::PeopleFirst => Err(OverrideError::PeopleFirst(flag.to_owned())),
    }
}

/// Clears `flag`'s override (`file_bp` as for [`set_override`]); `None` when there was
/// none in force.
pub async fn clear_override(
    store: &Storage,
    file_bp: Option<u32>,
    flag: &str,
    by: &ChangeBy,
) -> Result<Option<AuditEntry>, OverrideError> {
    let declared = file_bp.ok_or_else(|| OverrideError::UnknownFlag(flag.to_owned()))?;
    Ok(store.clear_flag_override(flag, by, declared).await?)
}
