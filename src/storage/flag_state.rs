//! The fleet-wide flag state: the override (`flag_overrides`) people and the guard set, in
//! force on every instance until cleared; the flags file's percent as the fleet last saw it
//! (`flag_file_state`), so a file change is audited once however many instances see it; and
//! the change log (`flag_audit`). Percentages are stored in basis points.
//!
//! Every change and its audit entry commit in one transaction, which on Postgres also
//! sends `NOTIFY tripgate_flags` (delivered at commit) so every instance reloads at once.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{Any, FromRow, Row, Transaction};

use super::{Storage, get_bool};

/// A flag's override as stored. A cleared override stays as a tombstone (`active` false)
/// naming who cleared it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverrideRow {
    /// Flag name.
    pub flag: String,
    /// In force until cleared; false once cleared.
    pub active: bool,
    /// The percent in basis points; `None` keeps the file's.
    pub percent_bp: Option<u32>,
    /// Driver ids added to the file's allow list.
    pub allow: Vec<String>,
    /// Driver ids added to the file's deny list.
    pub deny: Vec<String>,
    /// Who set it (or, once cleared, who cleared it).
    pub actor: String,
    /// api | cli | console | file | guard
    pub source: String,
    /// Why.
    pub reason: String,
    /// When (ms).
    pub at: i64,
}

impl FromRow<'_, AnyRow> for OverrideRow {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            flag: r.try_get("flag")?,
            active: get_bool(r, "active")?,
            percent_bp: r.try_get::<Option<i64>, _>("percent_bp")?.map(|bp| bp as u32),
            allow: ids(r, "allow_ids")?.unwrap_or_default(),
            deny: ids(r, "deny_ids")?.unwrap_or_default(),
            actor: r.try_get("actor")?,
            source: r.try_get("source")?,
            reason: r.try_get("reason")?,
            at: r.try_get("at")?,
        })
    }
}

/// What setting an override changes; `None` keeps the override's current value (or, with
/// no override in force, the file's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverridePatch {
    /// New percent in basis points.
    pub percent_bp: Option<u32>,
    /// New allow additions.
    pub allow: Option<Vec<String>>,
    /// New deny additions.
    pub deny: Option<Vec<String>>,
}

/// Who makes a change, through which door, why and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeBy {
    /// A person (an admin token's subject, the CLI's user) or `file` / `guard`.
    pub actor: String,
    /// api | cli | console | file | guard
    pub source: String,
    /// Why (may be empty).
    pub reason: String,
    /// When (ms).
    pub at: i64,
}

/// One entry of the change log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    /// When the change took effect (ms).
    pub at: i64,
    /// Token subject, the CLI's user, `file` or `guard`.
    pub actor: String,
    /// api | cli | console | file | guard
    pub source: String,
    /// file (the flags file changed) | set | clear (an override) | hold (the guard kept the
    /// percent on a fail) | write (a file write through the API or CLI, before overrides
    /// existed)
    pub action: String,
    /// Flag name.
    pub flag: String,
    /// Percent before (for a file change: the file's; otherwise the one in force). None
    /// when the flag is new.
    pub from: Option<f64>,
    /// Percent after.
    pub to: f64,
    /// Why.
    pub reason: String,
    /// False for a file change made while an override held (the override stayed in force).
    pub in_force: bool,
    /// An override's allow additions (set only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    /// An override's deny additions (set only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deny: Option<Vec<String>>,
}

impl FromRow<'_, AnyRow> for AuditEntry {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            at: r.try_get("at")?,
            actor: r.try_get("actor")?,
            source: r.try_get("source")?,
            action: r.try_get("action")?,
            flag: r.try_get("flag")?,
            from: r.try_get::<Option<i64>, _>("from_bp")?.map(bp_to_percent),
            to: bp_to_percent(r.try_get("to_bp")?),
            reason: r.try_get("reason")?,
            in_force: get_bool(r, "in_force")?,
            allow: ids(r, "allow_ids")?,
            deny: ids(r, "deny_ids")?,
        })
    }
}

/// What recording the file's percent found.
#[derive(Debug, Clone, PartialEq)]
pub enum FileRecord {
    /// The first time the fleet sees this flag: its percent is the baseline, not a change.
    Baseline,
    /// Another instance already recorded this percent (or nothing changed), or a later
    /// one: what this instance saw is superseded.
    AlreadyRecorded,
    /// This call recorded the change; with the kill switch (`to` 0) it also cleared the
    /// override in force, recorded as the second entry.
    Recorded(Box<(AuditEntry, Option<AuditEntry>)>),
}

