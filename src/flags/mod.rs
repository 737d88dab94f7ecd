//! Rollout flags: the file (`flags/rollout.toml`), its validation, the sticky bucketing
//! and the lock-free snapshot the request path reads.
//!
//! The file is the single source of truth: the CLI and the admin API change it by
//! rewriting it (atomically, keeping comments), and the watcher loads whatever it holds.
//! A file that does not validate is never swapped in: the last good flags stay in force.

pub mod bucketing;
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
    /// The routing flag is absent.
    #[error("flag {0} is missing")]
    Missing(String),
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
}

/// A validated flags file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FlagSet {
    /// Flags by name.
    pub flags: BTreeMap<String, Flag>,
}

impl FlagSet {
    /// Parses and validates a flags file's text.
    pub fn parse(text: &str) -> Result<FlagSet, FlagsError> {
        if text.trim().is_empty() {
            return Err(FlagsError::Empty);
        }
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| FlagsError::Syntax(crate::config::one_line(e.message())))?;
        let mut flags = BTreeMap::new();
        for (name, value) in table {
            let invalid = |key: &str, reason: String| FlagsError::Invalid {
                flag: name.clone(),
                key: key.to_owned(),
                reason,
            };
            let toml::Value::Table(fields) = value else {
                return Err(invalid("", "must be a table ([name])".into()));
            };
            let mut threshold = None;
            let mut salt = name.clone();
            let mut allow = BTreeSet::new();
            let mut deny = BTreeSet::new();
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
                    other => return Err(invalid(other, "unknown key (percent, salt, allow, deny)".into())),
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

/// The flags in force, with where and when they were loaded.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The flags.
    pub set: FlagSet,
    /// Increases with each successful load.
    pub version: u64,
    /// When they were loaded (ms).
    pub loaded_at_ms: i64,
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
}

/// The lock-free handle the request path reads (`arc-swap`) and the watcher swaps.
#[derive(Debug, Clone)]
pub struct FlagsHandle {
    current: Arc<ArcSwap<Snapshot>>,
}

impl FlagsHandle {
    /// A handle starting with `set`.
    pub fn new(set: FlagSet, path: PathBuf) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(Snapshot {
                set,
                version: 1,
                loaded_at_ms: now_ms(),
                path,
            })),
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

    /// Swaps in `set` if it differs from the flags in force; returns the previous set
    /// when it did.
    pub fn replace(&self, set: FlagSet) -> Option<FlagSet> {
        let old = self.current.load_full();
        if old.set == set {
            return None;
        }
        self.current.store(Arc::new(Snapshot {
            set,
            version: old.version + 1,
            loaded_at_ms: now_ms(),
            path: old.path.clone(),
        }));
        Some(old.set.clone())
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
        /// Whatever bytes the file holds, parsing never panics: it validates or is refused.
        #[test]
        fn parser_never_panics(text in ".{0,400}") {
            let _ = FlagSet::parse(&text);
        }

        /// Any valid percentage survives a write and a parse unchanged.
        #[test]
        fn percentages_round_trip(bp in 0u32..=10_000) {
            let text = format!("[trip_accept_v2]\npercent = {}\n", f64::from(bp) / 100.0);
            proptest::prop_assert_eq!(FlagSet::parse(&text).unwrap().flags[TRIP_ACCEPT_FLAG].threshold, bp);
        }
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
            ("[other]\npercent = 10\n", "missing"),
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
        write_percent(&path, TRIP_ACCEPT_FLAG, 12.5).unwrap();
        assert_eq!(FlagSet::load(&path).unwrap().flags[TRIP_ACCEPT_FLAG].threshold, 1250);
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
