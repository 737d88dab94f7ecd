//! SQLite: the embedded default. One writer at a time, so a write transaction takes the
//! write lock up front (`BEGIN IMMEDIATE`) and a job claim is atomic without row locks;
//! workers are in this process and are woken in-process.

use std::sync::Arc;

use sqlx::{Any, AnyPool, Transaction};
use tokio::sync::Notify;

use super::{Backend, Migration};
use crate::config::DatabaseKind;

/// The SQLite dialect.
#[derive(Debug)]
pub struct Sqlite;

#[async_trait::async_trait]
impl Backend for Sqlite {
    fn kind(&self) -> DatabaseKind {
        DatabaseKind::Sqlite
    }

    fn migrations(&self) -> &'static [Migration] {
        &[Migration {
            version: 1,
            description: "init",
            sql: include_str!("../../migrations/sqlite/0001_init.sql"),
        }]
    }

    async fn begin_write(&self, pool: &AnyPool) -> Result<Transaction<'static, Any>, sqlx::Error> {
        // A deferred transaction that reads before it writes cannot upgrade once another
        // connection has committed (SQLITE_BUSY_SNAPSHOT, busy_timeout does not help).
        pool.begin_with("BEGIN IMMEDIATE").await
    }

    fn lock_rows(&self) -> &'static str {
        ""
    }

    fn skip_locked(&self) -> &'static str {
        ""
    }

    fn notify_statement(&self) -> Option<&'static str> {
        None
    }

    fn forward_wakeups(&self, _wake: Arc<Notify>) {}
}

/// The connect URL for a `sqlite://` URL: creates the file's folder and asks SQLite to
/// create the file (`mode=rwc`) unless the URL chose a mode.
pub(super) fn prepare_url(url: &str) -> std::io::Result<String> {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if let Some(parent) = std::path::Path::new(path).parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)?;
    }
    Ok(if query.contains("mode=") {
        url.to_owned()
    } else if query.is_empty() {
        format!("{url}?mode=rwc")
    } else {
        format!("{url}&mode=rwc")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_absolute_paths() {
        let dir = std::env::temp_dir().join(format!("tg-sqlite-{}", std::process::id()));
        let abs = format!("sqlite://{}/a/b.db", dir.display());
        assert_eq!(prepare_url(&abs).unwrap(), format!("{abs}?mode=rwc"));
        assert!(dir.join("a").is_dir());
        assert_eq!(prepare_url("sqlite://x.db?mode=ro").unwrap(), "sqlite://x.db?mode=ro");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
