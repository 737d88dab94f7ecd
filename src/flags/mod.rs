//! Rollout flags: the file (`flags/rollout.toml`), its validation, the sticky bucketing
//! and the lock-free snapshot the request path reads.
//!
//! The file is the declared default (GitOps, a read-only ConfigMap); a change made by a
//! person (API, CLI, console) or the guard is an [`Override`] stored in the database and in
//! force on every instance until cleared — except that a file saying `percent = 0`, the
//! kill switch, wins over any override. The watcher loads whatever the file holds
//! ([`watcher`]), the fleet sync the overrides ([`fleet`]). A file that does not validate
//! is never swapped in: the last good flags stay in force.

pub mod bucketing;
pub mod fleet;
pub mod guard_config;
pub mod watcher;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::domain::{Cohort, TRIP_ACCEPT_FLAG, now_ms};

/// Why a flags file was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FlagsError {
    /// The file could not be read (missing, permissions).
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// Empty file: refused, so a truncated write never routes everyone to legacy.
    #[error("flags file is empty")]
    Empty,
    /// Not TOML.
    #[error("syntax error: {0}")]
    Syntax(String),
    /// A value or key is invalid.
    #[error("{flag}.{key}: {reason}")]
    Invalid {
        /// Flag name.
        flag: String,
        /// Key within the flag.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A table a letter or three from the routing flag's name: a misspelt one would
    /// otherwise be taken as a flag of its own, leaving the real one as it was while the
    /// file seems to say otherwise.
    #[error("unknown flag [{0}]: did you mean [{TRIP_ACCEPT_FLAG}]?")]
    UnknownFlag(String),
    /// The routing flag is absent.
    #[error("flag {0} is missing")]
    Missing(String),
    /// Bad at start, with no last good flags to keep.
    #[error("{bad}, and there are no last good flags to keep: {why}")]
    NoLastGood {
        /// What is wrong with the file.
        bad: Box<FlagsError>,
        /// Why the fleet's last good flags cannot stand in.
        why: String,
    },
    /// The file could not be written.
    #[error("cannot write {path}: {reason}")]
    Write {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
}

/// One flag.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Flag {
    /// Rollout percentage in basis points (percent × 100), `0..=10000`.
    #[serde(skip)]
    pub threshold: u32,
    /// Part of the hash; changing it reshuffles cohorts.
    pub salt: String,
    /// Driver ids always on atomic_async.
    pub allow: BTreeSet<String>,
    /// Driver ids always on legacy (wins over allow).
    pub deny: BTreeSet<String>,
    /// The guarded rollout, when the file has a `[name.guard]` section.
    #[serde(skip)]
    pub guard: Option<guard_config::GuardConfig>,
}

impl Flag {
    /// The percentage, e.g. 12.5.
    pub fn percent(&self) -> f64 {
        f64::from(self.threshold) / 100.0
    }

    /// The cohort of `driver_id`. Allocation-free.
    pub fn decide(&self, driver_id: &str) -> Cohort {
        if self.deny.contains(driver_id) {
            Cohort::Legacy
        } else if self.allow.contains(driver_id) || bucketing::bucket(&self.salt, driver_id) < self.threshold {
            Cohort::AtomicAsync
        } else {
            Cohort::Legacy
        }
    }

    /// Why `driver_id` is in its cohort.
    pub fn explain(&self, name: &str, driver_id: &str) -> Explanation {
        let list = if self.deny.contains(driver_id) {
            Some("deny")
        } else if self.allow.contains(driver_id) {
            Some("allow")
        } else {
            None
        };
        Explanation {
            flag: name.to_owned(),
            driver_id: driver_id.to_owned(),
            bucket: bucketing::bucket(&self.salt, driver_id),
            threshold: self.threshold,
            list,
            cohort: self.decide(driver_id).as_str(),
            source: "file",
        }
    }
}

/// `flags explain` output.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Explanation {
    /// Flag name.
    pub flag: String,
    /// Driver id.
    pub driver_id: String,
    /// The driver's bucket, `0..10000`.
    pub bucket: u32,
    /// Buckets below this are atomic_async.
    pub threshold: u32,
    /// `allow` or `deny` when a list decided.
    pub list: Option<&'static str>,
    /// The resulting cohort.
    pub cohort: &'static str,
    /// Where the flag in force comes from: `file` or `override`.
    pub source: &'static str,
}

/// A validated flags file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FlagSet {
    /// Flags by name.
    pub flags: BTreeMap<String, Flag>,
}

impl FlagSet {
    /// The percent `flag` is declared at, in basis points; `None` when there is no such flag.
    pub fn percent_bp(&self, flag: &str) -> Option<u32> {
        self.flags.get(flag).map(|f| f.threshold)
    }