/// What [`Storage::set_flag_override`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum OverrideSet {
    /// Set: the override now in force and its audit entry.
    Set(Box<(OverrideRow, AuditEntry)>),
    /// Refused: the fleet's flags file says 0 (the kill switch).
    KillSwitch,
    /// Refused: a person changed the flag after what the caller accounted for.
    PeopleFirst,
}

/// Who the flags file puts in which cohort besides its percent: the hash's salt (a new one
/// reshuffles every cohort) and the allow and deny lists (sorted). Recorded with the
/// percent, so a change to them is audited as one to the percent is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FileLists {
    /// The hash's salt.
    pub salt: String,
    /// Driver ids always on atomic_async.
    pub allow: Vec<String>,
    /// Driver ids always on legacy.
    pub deny: Vec<String>,
}

impl FileLists {
    /// What changed from `before`, for the audit's reason; empty when nothing did.
    fn changes_from(&self, before: &Self) -> String {
        let mut what = Vec::new();
        if self.salt != before.salt {
            what.push(format!("salt {:?} -> {:?}: cohorts reshuffled", before.salt, self.salt));
        }
        for (name, now, then) in [
            ("allow", &self.allow, &before.allow),
            ("deny", &self.deny, &before.deny),
        ] {
            let added: Vec<&String> = now.iter().filter(|id| !then.contains(id)).collect();
            let removed: Vec<&String> = then.iter().filter(|id| !now.contains(id)).collect();
            if !added.is_empty() || !removed.is_empty() {
                what.push(format!("{name} list: added {added:?}, removed {removed:?}"));
            }
        }
        what.join("; ")
    }
}

const OVERRIDE_COLUMNS: &str = "flag, active, percent_bp, allow_ids, deny_ids, actor, source, reason, at";

impl Storage {
    /// Every flag's override row (tombstones included).
    pub async fn flag_overrides(&self) -> Result<Vec<OverrideRow>, sqlx::Error> {
        sqlx::query_as(&format!("SELECT {OVERRIDE_COLUMNS} FROM flag_overrides ORDER BY flag"))
            .fetch_all(&mut *self.conn().await?)
            .await
    }

