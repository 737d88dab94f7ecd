//! Keeps the flags in force in step with the file.
//!
//! Reloads are validated before the swap; a bad, empty, half-written or deleted file keeps
//! the last good flags, logs why and counts an error.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::{FlagSet, FlagsError, FlagsHandle};
use crate::domain::now_ms;
use crate::metrics::Metrics;
use crate::storage::Storage;
use crate::storage::audit::AuditEntry;

/// What a reload did.
#[derive(Debug, Clone, PartialEq)]
pub enum Reload {
    /// The file validated and differs: swapped in; holds the flags it replaced.
    Changed(FlagSet),
    /// The file validated and is the same as the flags in force.
    Unchanged,
}

/// Reads `path` and swaps it in if it validates and differs.
pub fn reload(handle: &FlagsHandle, path: &Path) -> Result<Reload, FlagsError> {
    let set = FlagSet::load(path)?;
    Ok(match handle.replace(set) {
        Some(old) => Reload::Changed(old),
        None => Reload::Unchanged,
    })
}

/// Watches the flags file's folder (not the file: editors replace it by rename, and a
/// Kubernetes ConfigMap swaps a `..data` symlink), debounces, and reloads; a slow poll of
/// the resolved file's fingerprint covers filesystems without inotify; `SIGHUP` forces a
/// reload. Each change is logged, counted and written to the audit log (actor `file`).
pub struct FlagsWatcher;

/// How long to let a burst of filesystem events settle before reading the file.
const DEBOUNCE: Duration = Duration::from_millis(75);
/// How long a file change waits before it is audited as a plain edit (see `apply`).
const AUDIT_SETTLE: Duration = Duration::from_secs(2);
/// Fallback poll interval.
const POLL: Duration = Duration::from_secs(5);

impl FlagsWatcher {
    /// Starts watching until `shutdown` turns true.
    pub fn spawn(
        handle: FlagsHandle,
        path: PathBuf,
        store: Storage,
        metrics: Arc<Metrics>,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let changed = Arc::new(Notify::new());
            // Kept alive for as long as the loop runs; dropping it stops the OS watch.
            let _watcher = watch_folder(&path, changed.clone());
            let mut hangup = hangup_signal();
            let mut seen = fingerprint(&path);
            loop {
                let forced = tokio::select! {
                    _ = changed.notified() => {
                        tokio::time::sleep(DEBOUNCE).await;
                        false
                    }
                    _ = recv_hangup(&mut hangup) => true,
                    _ = tokio::time::sleep(POLL) => {
                        if fingerprint(&path) == seen { continue; }
                        false
                    }
                    _ = shutdown.changed() => {
                        if *shutdown.borrow() { return; }
                        continue;
                    }
                };
                seen = fingerprint(&path);
                apply(&handle, &path, &store, &metrics, forced).await;
            }
        })
    }
}

/// Reloads once and reports the result (log, metrics, audit).
pub async fn apply(handle: &FlagsHandle, path: &Path, store: &Storage, metrics: &Metrics, forced: bool) {
    match reload(handle, path) {
        Ok(Reload::Changed(old)) => {
            let snapshot = handle.snapshot();
            metrics.flags_reload("ok");
            metrics.flags_loaded(snapshot.percents(), snapshot.loaded_at_ms);
            for (name, flag) in &snapshot.set.flags {
                let from = old.flags.get(name).map(|f| f.percent());
                tracing::info!(flag = %name, from = ?from, to = flag.percent(), version = snapshot.version, "flags reloaded");
                if from != Some(flag.percent()) {
                    // The API and the CLI audit their own writes, and may do so just
                    // after this watcher saw the file change: let them, then audit what
                    // nobody claimed as a plain file edit.
                    let (store, name, to) = (store.clone(), name.clone(), flag.percent());
                    tokio::spawn(async move {
                        tokio::time::sleep(AUDIT_SETTLE).await;
                        record_file_change(&store, &name, from, to).await;
                    });
                }
            }
        }
        Ok(Reload::Unchanged) => {
            metrics.flags_reload("unchanged");
            if forced {
                tracing::info!("flags reloaded (SIGHUP): unchanged");
            }
        }
        Err(e) => {
            metrics.flags_reload("error");
            tracing::error!(path = %path.display(), error = %e, "flags file refused; the last good flags stay in force");
        }
    }
}

/// Audits a change seen in the file, unless the API or CLI that made it (or another
/// instance's watcher) already recorded it.
async fn record_file_change(store: &Storage, flag: &str, from: Option<f64>, to: f64) {
    let now = now_ms();
    let recent = store.flag_audit().await.ok().and_then(|entries| {
        entries
            .into_iter()
            .rev()
            .find(|e| e.flag == flag)
            .filter(|e| e.to == to && now - e.at < 10_000)
    });
    if recent.is_some() {
        return;
    }
    let entry = AuditEntry {
        at: now,
        actor: "file".into(),
        source: "file".into(),
        flag: flag.to_owned(),
        from,
        to,
    };
    if let Err(e) = store.record_flag_change(&entry).await {
        tracing::warn!(error = %e, "could not audit flag change");
    }
}

fn watch_folder(path: &Path, changed: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut watcher = match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            changed.notify_one();
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "no filesystem watcher; flags are polled every {POLL:?}");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&folder, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(folder = %folder.display(), error = %e, "cannot watch the flags folder; flags are polled every {POLL:?}");
        return None;
    }
    Some(watcher)
}

/// What identifies the file's current content cheaply: the resolved target's inode,
/// size and modification time.
fn fingerprint(path: &Path) -> Option<(u64, u64, std::time::SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let ino = 0;
    Some((ino, meta.len(), meta.modified().ok()?))
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

fn hangup_signal() -> Hangup {
    #[cfg(unix)]
    {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

async fn recv_hangup(hangup: &mut Hangup) {
    #[cfg(unix)]
    if let Some(signal) = hangup {
        signal.recv().await;
        return;
    }
    let _ = hangup;
    std::future::pending::<()>().await
}