    /// Parses and validates a flags file's text.
    pub fn parse(text: &str) -> Result<FlagSet, FlagsError> {
        if text.trim().is_empty() {
            return Err(FlagsError::Empty);
        }
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| FlagsError::Syntax(crate::config::toml_error(text, &e)))?;
        let mut flags = BTreeMap::new();
        for (name, value) in table {
            let invalid = |key: &str, reason: String| FlagsError::Invalid {
                flag: name.clone(),
                key: key.to_owned(),
                reason,
            };
            let toml::Value::Table(fields) = value else {
                return Err(FlagsError::Syntax(format!(
                    "{name} must be a table ([{name}]); a key above the first [name] belongs to no flag"
                )));
            };
            // A name no database column can hold (a NUL) or no log line shows as it is.
            if name.is_empty() || name.chars().any(char::is_control) {
                return Err(FlagsError::Syntax(format!(
                    "{name:?} is not a flag name: it must not be empty or hold control characters"
                )));
            }
            // A misspelt name of the routing flag would be taken as a flag of its own, the
            // real one left as it was. Other names are flags of their own, as before.
            if name != TRIP_ACCEPT_FLAG && strsim::levenshtein(&name, TRIP_ACCEPT_FLAG) <= 3 {
                return Err(FlagsError::UnknownFlag(name));
            }
            let mut threshold = None;
            let mut salt = name.clone();
            let mut allow = BTreeSet::new();
            let mut deny = BTreeSet::new();
            let mut guard = None;
            for (key, value) in fields {
                match key.as_str() {
                    "percent" => threshold = Some(parse_percent(&value).map_err(|r| invalid("percent", r))?),
                    "salt" => {
                        salt = value
                            .as_str()
                            .filter(|s| !s.is_empty())
                            .ok_or_else(|| invalid("salt", "must be a non-empty string".into()))?
                            .to_owned()
                    }
                    "allow" => allow = parse_ids(&value).map_err(|r| invalid("allow", r))?,
                    "deny" => deny = parse_ids(&value).map_err(|r| invalid("deny", r))?,
                    "guard" if name == TRIP_ACCEPT_FLAG => {
                        guard = Some(guard_config::GuardConfig::parse(&value).map_err(|(k, r)| invalid(&k, r))?)
                    }
                    "guard" => {
                        return Err(invalid(
                            "guard",
                            format!("only {TRIP_ACCEPT_FLAG} routes requests, so only it can be guarded"),
                        ));
                    }
                    other => return Err(invalid(other, "unknown key (percent, salt, allow, deny, guard)".into())),
                }
            }
            let threshold = threshold.ok_or_else(|| invalid("percent", "is required".into()))?;
            flags.insert(
                name.clone(),
                Flag {
                    threshold,
                    salt,
                    allow,
                    deny,
                    guard,
                },
            );
        }
        if !flags.contains_key(TRIP_ACCEPT_FLAG) {
            return Err(FlagsError::Missing(TRIP_ACCEPT_FLAG.into()));
        }
        Ok(FlagSet { flags })
    }

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<FlagSet, FlagsError> {
        let text = std::fs::read_to_string(path).map_err(|e| FlagsError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text)
    }
}

/// Parses a percentage: a number in `0..=100` in steps of 0.01, as basis points.
pub fn parse_percent(value: &toml::Value) -> Result<u32, String> {
    let p = match value {
        toml::Value::Integer(i) => *i as f64,
        toml::Value::Float(f) => *f,
        _ => return Err("must be a number".into()),
    };
    percent_to_threshold(p)
}

/// `p` percent as basis points, if it is in `0..=100` in steps of 0.01.
pub fn percent_to_threshold(p: f64) -> Result<u32, String> {
    if !p.is_finite() || !(0.0..=100.0).contains(&p) {
        return Err(format!("{p} is not in 0..=100"));
    }
    let bp = (p * 100.0).round();
    if (p * 100.0 - bp).abs() > 1e-6 {
        return Err(format!("{p} is finer than 0.01"));
    }
    Ok(bp as u32)
}

fn parse_ids(value: &toml::Value) -> Result<BTreeSet<String>, String> {
    let toml::Value::Array(items) = value else {
        return Err("must be an array of driver id strings".into());
    };
    items
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| "driver ids must be strings".to_string())
        })
        .collect()
}

/// An override in force, as the flags use it: set through the API, the CLI, the console
/// or the guard, stored in the database, and in force on every instance until cleared.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The percent in basis points; `None` keeps the file's.
    pub threshold: Option<u32>,
    /// Driver ids added to the file's allow list.
    pub allow: BTreeSet<String>,
    /// Driver ids added to the file's deny list.
    pub deny: BTreeSet<String>,
    /// Who set it.
    pub actor: String,
    /// api | cli | console | guard
    pub source: String,
    /// Why.
    pub reason: String,
    /// When (ms).
    pub at_ms: i64,
}