    /// Sets (or changes) `flag`'s override by `patch` and audits it, in one transaction.
    /// `file_bp` is the caller's file's percent (for the entry's `from`/`to` where the
    /// override keeps the file's; the fleet's recorded one, if any, stands instead).
    /// Returns the override now in force and its entry, or why it changed nothing: the
    /// fleet's recorded file percent is 0 (the kill switch), or — given `people_after`, the
    /// newest change the caller (the guard) has accounted for — a person (API, CLI,
    /// console) changed the flag since: people win over the guard, which looked before
    /// their change committed.
    pub async fn set_flag_override(
        &self,
        flag: &str,
        patch: &OverridePatch,
        by: &ChangeBy,
        file_bp: u32,
        people_after: Option<i64>,
    ) -> Result<OverrideSet, sqlx::Error> {
        let mut tx = self.begin().await?;
        // The file the fleet's gateways hold, as they last recorded it, over the caller's
        // copy (a CLI host's stale checkout, an instance that has not reloaded yet): its
        // kill switch refuses the override (`KillSwitch`) — else the override would wait,
        // recorded as in force while it was not, and take over when the file rose again.
        // Read under the lock a file change takes on that row: a kill switch being recorded
        // is waited for (and refuses this), and one recorded after this commits sees the
        // override (and clears it) — also the first override of the flag, whose row a
        // concurrent record could not see, let alone lock, before this commits.
        let recorded: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT percent_bp FROM flag_file_state WHERE flag = $1 {}",
            self.dialect.lock_rows()
        ))
        .bind(flag)
        .fetch_optional(&mut *tx)
        .await?;
        let file_bp = match recorded.map(u32::try_from) {
            Some(Ok(0)) => return Ok(OverrideSet::KillSwitch),
            Some(Ok(bp)) => bp,
            _ => file_bp,
        };
        // (That row first, then the override's, as a file change takes them: no deadlock.)
        // A row to lock even for the flag's first override (as a cleared one, which no one
        // sees: this transaction overwrites it): two first sets at once then go one after
        // the other, so neither loses the other's fields and each entry's `from` is what
        // was in force before it. (On Postgres a lock on a row that does not exist yet
        // locks nothing; on SQLite writers are one at a time anyway.)
        sqlx::query(
            "INSERT INTO flag_overrides (flag, active, actor, source, reason, at) \
             VALUES ($1, FALSE, $2, $3, '', $4) ON CONFLICT (flag) DO NOTHING",
        )
        .bind(flag)
        .bind(&by.actor)
        .bind(&by.source)
        .bind(by.at)
        .execute(&mut *tx)
        .await?;
        let current: Option<OverrideRow> = sqlx::query_as(&format!(
            "SELECT {OVERRIDE_COLUMNS} FROM flag_overrides WHERE flag = $1 {}",
            self.dialect.lock_rows()
        ))
        .bind(flag)
        .fetch_optional(&mut *tx)
        .await?;
        // A person's change commits under the same row lock as this one, so it is either
        // seen here or made after this commits (and then pauses the guard on its own).
        if let Some(seen) = people_after {
            let newer: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM flag_audit WHERE flag = $1 AND id > $2 AND in_force = TRUE \
                   AND source IN ('api', 'cli', 'console')",
            )
            .bind(flag)
            .bind(seen)
            .fetch_one(&mut *tx)
            .await?;
            if newer > 0 {
                return Ok(OverrideSet::PeopleFirst);
            }
        }
        let base = current.filter(|o| o.active);
        let row = OverrideRow {
            flag: flag.to_owned(),
            active: true,
            percent_bp: patch.percent_bp.or(base.as_ref().and_then(|o| o.percent_bp)),
            allow: patch
                .allow
                .clone()
                .or_else(|| base.as_ref().map(|o| o.allow.clone()))
                .unwrap_or_default(),
            deny: patch
                .deny
                .clone()
                .or_else(|| base.as_ref().map(|o| o.deny.clone()))
                .unwrap_or_default(),
            actor: by.actor.clone(),
            source: by.source.clone(),
            reason: by.reason.clone(),
            at: by.at,
        };
        sqlx::query(
            "INSERT INTO flag_overrides (flag, active, percent_bp, allow_ids, deny_ids, actor, source, reason, at) \
             VALUES ($1, TRUE, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (flag) DO UPDATE SET active = TRUE, percent_bp = excluded.percent_bp, \
             allow_ids = excluded.allow_ids, deny_ids = excluded.deny_ids, actor = excluded.actor, \
             source = excluded.source, reason = excluded.reason, at = excluded.at",
        )
        .bind(flag)
        .bind(row.percent_bp.map(i64::from))
        .bind(ids_json(&row.allow))
        .bind(ids_json(&row.deny))
        .bind(&row.actor)
        .bind(&row.source)
        .bind(&row.reason)
        .bind(row.at)
        .execute(&mut *tx)
        .await?;
        let entry = AuditEntry {
            at: by.at,
            actor: by.actor.clone(),
            source: by.source.clone(),
            action: "set".into(),
            flag: flag.to_owned(),
            from: Some(bp_to_percent(base.and_then(|o| o.percent_bp).unwrap_or(file_bp).into())),
            to: bp_to_percent(row.percent_bp.unwrap_or(file_bp).into()),
            reason: by.reason.clone(),
            in_force: true,
            allow: Some(row.allow.clone()),
            deny: Some(row.deny.clone()),
        };
        insert_entry(&mut tx, &entry).await?;
        self.notify_flags(&mut tx).await?;
        tx.commit().await?;
        Ok(OverrideSet::Set(Box::new((row, entry))))
    }

    /// Clears `flag`'s override, if one is in force, and audits it, in one transaction.
    /// `file_bp` is the file's percent, in force again. `None` when there was none.
    pub async fn clear_flag_override(
        &self,
        flag: &str,
        by: &ChangeBy,
        file_bp: u32,
    ) -> Result<Option<AuditEntry>, sqlx::Error> {
        let mut tx = self.begin().await?;
        let entry = clear_in(&mut tx, flag, by, file_bp).await?;
        if entry.is_some() {
            self.notify_flags(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(entry)
    }

    /// The percent (basis points) the fleet last recorded from its flags file for `flag`:
    /// the file the running gateways hold as their last good one. `None` before any gateway
    /// has recorded it.
    pub async fn recorded_file_percent(&self, flag: &str) -> Result<Option<u32>, sqlx::Error> {
        let bp: Option<i64> = sqlx::query_scalar("SELECT percent_bp FROM flag_file_state WHERE flag = $1")
            .bind(flag)
            .fetch_optional(&mut *self.conn().await?)
            .await?;
        Ok(bp.and_then(|bp| u32::try_from(bp).ok()))
    }

    /// Every flag the fleet last recorded from its flags file: name, percent (basis points)
    /// and salt and lists (`None` where the previous release recorded the percent alone) —
    /// the file the running gateways hold as their last good one.
    pub async fn recorded_file_flags(&self) -> Result<Vec<(String, u32, Option<FileLists>)>, sqlx::Error> {
        let rows: Vec<(String, i64, Option<String>)> =
            sqlx::query_as("SELECT flag, percent_bp, lists FROM flag_file_state ORDER BY flag")
                .fetch_all(&mut *self.conn().await?)
                .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(flag, bp, lists)| {
                let lists = lists.as_deref().and_then(|l| serde_json::from_str(l).ok());
                Some((flag, u32::try_from(bp).ok()?, lists))
            })
            .collect())
    }

    /// [`Storage::record_file_flag`] without the lists (as the previous release recorded).
    pub async fn record_file_percent(&self, flag: &str, percent_bp: u32, at: i64) -> Result<FileRecord, sqlx::Error> {
        self.record_file_flag(flag, percent_bp, None, at).await
    }

    /// Records that this instance's flags file says `percent_bp` and `lists` for `flag`, as
    /// seen at `at`: a compare-and-set on the fleet's last recorded file, so N instances
    /// seeing the same change record it once, while a change A → B → A is two entries. A
    /// change to 0 (the kill switch) also clears the override in force. A change of the
    /// lists alone is an entry of its own (`from` = `to`, what changed in the reason, in
    /// force at once: an override adds lists to the file's, and the salt is the file's);
    /// lists not recorded yet (`NULL`: the previous release's instances record none) are
    /// taken as they are, without an entry.
    pub async fn record_file_flag(
        &self,
        flag: &str,
        percent_bp: u32,
        lists: Option<&FileLists>,
        at: i64,
    ) -> Result<FileRecord, sqlx::Error> {
        let lists_json = lists.and_then(|l| serde_json::to_string(l).ok());
        let mut tx = self.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO flag_file_state (flag, percent_bp, at, lists) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (flag) DO NOTHING",
        )
        .bind(flag)
        .bind(i64::from(percent_bp))
        .bind(at)
        .bind(lists_json.as_deref())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 1 {
            tx.commit().await?;
            return Ok(FileRecord::Baseline);
        }
        let (recorded, recorded_at, recorded_lists): (i64, i64, Option<String>) = sqlx::query_as(&format!(
            "SELECT percent_bp, at, lists FROM flag_file_state WHERE flag = $1 {}",
            self.dialect.lock_rows()
        ))
        .bind(flag)
        .fetch_one(&mut *tx)
        .await?;
        let before: Option<FileLists> = recorded_lists.as_deref().and_then(|l| serde_json::from_str(l).ok());
        let lists_change = match (lists, &before) {
            (Some(now), Some(before)) => now.changes_from(before),
            _ => String::new(),
        };
        let percent_changed = recorded != i64::from(percent_bp);
        // Nothing changed, or what this instance saw is older than the change the fleet
        // recorded last: an instance that was cut off from the database while the file went
        // 20 → 0 → 20 comes back with both, which the others recorded meanwhile (the
        // percent alone would take its 0 for a new change away from the 20).
        if (!percent_changed && lists_change.is_empty()) || at <= recorded_at {
            if before.is_none() && lists_json.is_some() && at > recorded_at {
                sqlx::query("UPDATE flag_file_state SET lists = $2 WHERE flag = $1 AND lists IS NULL")
                    .bind(flag)
                    .bind(lists_json.as_deref())
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            return Ok(FileRecord::AlreadyRecorded);
        }
        // A record without lists (the previous release's) of a new percent leaves none: the
        // salt and lists recorded before may not be what that file says.
        sqlx::query("UPDATE flag_file_state SET percent_bp = $2, at = $3, lists = $4 WHERE flag = $1")
            .bind(flag)
            .bind(i64::from(percent_bp))
            .bind(at)
            .bind(lists_json.as_deref())
            .execute(&mut *tx)
            .await?;
        // An active override, and whether it holds a percent (one of lists only keeps the
        // file's percent in force).
        let (overridden, percent_overridden): (i64, i64) =
            sqlx::query_as("SELECT COUNT(*), COUNT(percent_bp) FROM flag_overrides WHERE flag = $1 AND active = TRUE")
                .bind(flag)
                .fetch_one(&mut *tx)
                .await?;
        let (overridden, percent_overridden) = (overridden > 0, percent_overridden > 0);
        let kill_switch = percent_changed && percent_bp == 0;
        let file = ChangeBy {
            actor: "file".into(),
            source: "file".into(),
            reason: if kill_switch {
                "kill switch: the flags file says 0".into()
            } else {
                String::new()
            },
            at,
        };
        let entry = |from: i64, reason: String, in_force: bool, lists: Option<&FileLists>| AuditEntry {
            at,
            actor: file.actor.clone(),
            source: file.source.clone(),
            action: "file".into(),
            flag: flag.to_owned(),
            from: Some(bp_to_percent(from)),
            to: bp_to_percent(percent_bp.into()),
            reason,
            in_force,
            allow: lists.map(|l| l.allow.clone()),
            deny: lists.map(|l| l.deny.clone()),
        };
        let mut entries = Vec::new();
        if percent_changed {
            // Under an override the file's percent is not what is in force; its kill switch
            // is, through the override's clearing (the next entry, from the override's
            // percent): the change in force is recorded once.
            entries.push(entry(recorded, file.reason.clone(), !percent_overridden, None));
        }
        if !lists_change.is_empty() {
            let from = if percent_changed { percent_bp.into() } else { recorded };
            entries.push(entry(from, lists_change, true, lists));
        }
        for e in &entries {
            insert_entry(&mut tx, e).await?;
        }
        let cleared = if kill_switch && overridden {
            clear_in(&mut tx, flag, &file, 0).await?
        } else {
            None
        };
        if cleared.is_some() {
            self.notify_flags(&mut tx).await?;
        }
        tx.commit().await?;
        let first = entries
            .into_iter()
            .next()
            .ok_or_else(|| sqlx::Error::Protocol("no change to record".into()))?;
        Ok(FileRecord::Recorded(Box::new((first, cleared))))
    }

    /// Records that the guard latched a fail and kept `flag` at `percent_bp` (`on_fail =
    /// "hold"`: nothing changes, but the decision is on the record).
    pub async fn record_guard_hold(&self, flag: &str, percent_bp: u32, by: &ChangeBy) -> Result<(), sqlx::Error> {
        let mut tx = self.begin().await?;
        let percent = bp_to_percent(percent_bp.into());
        insert_entry(
            &mut tx,
            &AuditEntry {
                at: by.at,
                actor: by.actor.clone(),
                source: by.source.clone(),
                action: "hold".into(),
                flag: flag.to_owned(),
                from: Some(percent),
                to: percent,
                reason: by.reason.clone(),
                in_force: true,
                allow: None,
                deny: None,
            },
        )
        .await?;
        tx.commit().await
    }

    /// The newest `limit` entries of the change log, oldest first.
    pub async fn flag_audit(&self, limit: i64) -> Result<Vec<AuditEntry>, sqlx::Error> {
        let mut newest: Vec<AuditEntry> = sqlx::query_as(&format!(
            "SELECT {AUDIT_COLUMNS} FROM flag_audit ORDER BY id DESC LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&mut *self.conn().await?)
        .await?;
        newest.reverse();
        Ok(newest)
    }

    /// The last change of `flag` that took effect (a file change while an override held
    /// did not): what put the percent in force where it is.
    pub async fn last_flag_change(&self, flag: &str) -> Result<Option<AuditEntry>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {AUDIT_COLUMNS} FROM flag_audit WHERE flag = $1 AND in_force = TRUE ORDER BY id DESC LIMIT 1"
        ))
        .bind(flag)
        .fetch_optional(&mut *self.conn().await?)
        .await
    }

    /// The newest change of `flag` in force (`flag_audit.id`), and the newest of those after
    /// `seen` that a person made (source api, cli or console), with its id: what the guard
    /// has not accounted for yet.
    pub async fn flag_changes_since(
        &self,
        flag: &str,
        seen: i64,
    ) -> Result<(Option<i64>, Option<(i64, AuditEntry)>), sqlx::Error> {
        let mut conn = self.conn().await?;
        let newest: Option<i64> =
            sqlx::query_scalar("SELECT MAX(id) FROM flag_audit WHERE flag = $1 AND in_force = TRUE")
                .bind(flag)
                .fetch_one(&mut *conn)
                .await?;
        let row = sqlx::query(&format!(
            "SELECT id, {AUDIT_COLUMNS} FROM flag_audit WHERE flag = $1 AND in_force = TRUE AND id > $2 \
               AND source IN ('api', 'cli', 'console') ORDER BY id DESC LIMIT 1"
        ))
        .bind(flag)
        .bind(seen)
        .fetch_optional(&mut *conn)
        .await?;
        let by_person = match row {
            Some(r) => Some((r.try_get::<i64, _>("id")?, AuditEntry::from_row(&r)?)),
            None => None,
        };
        Ok((newest, by_person))
    }

    /// Starts forwarding other instances' flag changes into `wake` (Postgres `LISTEN`).
    pub fn forward_flag_changes(&self, wake: std::sync::Arc<tokio::sync::Notify>) {
        self.dialect
            .forward_notifications(&self.url, super::dialect::FLAGS_CHANNEL, wake);
    }

    /// Tells every instance the flags changed, at this transaction's commit (Postgres).
    async fn notify_flags(&self, tx: &mut Transaction<'static, Any>) -> Result<(), sqlx::Error> {
        if let Some(notify) = self.dialect.notify_flags() {
            sqlx::query(notify).execute(&mut **tx).await?;
        }
        Ok(())
    }
}

