//! The flag change log (`flag_audit`): who changed which flag from what to what, when,
//! and through which door (api | cli | file). Percentages are stored in basis points.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{FromRow, Row};

use super::Storage;

/// One flag change.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    /// When (ms).
    pub at: i64,
    /// Token subject, `cli` or `file`.
    pub actor: String,
    /// api | cli | file
    pub source: String,
    /// Flag name.
    pub flag: String,
    /// Percent before (None when the flag is new).
    pub from: Option<f64>,
    /// Percent after.
    pub to: f64,
}

impl FromRow<'_, AnyRow> for AuditEntry {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            at: r.try_get("at")?,
            actor: r.try_get("actor")?,
            source: r.try_get("source")?,
            flag: r.try_get("flag")?,
            from: r.try_get::<Option<i64>, _>("from_bp")?.map(bp_to_percent),
            to: bp_to_percent(r.try_get("to_bp")?),
        })
    }
}

impl Storage {
    /// Appends a flag change to the audit log.
    pub async fn record_flag_change(&self, e: &AuditEntry) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO flag_audit (at, actor, source, flag, from_bp, to_bp) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(e.at)
            .bind(&e.actor)
            .bind(&e.source)
            .bind(&e.flag)
            .bind(e.from.map(percent_to_bp))
            .bind(percent_to_bp(e.to))
            .execute(&mut *self.conn().await?)
            .await?;
        Ok(())
    }

    /// The audit log, oldest first.
    pub async fn flag_audit(&self) -> Result<Vec<AuditEntry>, sqlx::Error> {
        sqlx::query_as("SELECT at, actor, source, flag, from_bp, to_bp FROM flag_audit ORDER BY id")
            .fetch_all(&mut *self.conn().await?)
            .await
    }
}

fn percent_to_bp(p: f64) -> i64 {
    (p * 100.0).round() as i64
}

fn bp_to_percent(bp: i64) -> f64 {
    bp as f64 / 100.0
}