/// The flags in force: the file's, with each override applied — except where the file
/// says `percent = 0`, the kill switch, which wins over any override.
pub fn in_force(file: &FlagSet, overrides: &BTreeMap<String, Override>) -> FlagSet {
    let flags = file
        .flags
        .iter()
        .map(|(name, flag)| {
            let flag = match overrides.get(name) {
                Some(o) if flag.threshold > 0 => Flag {
                    threshold: o.threshold.unwrap_or(flag.threshold),
                    salt: flag.salt.clone(),
                    allow: flag.allow.union(&o.allow).cloned().collect(),
                    deny: flag.deny.union(&o.deny).cloned().collect(),
                    guard: flag.guard.clone(),
                },
                _ => flag.clone(),
            };
            (name.clone(), flag)
        })
        .collect();
    FlagSet { flags }
}

/// The flags in force, with where they come from and when they were loaded.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The flags in force (the file with the overrides applied).
    pub set: FlagSet,
    /// What the file says.
    pub file: FlagSet,
    /// The overrides stored in the database, as this instance last read them.
    pub overrides: BTreeMap<String, Override>,
    /// Increases with each change of the flags in force or of an override.
    pub version: u64,
    /// When the flags in force last changed (ms).
    pub loaded_at_ms: i64,
    /// When the file's content last changed (ms).
    pub file_loaded_at_ms: i64,
    /// The file.
    pub path: PathBuf,
}

impl Snapshot {
    /// The cohort of `driver_id` for trip acceptance. A set without the flag (impossible
    /// after validation) routes to legacy, the known path.
    pub fn trip_accept_cohort(&self, driver_id: &str) -> Cohort {
        self.set
            .flags
            .get(TRIP_ACCEPT_FLAG)
            .map_or(Cohort::Legacy, |flag| flag.decide(driver_id))
    }

    /// Each flag's percentage in force, for the `tripgate_rollout_percent` gauge.
    pub fn percents(&self) -> impl Iterator<Item = (&str, f64)> {
        self.set
            .flags
            .iter()
            .map(|(name, flag)| (name.as_str(), flag.percent()))
    }

    /// `name`'s override, if one is in force (stored, and not overruled by the kill switch).
    pub fn override_in_force(&self, name: &str) -> Option<&Override> {
        let file = self.file.flags.get(name)?;
        self.overrides.get(name).filter(|_| file.threshold > 0)
    }

    /// Whether each flag has an override in force, for the `tripgate_flags_override` gauge.
    pub fn overridden(&self) -> impl Iterator<Item = (&str, bool)> {
        self.file
            .flags
            .keys()
            .map(|name| (name.as_str(), self.override_in_force(name).is_some()))
    }

    /// Where `name`'s percent in force comes from: `override` or `file`.
    pub fn source(&self, name: &str) -> &'static str {
        if self.override_in_force(name).is_some() {
            "override"
        } else {
            "file"
        }
    }

    /// One flag as `GET /admin/flags` and `flags show --json` report it: the flag in
    /// force, its source, the file's percent and the override.
    pub fn flag_json(&self, name: &str) -> Option<serde_json::Value> {
        let flag = self.set.flags.get(name)?;
        let file = self.file.flags.get(name)?;
        let stored = self.overrides.get(name).map(|o| {
            serde_json::json!({
                "percent": o.threshold.map(|t| f64::from(t) / 100.0),
                "allow": o.allow,
                "deny": o.deny,
                "actor": o.actor,
                "source": o.source,
                "reason": o.reason,
                "at": o.at_ms,
                "in_force": self.override_in_force(name).is_some(),
            })
        });
        Some(serde_json::json!({
            "percent": flag.percent(),
            "salt": flag.salt,
            "allow": flag.allow,
            "deny": flag.deny,
            "source": self.source(name),
            "file_percent": file.percent(),
            "override": stored,
        }))
    }

    /// Why `driver_id` is in its cohort under the flags in force.
    pub fn explain(&self, name: &str, driver_id: &str) -> Option<Explanation> {
        let mut e = self.set.flags.get(name)?.explain(name, driver_id);
        e.source = self.source(name);
        Some(e)
    }

    /// Every flag, as [`Snapshot::flag_json`].
    pub fn flags_json(&self) -> serde_json::Map<String, serde_json::Value> {
        self.set
            .flags
            .keys()
            .filter_map(|name| Some((name.clone(), self.flag_json(name)?)))
            .collect()
    }

    /// Why `name` has the percent it has, in one line: "file says 20; override 50 by alice
    /// (api) since <ms>: reason", "file says 0: kill switch (override 50 by alice not in
    /// force)", or "file says 20".
    pub fn why(&self, name: &str) -> Option<String> {
        let file = self.file.flags.get(name)?;
        let stored = self.overrides.get(name);
        let describe = |o: &Override| {
            let percent = o
                .threshold
                .map_or_else(|| "(file's percent)".to_owned(), |t| (f64::from(t) / 100.0).to_string());
            let lists = match (o.allow.len(), o.deny.len()) {
                (0, 0) => String::new(),
                (a, d) => format!(" (+{a} allow, +{d} deny)"),
            };
            let reason = if o.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", o.reason)
            };
            let since = std::time::UNIX_EPOCH + std::time::Duration::from_millis(o.at_ms.max(0) as u64);
            format!(
                "override {percent}{lists} by {} ({}) since {}{reason}",
                o.actor,
                o.source,
                httpdate::fmt_http_date(since)
            )
        };
        Some(match stored {
            Some(o) if file.threshold > 0 => format!("file says {}; {}", file.percent(), describe(o)),
            Some(o) => format!("file says 0: kill switch ({} not in force)", describe(o)),
            None if file.threshold == 0 => "file says 0: kill switch".to_owned(),
            None => format!("file says {}", file.percent()),
        })
    }
}

