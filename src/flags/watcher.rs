//! Keeps the flags in force in step with the file.
//!
//! Reloads are validated before the swap; a bad, empty, half-written or deleted file keeps
//! the last good flags, logs why and counts an error.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
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
/// Kubernetes ConfigMap swaps a `..data` symlink) — and, when the file is a symlink into
/// another folder, that folder too — lets a change settle, and reloads; a slow poll of the
/// resolved file's fingerprint covers filesystems without inotify; `SIGHUP` forces a
/// reload. Each change is logged and counted; the fleet sync ([`super::fleet`]) records it in
/// the audit log, once for the fleet.
///
/// A file written in place is read once its writer closes it, not between two of its
/// writes: a half-written file can be valid and say something else (`percent = 0` of
/// `percent = 0.5`: the kill switch, which clears the overrides for good).
pub struct FlagsWatcher;

/// How long to let a burst of filesystem events settle before reading the file.
const DEBOUNCE: Duration = Duration::from_millis(75);
/// How long, from its first write, a file written in place may stay open before it is read
/// anyway (SPEC §4: a change is in force within 1 s of the write).
const WRITE_WAIT: Duration = Duration::from_millis(800);
/// Fallback poll interval.
const POLL: Duration = Duration::from_secs(5);

/// What a filesystem event says about the flags file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Written in place, still open: read it once it is closed.
    Writing,
    /// Closed after a write, or replaced (created, renamed, removed): read it once the
    /// burst settles.
    Changed,
    /// Something else in a watched folder (a ConfigMap's `..data` swap, another file): read
    /// the file once the burst settles, but a write of the file in progress still is one.
    Other,
}

impl FlagsWatcher {
    /// Starts watching until `shutdown` turns true. Once the watch is up, the file is read
    /// again, as after an event, when it changed since `handle`'s flags were read from it
    /// (the start waited for the database and bound its listeners meanwhile, and no event
    /// came for a change before the watch) or when `read_now` (the flags in force are not
    /// the file's — it was bad at start — and it may have been fixed since).
    pub fn spawn(
        handle: FlagsHandle,
        path: PathBuf,
        metrics: Arc<Metrics>,
        mut shutdown: watch::Receiver<bool>,
        read_now: bool,
    ) -> JoinHandle<()> {
        // Registered before this returns: a SIGHUP from then on reloads (its default action
        // would end the process).
        let mut hangup = hangup_signal();
        tokio::spawn(async move {
            let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
            // Kept alive for as long as the loop runs; dropping it stops the OS watch.
            let mut folders = Folders::watch(&path, tx);
            let mut seen = fingerprint(&path);
            if FlagSet::load(&path).is_ok_and(|set| read_now || set != handle.snapshot().file) {
                apply(&handle, &path, &metrics, false);
            }
            loop {
                let forced = tokio::select! {
                    Some(first) = events.recv() => {
                        settle(&mut events, first).await;
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
                if let Some(folders) = folders.as_mut() {
                    folders.follow_target(&path);
                }
            }
        })
    }
}

/// Takes `SIGHUP` from its default action, ending the process, for good (tokio keeps a
/// signal's handler once one is registered): called first thing at start, so that a start
/// still waiting for its database does not die of the `SIGHUP` ops send every tripgate
/// process after a flags edit. What it then does is the watcher's (reload) or
/// [`ignore_hangup`]'s (log); one that came before them is dropped — the watcher reads a
/// file changed meanwhile all the same.
pub fn hold_hangup() {
    drop(hangup_signal());
}

/// For a process that follows no flags file (`tripgate worker`): `SIGHUP`, which ops send
/// to every tripgate process after a flags edit, is logged and otherwise ignored — its
/// default action would end the process at once, without a drain.
pub fn ignore_hangup(mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
    let mut hangup = hangup_signal();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = recv_hangup(&mut hangup) => {
                    tracing::info!("SIGHUP: a worker follows no flags file; nothing to reload");
                }
                // Shutdown, or the start failed after this (its sender is gone).
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() { return; }
                }
            }
        }
    })
}