/// The columns an [`AuditEntry`] is read from.
const AUDIT_COLUMNS: &str = "at, actor, source, action, flag, from_bp, to_bp, reason, in_force, allow_ids, deny_ids";

/// Turns `flag`'s override into a tombstone and audits it, within `tx`.
async fn clear_in(
    tx: &mut Transaction<'static, Any>,
    flag: &str,
    by: &ChangeBy,
    file_bp: u32,
) -> Result<Option<AuditEntry>, sqlx::Error> {
    let cleared: Option<Option<i64>> = sqlx::query_scalar(
        "UPDATE flag_overrides SET active = FALSE, actor = $2, source = $3, reason = $4, at = $5 \
         WHERE flag = $1 AND active = TRUE RETURNING percent_bp",
    )
    .bind(flag)
    .bind(&by.actor)
    .bind(&by.source)
    .bind(&by.reason)
    .bind(by.at)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(percent_bp) = cleared else {
        return Ok(None);
    };
    let entry = AuditEntry {
        at: by.at,
        actor: by.actor.clone(),
        source: by.source.clone(),
        action: "clear".into(),
        flag: flag.to_owned(),
        from: Some(bp_to_percent(percent_bp.unwrap_or(file_bp.into()))),
        to: bp_to_percent(file_bp.into()),
        reason: by.reason.clone(),
        in_force: true,
        allow: None,
        deny: None,
    };
    insert_entry(tx, &entry).await?;
    Ok(Some(entry))
}