/// The lock-free handle the request path reads (`arc-swap`); the file watcher swaps the
/// file's flags in, the fleet sync the overrides, each recomputing the flags in force.
#[derive(Debug, Clone)]
pub struct FlagsHandle {
    current: Arc<ArcSwap<Snapshot>>,
    /// Serialises the writers (file and overrides), so neither loses the other's change.
    writer: Arc<std::sync::Mutex<()>>,
    /// Each file content this instance swapped in, oldest first, until the fleet sync has
    /// recorded it (so a quick A → B → C is recorded as two changes, not one).
    file_seen: Arc<std::sync::Mutex<std::collections::VecDeque<FileSeen>>>,
    /// Notified when the file's flags change.
    file_changed: Arc<tokio::sync::Notify>,
    /// Held across a read of the overrides and its swap, so an older read never replaces a
    /// newer one (the sync's poll and an API change can refresh at once).
    refreshing: Arc<tokio::sync::Mutex<()>>,
}

/// The file's flags as this instance loaded them, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct FileSeen {
    /// When it was swapped in (ms).
    pub at_ms: i64,
    /// Flag name → the flag (its percent, salt and lists are recorded).
    pub flags: BTreeMap<String, Flag>,
}

/// Most file contents kept for the fleet sync while the database cannot be reached.
const FILE_SEEN_MAX: usize = 1000;

impl FileSeen {
    fn of(set: &FlagSet, at_ms: i64) -> Self {
        Self {
            at_ms,
            flags: set.flags.clone(),
        }
    }
}

impl FlagsHandle {
    /// A handle starting with the file's `set` and no override.
    pub fn new(set: FlagSet, path: PathBuf) -> Self {
        let handle = Self::standing_in(set, path);
        let seen = FileSeen::of(&handle.snapshot().file, handle.snapshot().file_loaded_at_ms);
        if let Ok(mut queue) = handle.file_seen.lock() {
            queue.push_back(seen);
        }
        handle
    }

    /// A handle on `set` as the file's flags although this instance did not load it from
    /// `path` (the fleet's last good flags, when the file is bad at start): not recorded as
    /// a file change, which it is not.
    pub fn standing_in(set: FlagSet, path: PathBuf) -> Self {
        let now = now_ms();
        Self {
            current: Arc::new(ArcSwap::from_pointee(Snapshot {
                set: set.clone(),
                file: set,
                overrides: BTreeMap::new(),
                version: 1,
                loaded_at_ms: now,
                file_loaded_at_ms: now,
                path,
            })),
            writer: Arc::new(std::sync::Mutex::new(())),
            file_seen: Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new())),
            file_changed: Arc::new(tokio::sync::Notify::new()),
            refreshing: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The flags in force (a cheap guard; no lock, no allocation).
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The flags in force, as an owned pointer.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Taken while the overrides are read and swapped in (see the field).
    pub async fn refreshing(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.refreshing.lock().await
    }

    /// Notified each time the file's flags change.
    pub fn file_changed(&self) -> Arc<tokio::sync::Notify> {
        self.file_changed.clone()
    }

    /// The oldest file content not yet recorded by the fleet sync.
    pub fn next_file_seen(&self) -> Option<FileSeen> {
        self.file_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .front()
            .cloned()
    }

    /// The fleet sync recorded the oldest file content.
    pub fn file_seen_recorded(&self) {
        self.file_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop_front();
    }