/// Waits until the burst of events that began with `first` is over: no event for
/// [`DEBOUNCE`] and no write in place left unclosed — or [`WRITE_WAIT`] after it began.
async fn settle(events: &mut tokio::sync::mpsc::UnboundedReceiver<Seen>, first: Seen) {
    let began = tokio::time::Instant::now();
    let mut writing = first == Seen::Writing;
    loop {
        let left = WRITE_WAIT.saturating_sub(began.elapsed());
        let wait = if writing { left } else { DEBOUNCE.min(left) };
        match tokio::time::timeout(wait, events.recv()).await {
            Ok(Some(Seen::Writing)) => writing = true,
            Ok(Some(Seen::Changed)) => writing = false,
            Ok(Some(Seen::Other)) => {}
            Ok(None) | Err(_) => return,
        }
        if began.elapsed() >= WRITE_WAIT {
            return;
        }
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
                let before = old.flags.get(name);
                let from = before.map(|f| f.percent());
                let source = snapshot.source(name);
                tracing::info!(flag = %name, from = ?from, to = flag.percent(), in_force = ?snapshot.set.flags.get(name).map(|f| f.percent()), source, version = snapshot.version, "flags file reloaded");
                // Who is in which cohort changed: the percent, or the salt or a list.
                let moved = before.is_none_or(|b| {
                    (b.threshold, &b.salt, &b.allow, &b.deny) != (flag.threshold, &flag.salt, &flag.allow, &flag.deny)
                });
                if moved {
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

/// The OS watch on the flags file's folder, and on the folder of the file it links to
/// when that is another one (a symlink into a mounted volume, say).
struct Folders {
    watcher: notify::RecommendedWatcher,
    /// The linked-to file's folder being watched, if any.
    target: Option<PathBuf>,
}

impl Folders {
    fn watch(path: &Path, events: tokio::sync::mpsc::UnboundedSender<Seen>) -> Option<Self> {
        use notify::Watcher;
        let folder = folder_of(path);
        let names = [
            path.file_name(),
            std::fs::canonicalize(path).ok().as_deref().and_then(Path::file_name),
        ]
        .into_iter()
        .flatten()
        .map(std::ffi::OsStr::to_owned)
        .collect::<Vec<_>>();
        let mut watcher = match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Some(seen) = event.ok().and_then(|e| seen(&e, &names)) {
                let _ = events.send(seen);
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
        let mut folders = Self { watcher, target: None };
        folders.follow_target(path);
        Some(folders)
    }

    /// Watches the folder of the file `path` now links to, if that is not `path`'s own
    /// folder (and stops watching the one it linked to before).
    fn follow_target(&mut self, path: &Path) {
        use notify::Watcher;
        let own = std::fs::canonicalize(folder_of(path)).ok();
        let target = std::fs::canonicalize(path)
            .ok()
            .map(|t| folder_of(&t))
            .filter(|t| Some(t) != own.as_ref());
        if target == self.target {
            return;
        }
        if let Some(old) = self.target.take() {
            let _ = self.watcher.unwatch(&old);
        }
        if let Some(new) = target {
            match self.watcher.watch(&new, notify::RecursiveMode::NonRecursive) {
                Ok(()) => self.target = Some(new),
                Err(e) => {
                    tracing::warn!(folder = %new.display(), error = %e, "cannot watch the folder the flags file links to; its edits are polled every {POLL:?}")
                }
            }
        }
    }
}

fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// What an event in a watched folder says about the flags file, whose names (its own, the
/// file it links to) are `names`. Opening and reading cannot change it: inotify reports
/// those too, and the reload's own read would otherwise wake the watcher again, a reload
/// every debounce interval for ever. A write to the file itself (not a temporary file
/// renamed over it) is one still in progress until its close.
fn seen(event: &notify::Event, names: &[std::ffi::OsString]) -> Option<Seen> {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    let of_the_file = || {
        event
            .paths
            .iter()
            .any(|p| p.file_name().is_some_and(|n| names.iter().any(|name| name == n)))
    };
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) if of_the_file() => Some(Seen::Changed),
        EventKind::Access(_) => None,
        EventKind::Modify(ModifyKind::Data(_)) if of_the_file() => Some(Seen::Writing),
        _ if of_the_file() => Some(Seen::Changed),
        _ => Some(Seen::Other),
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