async fn insert_entry(tx: &mut Transaction<'static, Any>, e: &AuditEntry) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO flag_audit (at, actor, source, action, flag, from_bp, to_bp, reason, in_force, allow_ids, deny_ids) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(e.at)
    .bind(&e.actor)
    .bind(&e.source)
    .bind(&e.action)
    .bind(&e.flag)
    .bind(e.from.map(percent_to_bp))
    .bind(percent_to_bp(e.to))
    .bind(&e.reason)
    .bind(e.in_force)
    .bind(e.allow.as_deref().map(ids_json))
    .bind(e.deny.as_deref().map(ids_json))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A JSON array of driver ids in a text column (`None` for SQL `NULL`).
fn ids(r: &AnyRow, column: &str) -> Result<Option<Vec<String>>, sqlx::Error> {
    r.try_get::<Option<String>, _>(column)?
        .map(|text| serde_json::from_str(&text).map_err(|e| sqlx::Error::Decode(Box::new(e))))
        .transpose()
}

fn ids_json(ids: &[String]) -> String {
    serde_json::to_string(ids).unwrap_or_else(|_| "[]".into())
}

fn percent_to_bp(p: f64) -> i64 {
    (p * 100.0).round() as i64
}

fn bp_to_percent(bp: i64) -> f64 {
    bp as f64 / 100.0
}