    /// Swaps in the file's `set` if it differs from the file's flags in force; returns the
    /// previous file set when it did.
    pub fn replace(&self, set: FlagSet) -> Option<FlagSet> {
        let old = self.update(|snapshot| {
            if snapshot.file == set {
                return None;
            }
            let old = std::mem::replace(&mut snapshot.file, set.clone());
            snapshot.file_loaded_at_ms = now_ms();
            // The kill switch clears the override (in the database, by whichever instance
            // records it first); here at once too, so that a file change after it cannot
            // bring back an override this instance has not yet read as cleared (its
            // database cut off meanwhile).
            for (name, flag) in &set.flags {
                if flag.threshold == 0 {
                    snapshot.overrides.remove(name);
                }
            }
            let mut seen = self.file_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if seen.len() >= FILE_SEEN_MAX {
                seen.pop_front();
            }
            seen.push_back(FileSeen::of(&set, snapshot.file_loaded_at_ms));
            Some(old)
        });
        if old.is_some() {
            self.file_changed.notify_one();
        }
        old
    }

    /// Swaps in the overrides read from the database; true when they differ from the ones
    /// in force.
    pub fn set_overrides(&self, overrides: BTreeMap<String, Override>) -> bool {
        self.update(|snapshot| {
            if snapshot.overrides == overrides {
                return None;
            }
            snapshot.overrides = overrides.clone();
            Some(())
        })
        .is_some()
    }

    /// Applies `change` to a copy of the snapshot and, when it says it changed something,
    /// recomputes the flags in force and swaps the copy in.
    fn update<T>(&self, change: impl FnOnce(&mut Snapshot) -> Option<T>) -> Option<T> {
        let _writer = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = Snapshot::clone(&self.current.load());
        let changed = change(&mut next)?;
        let set = in_force(&next.file, &next.overrides);
        if set != next.set {
            next.set = set;
            next.loaded_at_ms = now_ms();
        }
        next.version += 1;
        self.current.store(Arc::new(next));
        Some(changed)
    }
}

/// Rewrites the `percent` of flag `name` in the file at `path`, keeping comments and
/// formatting, validating the result, and replacing the file atomically (temp file in the
/// same folder, then rename), so a watcher never sees a half-written file.
/// Returns the previous percentage.
pub fn write_percent(path: &Path, name: &str, percent: f64) -> Result<f64, FlagsError> {
    let invalid = |reason: String| FlagsError::Invalid {
        flag: name.to_owned(),
        key: "percent".into(),
        reason,
    };
    let threshold = percent_to_threshold(percent).map_err(invalid)?;
    let text = std::fs::read_to_string(path).map_err(|e| FlagsError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let current = FlagSet::parse(&text)?;
    let old = current
        .flags
        .get(name)
        .ok_or_else(|| FlagsError::Missing(name.to_owned()))?
        .percent();
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| FlagsError::Syntax(e.to_string()))?;
    let value: toml_edit::Value = if threshold % 100 == 0 {
        i64::from(threshold / 100).into()
    } else {
        (f64::from(threshold) / 100.0).into()
    };
    let item = &mut doc[name]["percent"];
    // Keep the comment that follows the value on the same line.
    let decor = item.as_value().map(|v| v.decor().clone());
    *item = toml_edit::Item::Value(value);
    if let (Some(decor), Some(v)) = (decor, item.as_value_mut()) {
        *v.decor_mut() = decor;
    }
    let new_text = doc.to_string();
    FlagSet::parse(&new_text)?;
    write_atomically(path, &new_text)?;
    Ok(old)
}

