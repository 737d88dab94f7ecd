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
use crate::metrics::Metrics;

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
/// reload. Each change is logged and counted; the fleet sync ([`super::fleet`]) records it in
/// the audit log, once for the fleet.
pub struct FlagsWatcher;

/// How long to let a burst of filesystem events settle before reading the file.
const DEBOUNCE: Duration = Duration::from_millis(75);
/// Fallback poll interval.
const POLL: Duration = Duration::from_secs(5);

impl FlagsWatcher {
    /// Starts watching until `shutdown` turns true.
    pub fn spawn(
        handle: FlagsHandle,
        path: PathBuf,
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
                        // The burst's later events (a write's close after its modify) are
                        // read with it: one reload per change, not one and an 'unchanged'.
                        let _ = futures_util::FutureExt::now_or_never(changed.notified());
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
                apply(&handle, &path, &metrics, forced);
            }
        })
    }
}

/// Reloads once and reports the result (log, metrics).
pub fn apply(handle: &FlagsHandle, path: &Path, metrics: &Metrics, forced: bool) {
    match reload(handle, path) {
        Ok(Reload::Changed(old)) => {
            let snapshot = handle.snapshot();
            metrics.flags_reload("ok");
            super::fleet::report(metrics, &snapshot);
            for (name, flag) in &snapshot.file.flags {
                let from = old.flags.get(name).map(|f| f.percent());
                let source = snapshot.source(name);
                tracing::info!(flag = %name, from = ?from, to = flag.percent(), in_force = ?snapshot.set.flags.get(name).map(|f| f.percent()), source, version = snapshot.version, "flags file reloaded");
                if from != Some(flag.percent()) {
                    metrics.flag_changed(name, "file");
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

fn watch_folder(path: &Path, changed: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut watcher = match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| is_change(&e.kind)) {
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

/// Whether an event in the folder can have changed what the flags file says. Opening and
/// reading it cannot: inotify reports those too, and the reload's own read would otherwise
/// wake the watcher again, a reload every debounce interval for ever.
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
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