/// Writes `text` to a temp file beside `path` and renames it over `path`.
pub fn write_atomically(path: &Path, text: &str) -> Result<(), FlagsError> {
    let write_err = |e: std::io::Error| FlagsError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    // Resolve a symlink (ConfigMap style) so the link itself is not replaced by a file.
    let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        target.file_name().and_then(|n| n.to_str()).unwrap_or("flags"),
        uuid::Uuid::new_v4()
    ));
    std::fs::write(&tmp, text).map_err(write_err)?;
    // The replacement keeps the file's mode and (where allowed) its owner, as an edit in
    // place would: a group-only file stays group-only.
    if let Ok(was) = std::fs::metadata(&target) {
        use std::os::unix::fs::MetadataExt;
        let kept = std::fs::set_permissions(&tmp, was.permissions());
        let _ = std::os::unix::fs::chown(&tmp, Some(was.uid()), Some(was.gid()));
        if let Err(e) = kept {
            let _ = std::fs::remove_file(&tmp);
            return Err(write_err(e));
        }
    }
    std::fs::rename(&tmp, &target).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        write_err(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "[trip_accept_v2]\npercent = 10 # ten\nsalt = \"s\"\nallow = [\"a\"]\ndeny = [\"a\", \"d\"]\n";

    #[test]
    fn parse_and_decide() {
        let set = FlagSet::parse(GOOD).unwrap();
        let flag = &set.flags[TRIP_ACCEPT_FLAG];
        assert_eq!(flag.threshold, 1000);
        assert_eq!(flag.decide("a"), Cohort::Legacy, "deny wins over allow");
        assert_eq!(flag.explain(TRIP_ACCEPT_FLAG, "a").list, Some("deny"));
        let mut all = flag.clone();
        all.threshold = 10_000;
        all.deny.clear();
        assert!((0..1000).all(|i| all.decide(&i.to_string()) == Cohort::AtomicAsync));
        all.threshold = 0;
        assert_eq!(all.decide("a"), Cohort::AtomicAsync, "allow list beats the kill switch");
        assert!((0..1000).all(|i| all.decide(&format!("x{i}")) == Cohort::Legacy));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// Whatever bytes the file holds, parsing never panics: it validates or is refused.
        #[test]
        fn parser_never_panics(text in ".{0,400}") {
            let _ = FlagSet::parse(&text);
        }

        /// Files assembled from the format's own pieces (and near misses of them), so that
        /// most reach validation rather than stop at TOML syntax: whatever is accepted is
        /// within the contract, and every refusal can be shown. This is the flags file
        /// fuzz target's check (`tests/fuzz.sh`), run on every test run.
        #[test]
        fn whatever_the_parser_accepts_is_within_the_contract(lines in flags_file_lines()) {
            let text = lines.join("\n");
            match FlagSet::parse(&text) {
                Ok(set) => {
                    proptest::prop_assert!(set.flags.contains_key(TRIP_ACCEPT_FLAG), "{text}");
                    for (name, flag) in &set.flags {
                        proptest::prop_assert!(flag.threshold <= 10_000, "{text}");
                        proptest::prop_assert!(!flag.salt.is_empty(), "{text}");
                        let _ = flag.decide("driver");
                        let _ = flag.explain(name, "driver");
                        if let Some(g) = &flag.guard {
                            proptest::prop_assert!(!g.steps.is_empty() && g.steps[0] > 0, "{text}");
                            proptest::prop_assert!(g.steps.windows(2).all(|w| w[0] < w[1]), "{text}");
                            proptest::prop_assert!(g.steps.iter().all(|s| *s <= 10_000), "{text}");
                            let alpha = g.alpha_per_look();
                            proptest::prop_assert!(alpha.is_finite() && alpha > 0.0, "{text}");
                        }
                    }
                }
                Err(e) => proptest::prop_assert!(!e.to_string().is_empty()),
            }
        }

        /// Any valid percentage survives a write and a parse unchanged.
        #[test]
        fn percentages_round_trip(bp in 0u32..=10_000) {
            let text = format!("[trip_accept_v2]\npercent = {}\n", f64::from(bp) / 100.0);
            proptest::prop_assert_eq!(FlagSet::parse(&text).unwrap().flags[TRIP_ACCEPT_FLAG].threshold, bp);
        }
    }

    /// Lines of a flags file: sections and keys the format knows, values mostly of the
    /// key's kind and at or past its bounds, near misses of names, and now and then junk.
    fn flags_file_lines() -> impl proptest::strategy::Strategy<Value = Vec<String>> {
        use proptest::prelude::*;
        let header = prop_oneof![
            6 => Just("[trip_accept_v2]"),
            3 => Just("[trip_accept_v2.guard]"),
            2 => Just("[other_flag]"),
            1 => Just("[other_flag.guard]"),
            1 => Just("[trip_accept_v3]"),
            1 => Just("[[trip_accept_v2]]"),
        ];
        let line = |keys: Vec<&'static str>| {
            prop::sample::select(keys).prop_flat_map(|k| flag_value(k).prop_map(move |v| format!("{k} = {v}")))
        };
        let flag_keys = line(vec!["salt", "allow", "deny", "guard", "percnt", "percent", "enabled"]);
        let guard_keys = line(vec![
            "enabled",
            "step_after_s",
            "window_s",
            "min_requests",
            "max_error_rate_delta",
            "max_p99_ratio",
            "confidence",
            "on_fail",
            "steps",
            "percent",
        ]);
        let section = (
            header,
            prop::bool::weighted(0.8),
            flag_value("percent"),
            flag_value("steps"),
            prop::collection::vec(flag_keys, 0..4),
            prop::collection::vec(guard_keys, 0..5),
        )
            .prop_map(|(h, usual, percent, steps, flag_lines, guard_lines)| {
                let mut lines = vec![h.to_owned()];
                if h.ends_with(".guard]") {
                    if usual {
                        lines.push(format!("steps = {steps}"));
                    }
                    lines.extend(guard_lines);
                } else {
                    if usual {
                        lines.push(format!("percent = {percent}"));
                    }
                    lines.extend(flag_lines);
                }
                lines
            });
        let junk = prop_oneof![8 => Just(None), 1 => ".{0,20}".prop_map(Some)];
        (prop::collection::vec(section, 1..4), junk).prop_map(|(sections, junk)| {
            let mut lines: Vec<String> = sections.concat();
            if let Some(j) = junk {
                let at = j.len() % (lines.len() + 1);
                lines.insert(at, j);
            }
            lines
        })
    }

    /// A value for `key`: usually of its kind (in range or just out of it), else anything.
    fn flag_value(key: &'static str) -> proptest::strategy::BoxedStrategy<String> {
        use proptest::prelude::*;
        let percent = || {
            prop_oneof![
                (0u32..=10_000).prop_map(|bp| format!("{:?}", f64::from(bp) / 100.0)),
                (-2i64..=102).prop_map(|n| n.to_string())
            ]
        };
        let number = |lo: f64, hi: f64| (lo..hi).prop_map(|f| format!("{f:?}"));
        let ids = || prop::collection::vec("[a-z0-9]{0,3}", 0..3).prop_map(|v| format!("{v:?}"));
        let anything = prop::sample::select(vec![
            "0",
            "1",
            "100.01",
            "-0.0",
            "0.005",
            "1e308",
            "nan",
            "inf",
            "-inf",
            "\"\"",
            "\"s\"",
            "true",
            "[]",
            "[\"a\", 1]",
            "[50, 10]",
            "[0, 10]",
            "{}",
            "{ enabled = true }",
            "1979-05-27",
            "9223372036854775807",
        ])
        .prop_map(String::from);
        let kind: BoxedStrategy<String> = match key {
            "percent" => percent().boxed(),
            "salt" => "\"[a-z]{0,4}\"".boxed(),
            "allow" | "deny" => ids().boxed(),
            "enabled" => any::<bool>().prop_map(|b| b.to_string()).boxed(),
            "steps" => prop::collection::vec(percent(), 1..4)
                .prop_map(|v| format!("[{}]", v.join(", ")))
                .boxed(),
            "step_after_s" | "window_s" | "min_requests" => prop_oneof![0i64..=700, 2_591_990i64..=2_592_010]
                .prop_map(|n| n.to_string())
                .boxed(),
            "max_error_rate_delta" => number(-0.1, 1.1).boxed(),
            "max_p99_ratio" => number(0.5, 30.0).boxed(),
            "confidence" => number(0.4, 1.05).boxed(),
            "on_fail" => prop::sample::select(vec!["\"rollback\"", "\"hold\"", "\"stop\""])
                .prop_map(String::from)
                .boxed(),
            _ => anything.clone().boxed(),
        };
        prop_oneof![5 => kind, 1 => anything].boxed()
    }

    #[test]
    fn a_key_above_every_flag_is_named() {
        let e = FlagSet::parse("percent = 40\n[trip_accept_v2]\npercent = 10\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "syntax error: percent must be a table ([percent]); a key above the first [name] belongs to no flag"
        );
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let e = FlagSet::parse("[trip_accept_v2]\npercent = 10\nsalt = \"s\"\npercent = 20\n").unwrap_err();
        assert_eq!(e.to_string(), "syntax error: line 4 (percent = 20): duplicate key");
        let e = FlagSet::parse("[trip_accept_v2]\npercent = \n").unwrap_err();
        assert!(e.to_string().starts_with("syntax error: line 2 (percent =): "), "{e}");
    }

    fn override_of(threshold: Option<u32>, allow: &[&str], deny: &[&str]) -> BTreeMap<String, Override> {
        let o = Override {
            threshold,
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
            actor: "alice".into(),
            source: "api".into(),
            reason: String::new(),
            at_ms: 0,
        };
        [(TRIP_ACCEPT_FLAG.to_owned(), o)].into()
    }

    #[test]
    fn an_override_applies_over_the_file_except_the_kill_switch() {
        let file = FlagSet::parse(GOOD).unwrap();
        let set = in_force(&file, &override_of(Some(5000), &["x"], &["y"]));
        let flag = &set.flags[TRIP_ACCEPT_FLAG];
        assert_eq!(flag.threshold, 5000);
        assert_eq!(flag.allow, ["a", "x"].map(String::from).into());
        assert_eq!(flag.deny, ["a", "d", "y"].map(String::from).into());
        let lists_only = in_force(&file, &override_of(None, &[], &["y"]));
        assert_eq!(lists_only.flags[TRIP_ACCEPT_FLAG].threshold, 1000, "the file's percent");
        let off = FlagSet::parse("[trip_accept_v2]\npercent = 0\n").unwrap();
        assert_eq!(
            in_force(&off, &override_of(Some(10_000), &["x"], &[])),
            off,
            "kill switch"
        );

        let handle = FlagsHandle::new(file.clone(), PathBuf::from("f"));
        assert!(handle.set_overrides(override_of(Some(5000), &[], &[])));
        assert!(!handle.set_overrides(override_of(Some(5000), &[], &[])), "no change");
        assert_eq!(handle.snapshot().source(TRIP_ACCEPT_FLAG), "override");
        // A file change keeps the override; the kill switch overrules it.
        handle.replace(FlagSet::parse("[trip_accept_v2]\npercent = 20\n").unwrap());
        assert_eq!(handle.snapshot().set.flags[TRIP_ACCEPT_FLAG].threshold, 5000);
        handle.replace(off.clone());
        let snapshot = handle.snapshot();
        assert_eq!(
            (
                snapshot.set.flags[TRIP_ACCEPT_FLAG].threshold,
                snapshot.source(TRIP_ACCEPT_FLAG)
            ),
            (0, "file")
        );
        assert!(snapshot.why(TRIP_ACCEPT_FLAG).unwrap().contains("kill switch"));
        // Each file content waits, in order, for the fleet sync.
        let seen: Vec<u32> = std::iter::from_fn(|| {
            let next = handle.next_file_seen()?;
            handle.file_seen_recorded();
            Some(next.flags[TRIP_ACCEPT_FLAG].threshold)
        })
        .collect();
        assert_eq!(seen, [1000, 2000, 0]);
    }

    #[test]
    fn bad_files_are_refused() {
        let cases = [
            ("", "empty"),
            ("   \n", "empty"),
            ("[trip_accept_v2\npercent = 1", "syntax"),
            ("[trip_accept_v2]\npercent = 150\n", "percent"),
            ("[trip_accept_v2]\npercent = -1\n", "percent"),
            ("[trip_accept_v2]\npercent = 10.001\n", "finer"),
            ("[trip_accept_v2]\npercent = \"10\"\n", "number"),
            ("[trip_accept_v2]\npercent = 10\ncolour = 1\n", "unknown key"),
            ("[trip_accept_v2]\nsalt = \"x\"\n", "required"),
            ("[trip_accept_v2]\npercent = 10\nallow = [1]\n", "strings"),
            ("# only a comment\n", "missing"),
            ("[other]\npercent = 10\n", "missing"),
            ("[trip_accept_v3]\npercent = 10\n", "did you mean [trip_accept_v2]?"),
            // A name the database cannot store (the fleet records each flag's file state).
            (
                "[\"a\\u0000\"]\npercent = 1\n[trip_accept_v2]\npercent = 10\n",
                "control characters",
            ),
            (
                "[\"\"]\npercent = 1\n[trip_accept_v2]\npercent = 10\n",
                "not a flag name",
            ),
            // A misspelt table beside the real one: not a second flag.
            (
                "[trip_accept_v2]\npercent = 20\n[trip_acept_v2]\npercent = 30\n",
                "unknown flag [trip_acept_v2]",
            ),
            (
                "[trip_accept_v2]\npercent = 20\n[Trip_Accept_V2]\npercent = 30\n",
                "unknown flag [Trip_Accept_V2]",
            ),
            // Beyond these the guard's time stamp arithmetic would overflow.
            (
                "[trip_accept_v2]\npercent = 10\n[trip_accept_v2.guard]\nwindow_s = 2305843009213693952\n",
                "guard.window_s",
            ),
            (
                "[trip_accept_v2]\npercent = 10\n[trip_accept_v2.guard]\nstep_after_s = 2592001\n",
                "guard.step_after_s",
            ),
            (
                "[trip_accept_v2]\npercent = 10\n[trip_accept_v2.guard]\nmin_requests = 0\n",
                "guard.min_requests",
            ),
        ];
        for (text, needle) in cases {
            let err = FlagSet::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        assert_eq!(
            FlagSet::parse("[trip_accept_v2]\npercent = 12.34\n").unwrap().flags[TRIP_ACCEPT_FLAG].threshold,
            1234
        );
    }

    #[test]
    fn write_percent_keeps_comments_and_is_valid() {
        let dir = std::env::temp_dir().join(format!("tg-flags-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rollout.toml");
        std::fs::write(&path, format!("# header\n{GOOD}")).unwrap();
        assert_eq!(write_percent(&path, TRIP_ACCEPT_FLAG, 50.0).unwrap(), 10.0);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("# header\n") && text.contains("percent = 50 # ten"),
            "{text}"
        );
        // The atomic replacement keeps the file's mode.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_percent(&path, TRIP_ACCEPT_FLAG, 12.5).unwrap();
        assert_eq!(FlagSet::load(&path).unwrap().flags[TRIP_ACCEPT_FLAG].threshold, 1250);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
        assert!(write_percent(&path, TRIP_ACCEPT_FLAG, 150.0).is_err());
        assert!(write_percent(&path, "nope", 5.0).is_err());
        assert_eq!(
            FlagSet::load(&path).unwrap().flags[TRIP_ACCEPT_FLAG].threshold,
            1250,
            "unchanged"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
