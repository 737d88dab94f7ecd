//! `config.toml`: one struct per section, validated at load.
//!
//! Every key can be overridden from the environment as `TRIPGATE_<SECTION>_<KEY>`
//! (`TRIPGATE_DATABASE_URL`, `TRIPGATE_PROVIDERS_SMS_KIND`, …). A bad file or value fails
//! with one line that names the key, so `tripgate` can refuse to start with a clear reason.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a configuration could not be used; the message is one line that names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (a missing file only when it was named on the command line).
    #[error("cannot read {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O failure.
        source: std::io::Error,
    },
    /// TOML syntax error.
    #[error("{path}: {message}")]
    Syntax {
        /// The config file.
        path: PathBuf,
        /// The parser's message, flattened to one line.
        message: String,
    },
    /// A key has a value of the wrong type or range, or is unknown.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The config file (or `environment` for an override).
        path: PathBuf,
        /// Dotted key, e.g. `server.listen`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The whole configuration, one field per section of `config.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listeners and per-request limits.
    pub server: ServerConfig,
    /// The durable store: SQLite (embedded default) or PostgreSQL.
    pub database: DatabaseConfig,
    /// The lock store and event bus; empty URL means in-process.
    pub redis: RedisConfig,
    /// Where the rollout flags live.
    pub flags: FlagsConfig,
    /// Token verification.
    pub auth: AuthConfig,
    /// What the driver app tolerates.
    pub client: ClientConfig,
    /// SMS and push providers.
    pub providers: ProvidersConfig,
    /// The durable job queue.
    pub jobs: JobsConfig,
    /// Log output.
    pub log: LogConfig,
    /// The existing backend every route tripgate does not own is forwarded to.
    pub upstream: UpstreamConfig,
}

impl Config {
    /// Whether the demo routes are served: `server.demo_routes`, else only without an
    /// `[upstream]` (with one, the backend's own versions of those routes answer).
    pub fn demo_routes(&self) -> bool {
        self.server.demo_routes.unwrap_or(self.upstream.url.is_empty())
    }
}

/// `[upstream]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `http://host:port` (optionally with a path prefix) of the existing backend; empty:
    /// no pass-through (404 for routes tripgate does not own).
    pub url: String,
    /// Bound on connecting to the upstream.
    pub connect_timeout_ms: u64,
    /// Bound on the wait for the upstream's response head, from the moment the request's
    /// body has been sent (an upload is bounded by `idle_timeout_ms` instead).
    pub timeout_ms: u64,
    /// Most time between two bytes of an upload, a response body or a websocket.
    pub idle_timeout_ms: u64,
    /// Idle keep-alive connections kept to the upstream.
    pub max_idle_per_host: usize,
    /// Path prefixes that name the `route` label of the pass-through metrics (the first
    /// that matches; else `other`) — never the raw path.
    pub route_labels: Vec<String>,
    /// Keep the `X-Forwarded-Proto` / `X-Forwarded-Host` a client sent (only behind a proxy
    /// of yours that sets them); otherwise tripgate sets them from what it saw.
    pub trust_forwarded: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            connect_timeout_ms: 1_000,
            timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            max_idle_per_host: 256,
            route_labels: Vec::new(),
            trust_forwarded: false,
        }
    }
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Driver and customer API.
    pub listen: SocketAddr,
    /// `/metrics`, health and `/admin/*`; kept apart so it is never exposed with the API.
    pub admin_listen: SocketAddr,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// Requests per second per driver, with an equal burst; over it: 429.
    pub rate_limit_per_driver: u32,
    /// How long in-flight requests may run after a shutdown signal.
    pub shutdown_grace_ms: u64,
    /// Connections served at once per listener; one more gets a 503 and is closed.
    pub max_connections: usize,
    /// A client must send its request headers within this (slow-loris guard), and on
    /// tripgate's own routes its body within as long again (408); an HTTP/1.1 keep-alive
    /// connection waits this long for its next request.
    pub header_read_timeout_ms: u64,
    /// An HTTP/2 connection with no request in progress for this long is closed.
    pub idle_timeout_ms: u64,
    /// The demo routes (customer create/cancel/details, `POST /admin/seed`,
    /// `GET /admin/checks`) that `tripgate drive` and the demo use. Unset: served without
    /// an `[upstream]`, not with one (see [`Config::demo_routes`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub demo_routes: Option<bool>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            max_body_bytes: 16 * 1024,
            rate_limit_per_driver: 20,
            shutdown_grace_ms: 10_000,
            max_connections: 16_384,
            header_read_timeout_ms: 5_000,
            idle_timeout_ms: 60_000,
            demo_routes: None,
        }
    }
}

/// `[database]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://relative.db`, `sqlite:///absolute.db` or `postgres://…`.
    pub url: String,
    /// Pool size.
    pub max_connections: u32,
    /// Bound on acquiring a connection; past it the request gets 503.
    pub acquire_timeout_ms: u64,
    /// Postgres: bound on any statement's wait for a row or table lock (`lock_timeout`; 0:
    /// none). Past it the statement fails and the request gets 503 instead of hanging on a
    /// lock held elsewhere (the existing backend's own transaction, a stuck session).
    /// Migrations wait without it.
    pub lock_timeout_ms: u64,
    /// Empty: `url` holds everything. Otherwise the databases of the shards (a region
    /// each): every driver, customer and trip — with its jobs and side effects — lives on
    /// the shard its id hashes to (`domain::shard_of`), and `url` keeps what is global
    /// (flags, overrides, the audit, the guard). Each shard gets pools of `max_connections`
    /// and `jobs.db_connections`, its own group commit and its own workers.
    pub shards: Vec<String>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://data/tripgate.db".into(),
            max_connections: 8,
            acquire_timeout_ms: 2_000,
            lock_timeout_ms: 5_000,
            shards: Vec::new(),
        }
    }
}

/// `[redis]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Empty: in-process lock store and event bus (one instance only). One URL: a single
    /// node; several, comma-separated: the nodes of a Redis Cluster.
    pub url: String,
    /// A Redis Cluster reached through the one seed URL of `url`.
    pub cluster: bool,
    /// Expiry of a trip lock.
    pub lock_ttl_s: u64,
    /// Bound on every lock-store call; past it the SQL fence alone decides.
    pub timeout_ms: u64,
    /// Prefix of every key and channel, so several deployments (or tests) share a Redis.
    pub key_prefix: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            cluster: false,
            lock_ttl_s: 300,
            timeout_ms: 50,
            key_prefix: "tripgate".into(),
        }
    }
}

/// `[flags]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlagsConfig {
    /// The rollout flags file, watched for changes.
    pub path: PathBuf,
}

impl Default for FlagsConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("flags/rollout.toml"),
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 key for bearer tokens; at least 16 bytes.
    pub hs256_secret: String,
    /// Lifetime of tokens minted by `tripgate token`.
    pub token_ttl_s: u64,
    /// How long a user found to exist (and be active, with the token's role) is trusted
    /// without looking them up again; 0 looks them up on every request. The trade-off: a
    /// user deactivated meanwhile keeps access this long.
    pub user_cache_ms: u64,
    /// The backend's own tokens (RS256 / ES256, as Laravel Passport issues them): a PEM
    /// public key (RSA or P-256)…
    pub public_key_file: String,
    /// …or a JWKS URL (cached; fetched again on an unknown `kid`).
    pub jwks_url: String,
    /// The claim of the backend's tokens that holds the role (driver, customer, admin).
    pub role_claim: String,
    /// The `aud` the backend's tokens must carry (Passport: the client id); empty: `aud`
    /// is not checked.
    pub audience: String,
    /// The `iss` the backend's tokens must carry; empty: not checked.
    pub issuer: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hs256_secret: String::new(),
            token_ttl_s: 7 * 24 * 3600,
            user_cache_ms: 2_000,
            public_key_file: String::new(),
            jwks_url: String::new(),
            role_claim: "role".into(),
            audience: String::new(),
            issuer: String::new(),
        }
    }
}

/// `[client]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// The driver app gives up after this; slower requests count as timeouts.
    pub timeout_ms: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self { timeout_ms: 7_000 }
    }
}

/// `[providers]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvidersConfig {
    /// SMS gateway (OTP and parcel SMS).
    pub sms: ProviderConfig,
    /// Push notifications (FCM).
    pub push: ProviderConfig,
}

impl Default for ProvidersConfig {
    fn default() -> Self {
        Self {
            sms: ProviderConfig::simulated(1_500),
            push: ProviderConfig::simulated(800),
        }
    }
}

/// Which kind of provider to talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Sleeps `latency_ms` and fails at `failure_rate`: the design document's timings.
    Simulated,
    /// HTTP POST of the message as JSON to `url`.
    Webhook,
    /// Logs the message and succeeds.
    Log,
}

/// `[providers.sms]` / `[providers.push]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// simulated | webhook | log
    pub kind: ProviderKind,
    /// simulated: how long a call takes.
    pub latency_ms: u64,
    /// simulated: probability in 0..=1 that a call fails.
    pub failure_rate: f64,
    /// webhook: where to POST.
    pub url: String,
    /// webhook: bound on one call.
    pub timeout_ms: u64,
    /// webhook over HTTPS: a PEM file of the CA certificate(s) to trust instead of the
    /// system's roots (a private provider endpoint). Unset: the system roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
}

impl ProviderConfig {
    fn simulated(latency_ms: u64) -> Self {
        Self {
            kind: ProviderKind::Simulated,
            latency_ms,
            failure_rate: 0.0,
            url: String::new(),
            timeout_ms: 3_000,
            ca_file: None,
        }
    }
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self::simulated(0)
    }
}

/// `[jobs]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Concurrent jobs per process.
    pub workers: usize,
    /// After this many failed attempts a job is `dead`.
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt, with jitter.
    pub backoff_base_ms: u64,
    /// A claimed job not finished within this is taken again (its worker is presumed dead).
    pub visibility_timeout_s: u64,
    /// Slow poll in case a wake-up is missed.
    pub poll_interval_ms: u64,
    /// Database connections of the job workers, a pool apart from the API's, so side
    /// effects never take the connections accepts need.
    pub db_connections: u32,
    /// Done jobs and their effect records are purged this many hours after they finished
    /// (0: kept forever); dead jobs stay until retried or removed by hand.
    pub retention_h: u64,
    /// Where `tripgate worker` serves `/metrics`, `/healthz` and `/readyz` (apart from
    /// `server.admin_listen`, so a worker runs beside `serve` with the same file).
    pub admin_listen: SocketAddr,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            workers: 8,
            max_attempts: 8,
            backoff_base_ms: 200,
            visibility_timeout_s: 60,
            poll_interval_ms: 1_000,
            db_connections: 4,
            retention_h: 72,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` for people, `json` for log pipelines.
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. `info,tripgate=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

/// The storage backend a database URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseKind {
    /// Embedded default.
    Sqlite,
    /// Production.
    Postgres,
}

impl DatabaseConfig {
    /// The backend named by `url`, or `None` for an unsupported scheme.
    pub fn kind(&self) -> Option<DatabaseKind> {
        kind_of(&self.url)
    }

    /// The same settings for shard `i`'s database (`None` past the last shard).
    pub fn shard(&self, i: usize) -> Option<DatabaseConfig> {
        Some(DatabaseConfig {
            url: self.shards.get(i)?.clone(),
            shards: Vec::new(),
            ..self.clone()
        })
    }
}

fn kind_of(url: &str) -> Option<DatabaseKind> {
    if url.starts_with("sqlite:") {
        Some(DatabaseKind::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Some(DatabaseKind::Postgres)
    } else {
        None
    }
}

/// Why a `sqlite:` URL names no database file: no path (SQLite would give every
/// connection a private, empty database — a `migrate` that applies to nothing), an
/// in-memory one (the same), or a directory.
fn sqlite_file_problem(url: &str) -> Option<String> {
    let rest = url.strip_prefix("sqlite:")?.trim_start_matches("//");
    let path = rest.split_once('?').map_or(rest, |(path, _)| path);
    let problem = if path.is_empty() || path == ":memory:" {
        "names no file"
    } else if path.ends_with('/') || std::path::Path::new(path).is_dir() {
        "names a directory"
    } else {
        return None;
    };
    Some(format!("{url:?} {problem}: use sqlite://path/to/tripgate.db"))
}

impl Config {
    /// Reads `path` (a missing file means all defaults), applies `TRIPGATE_*` overrides
    /// from the process environment, and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let (text, source) = match std::fs::read_to_string(path) {
            Ok(text) => (text, path.to_owned()),
            // Errors name what was read: no file, so the defaults and the environment.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                String::new(),
                PathBuf::from(format!(
                    "{} not found, so the defaults and the environment",
                    path.display()
                )),
            ),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        check_env_names(std::env::vars_os().filter_map(|(name, _)| name.into_string().ok()))?;
        Self::from_toml(&source, &text, |name| std::env::var(name).ok())
    }

    /// Reads `path`, which must exist: it was named on the command line, and a typo in it
    /// must not start a process on the defaults.
    pub fn load_named(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        check_env_names(std::env::vars_os().filter_map(|(name, _)| name.into_string().ok()))?;
        Self::from_toml(path, &text, |name| std::env::var(name).ok())
    }

    /// Parses `text`, applies overrides looked up by `env`, and validates. `path` only
    /// names the source in error messages.
    pub fn from_toml(path: &Path, text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let file: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.to_owned(),
            message: toml_error(text, &e),
        })?;
        // Start from the defaults so every key exists and can be overridden from the
        // environment even when the file leaves it out.
        let mut merged = toml::Table::try_from(Config::default()).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        merge(&mut merged, file);
        // The defaults leave out the keys that have none (`Option`s); their variables are
        // looked up too.
        for (path, like) in [
            (&["server", "demo_routes"][..], toml::Value::Boolean(false)),
            (&["providers", "sms", "ca_file"][..], toml::Value::String(String::new())),
            (
                &["providers", "push", "ca_file"][..],
                toml::Value::String(String::new()),
            ),
        ] {
            let name = format!("TRIPGATE_{}", path.join("_").to_ascii_uppercase());
            if let Some(raw) = env(&name) {
                insert_leaf(&mut merged, path, parse_env_value(&raw, &like));
            }
        }
        apply_env(&mut merged, "TRIPGATE", &env);
        // A value from the environment is blamed on its variable, not on the file.
        let invalid = |key: String, message: String| {
            // `database.shards[0]` is the variable of `database.shards`.
            let leaf = key.split('[').next().unwrap_or(&key);
            let name = format!("TRIPGATE_{}", leaf.replace('.', "_").to_ascii_uppercase());
            ConfigError::Invalid {
                path: match env(&name) {
                    Some(_) => PathBuf::from(format!("environment {name}")),
                    None => path.to_owned(),
                },
                key,
                message,
            }
        };
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(merged))
            .map_err(|e| invalid(e.path().to_string(), one_line(&e.inner().to_string())))?;
        config
            .validate()
            .map_err(|(key, message)| invalid(key.into(), message))?;
        Ok(config)
    }

    /// Range and consistency checks serde cannot express.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        for (key, value, range) in self.whole_numbers() {
            if !range.contains(&value) {
                return Err((key, format!("{value} is not in {}..={}", range.start(), range.end())));
            }
        }
        if self.database.kind().is_none() {
            return Err((
                "database.url",
                format!(
                    "unsupported URL {:?}: use sqlite://path.db or postgres://…",
                    without_passwords(&self.database.url)
                ),
            ));
        }
        if let Some(problem) = sqlite_file_problem(&self.database.url) {
            return Err(("database.url", problem));
        }
        for (i, shard) in self.database.shards.iter().enumerate() {
            if let Some(problem) = sqlite_file_problem(shard) {
                return Err(("database.shards", problem));
            }
            if kind_of(shard).is_none() {
                return Err((
                    "database.shards",
                    format!(
                        "unsupported URL {:?}: use sqlite://path.db or postgres://…",
                        without_passwords(shard)
                    ),
                ));
            }
            if *shard == self.database.url || self.database.shards[..i].contains(shard) {
                return Err((
                    "database.shards",
                    format!(
                        "{:?} appears twice: each shard (and the global database) is a database of its own",
                        without_passwords(shard)
                    ),
                ));
            }
        }
        if let Some(bad) = self
            .redis
            .url
            .split(',')
            .map(str::trim)
            .find(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
            .filter(|_| !self.redis.url.is_empty())
        {
            return Err((
                "redis.url",
                format!(
                    "{:?} is not a redis:// URL (leave it empty for in-process; several, comma-separated, for a cluster)",
                    without_passwords(bad)
                ),
            ));
        }
        if self.auth.hs256_secret.len() < 16 {
            return Err((
                "auth.hs256_secret",
                "must be set, at least 16 bytes (or TRIPGATE_AUTH_HS256_SECRET)".into(),
            ));
        }
        if !self.auth.public_key_file.is_empty() && !self.auth.jwks_url.is_empty() {
            return Err((
                "auth.jwks_url",
                "give auth.public_key_file or auth.jwks_url, not both".into(),
            ));
        }
        if !self.auth.jwks_url.is_empty()
            && !self.auth.jwks_url.parse::<axum::http::Uri>().is_ok_and(|uri| {
                matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some_and(|h| !h.is_empty())
            })
        {
            return Err((
                "auth.jwks_url",
                format!("{:?} is not an http(s) URL", without_passwords(&self.auth.jwks_url)),
            ));
        }
        if self.auth.role_claim.is_empty() {
            return Err(("auth.role_claim", "must name a claim".into()));
        }
        if !self.upstream.url.is_empty() {
            match self.upstream.url.parse::<axum::http::Uri>() {
                // Credentials in the URL would be sent to the backend as its Host header.
                Ok(uri) if uri.authority().is_some_and(|a| a.as_str().contains('@')) => {
                    return Err((
                        "upstream.url",
                        format!(
                            "{:?} holds credentials: tripgate forwards the clients' own (Authorization), it has none of its own for the backend",
                            without_passwords(&self.upstream.url)
                        ),
                    ));
                }
                Ok(uri) if forwards_to(&uri, self.server.listen) => {
                    return Err((
                        "upstream.url",
                        format!(
                            "{:?} is tripgate's own server.listen: every request it does not own would come back to it",
                            self.upstream.url
                        ),
                    ));
                }
                Ok(uri) if uri.scheme_str() == Some("http") && uri.authority().is_some() && uri.query().is_none() => {}
                _ => {
                    return Err((
                        "upstream.url",
                        format!(
                            "{:?} is not an http://host:port URL (leave it empty for no pass-through; TLS to the backend belongs to a sidecar)",
                            self.upstream.url
                        ),
                    ));
                }
            }
        }
        if let Some(bad) = self.upstream.route_labels.iter().find(|p| !p.starts_with('/')) {
            return Err((
                "upstream.route_labels",
                format!("{bad:?} is not a path prefix (starts with /)"),
            ));
        }
        for (key, provider) in [
            ("providers.sms", &self.providers.sms),
            ("providers.push", &self.providers.push),
        ] {
            if !(0.0..=1.0).contains(&provider.failure_rate) {
                return Err((
                    if key == "providers.sms" {
                        "providers.sms.failure_rate"
                    } else {
                        "providers.push.failure_rate"
                    },
                    format!("{} is not in 0..=1", provider.failure_rate),
                ));
            }
            let parsed = reqwest::Url::parse(&provider.url);
            let http_url = parsed
                .as_ref()
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty()));
            // A webhook's settings on another kind: most likely `kind = "webhook"` was
            // forgotten, and the messages would go nowhere without a word.
            if provider.kind != ProviderKind::Webhook && (!provider.url.is_empty() || provider.ca_file.is_some()) {
                return Err((
                    if key == "providers.sms" {
                        "providers.sms.kind"
                    } else {
                        "providers.push.kind"
                    },
                    format!(
                        "{:?} with a webhook's url or ca_file: set kind = \"webhook\" (or remove them)",
                        format!("{:?}", provider.kind).to_lowercase()
                    ),
                ));
            }
            if provider.kind == ProviderKind::Webhook && !http_url {
                return Err((
                    if key == "providers.sms" {
                        "providers.sms.url"
                    } else {
                        "providers.push.url"
                    },
                    format!(
                        "{:?}: a webhook provider needs an http(s)://host/… url{}",
                        without_passwords(&provider.url),
                        parsed.err().map(|e| format!(" ({e})")).unwrap_or_default()
                    ),
                ));
            }
        }
        // A bare word is a target to tracing (`warning`: the logs of a module named so, at
        // every level, and nothing else): here it must be a level, and a target is written
        // `target=level`.
        const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
        let bare_word_not_a_level = self.log.level.split(',').any(|directive| {
            let directive = directive.trim();
            !directive.contains('=') && !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(directive))
        });
        if self.log.level.trim().is_empty()
            || bare_word_not_a_level
            || tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err()
        {
            return Err((
                "log.level",
                format!(
                    "{:?} is not a level (trace, debug, info, warn, error, off) or a tracing filter of target=level directives",
                    self.log.level
                ),
            ));
        }
        Ok(())
    }

    /// Every whole-number setting and the range it must be in: at least 1 where 0 would
    /// switch its part off or spin, and an upper bound past which a value is a mistake
    /// that would overflow a timer, a time stamp or a semaphore at run time.
    fn whole_numbers(&self) -> [(&'static str, u64, RangeInclusive<u64>); 29] {
        const DAY_MS: u64 = 86_400_000;
        const DAY_S: u64 = 86_400;
        const COUNT: u64 = 1_000_000;
        let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        let (sms, push) = (&self.providers.sms, &self.providers.push);
        [
            ("server.max_body_bytes", n(self.server.max_body_bytes), 1..=1 << 30),
            (
                "server.rate_limit_per_driver",
                self.server.rate_limit_per_driver.into(),
                1..=COUNT,
            ),
            ("server.shutdown_grace_ms", self.server.shutdown_grace_ms, 0..=DAY_MS),
            ("server.max_connections", n(self.server.max_connections), 1..=COUNT),
            (
                "server.header_read_timeout_ms",
                self.server.header_read_timeout_ms,
                1..=DAY_MS,
            ),
            ("server.idle_timeout_ms", self.server.idle_timeout_ms, 1..=DAY_MS),
            (
                "database.max_connections",
                self.database.max_connections.into(),
                1..=10_000,
            ),
            (
                "database.acquire_timeout_ms",
                self.database.acquire_timeout_ms,
                1..=DAY_MS,
            ),
            ("database.lock_timeout_ms", self.database.lock_timeout_ms, 0..=DAY_MS),
            ("redis.lock_ttl_s", self.redis.lock_ttl_s, 1..=DAY_S),
            ("redis.timeout_ms", self.redis.timeout_ms, 1..=DAY_MS),
            ("auth.token_ttl_s", self.auth.token_ttl_s, 1..=3_660 * DAY_S),
            ("auth.user_cache_ms", self.auth.user_cache_ms, 0..=DAY_MS),
            ("client.timeout_ms", self.client.timeout_ms, 1..=DAY_MS),
            ("providers.sms.latency_ms", sms.latency_ms, 0..=DAY_MS),
            ("providers.sms.timeout_ms", sms.timeout_ms, 1..=DAY_MS),
            ("providers.push.latency_ms", push.latency_ms, 0..=DAY_MS),
            ("providers.push.timeout_ms", push.timeout_ms, 1..=DAY_MS),
            (
                "upstream.connect_timeout_ms",
                self.upstream.connect_timeout_ms,
                1..=DAY_MS,
            ),
            ("upstream.timeout_ms", self.upstream.timeout_ms, 1..=DAY_MS),
            ("upstream.idle_timeout_ms", self.upstream.idle_timeout_ms, 1..=DAY_MS),
            (
                "upstream.max_idle_per_host",
                n(self.upstream.max_idle_per_host),
                0..=COUNT,
            ),
            ("jobs.workers", n(self.jobs.workers), 1..=COUNT),
            ("jobs.max_attempts", self.jobs.max_attempts.into(), 1..=1_000),
            ("jobs.backoff_base_ms", self.jobs.backoff_base_ms, 0..=DAY_MS),
            ("jobs.visibility_timeout_s", self.jobs.visibility_timeout_s, 1..=DAY_S),
            ("jobs.poll_interval_ms", self.jobs.poll_interval_ms, 1..=DAY_MS),
            ("jobs.db_connections", self.jobs.db_connections.into(), 1..=10_000),
            ("jobs.retention_h", self.jobs.retention_h, 0..=87_600),
        ]
    }

    /// `client.timeout_ms` as a duration.
    pub fn client_timeout(&self) -> Duration {
        Duration::from_millis(self.client.timeout_ms)
    }
}

/// Overlays `over` onto `base`, table by table.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Replaces every leaf whose `PREFIX_SECTION_KEY` variable is set. A value that parses as
/// a TOML literal of the leaf's type (number, bool) is taken as such, anything else as a string.
/// The keys that exist only as overrides of a default, and those without one (`Option`s),
/// as `TRIPGATE_*` names.
fn env_names() -> Vec<String> {
    env_keys().into_iter().map(|(name, _)| name).collect()
}

/// Each setting's variable and its dotted key (`TRIPGATE_SERVER_LISTEN`, `server.listen`).
fn env_keys() -> Vec<(String, String)> {
    fn walk(table: &toml::Table, prefix: &str, dotted: &str, out: &mut Vec<(String, String)>) {
        for (key, value) in table {
            let name = format!("{prefix}_{}", key.to_ascii_uppercase());
            let path = if dotted.is_empty() {
                key.clone()
            } else {
                format!("{dotted}.{key}")
            };
            match value {
                toml::Value::Table(inner) => walk(inner, &name, &path, out),
                _ => out.push((name, path)),
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(defaults) = toml::Table::try_from(Config::default()) {
        walk(&defaults, "TRIPGATE", "", &mut out);
    }
    out.extend(
        ["server.demo_routes", "providers.sms.ca_file", "providers.push.ca_file"].map(|k| {
            (
                format!("TRIPGATE_{}", k.replace('.', "_").to_ascii_uppercase()),
                k.to_owned(),
            )
        }),
    );
    out
}

/// A `TRIPGATE_<SECTION>_…` variable that names no setting of that section is a typo that
/// would otherwise be ignored (an unknown key in the file is refused too). Variables
/// outside the sections (`TRIPGATE_ACTOR`, the tests' `TRIPGATE_TEST_*`) are not settings.
fn check_env_names(vars: impl Iterator<Item = String>) -> Result<(), ConfigError> {
    let known = env_names();
    let sections: Vec<String> = toml::Table::try_from(Config::default())
        .map(|t| {
            t.keys()
                .map(|k| format!("TRIPGATE_{}_", k.to_ascii_uppercase()))
                .collect()
        })
        .unwrap_or_default();
    let keys = env_keys();
    for name in vars {
        if known.contains(&name) || kubernetes_service_link(&name) {
            continue;
        }
        if let Some(section) = sections.iter().find(|s| name.starts_with(s.as_str())) {
            return Err(ConfigError::Invalid {
                path: PathBuf::from(format!("environment {name}")),
                key: section["TRIPGATE_".len()..section.len() - 1].to_ascii_lowercase(),
                message: format!("{name} names no setting of this section (misspelt?)"),
            });
        }
        // A misspelt section (TRIPGATE_DATABSE_URL): a name a letter or two from a setting's.
        // Other TRIPGATE_ variables, far from every setting, are none of ours.
        if name.starts_with("TRIPGATE_")
            && let Some((meant, key)) = keys
                .iter()
                .map(|(k, key)| (strsim::levenshtein(k, &name), k, key))
                .filter(|(distance, ..)| *distance <= 2)
                .min_by_key(|(distance, ..)| *distance)
                .map(|(_, k, key)| (k.clone(), key.clone()))
        {
            return Err(ConfigError::Invalid {
                path: PathBuf::from(format!("environment {name}")),
                key,
                message: format!("{name} names no setting; did you mean {meant}?"),
            });
        }
    }
    Ok(())
}

/// A variable Kubernetes sets for a Service in the namespace (`TRIPGATE_REDIS_PORT`,
/// `TRIPGATE_REDIS_SERVICE_HOST`, `TRIPGATE_REDIS_PORT_6379_TCP_ADDR` for a Service named
/// `tripgate-redis`): not a setting, and not a typo of one.
fn kubernetes_service_link(name: &str) -> bool {
    let parts: Vec<&str> = name.split('_').collect();
    let is_port = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    (1..parts.len()).any(|i| {
        let rest = &parts[i + 1..];
        match (parts[i - 1], parts[i]) {
            ("SERVICE", "HOST") => rest.is_empty(),
            ("SERVICE", "PORT") => rest.len() <= 1,
            (_, "PORT") => match rest {
                [] => true,
                [port, proto, tail @ ..] => {
                    is_port(port)
                        && ["TCP", "UDP", "SCTP"].contains(proto)
                        && matches!(tail, [] | ["PROTO"] | ["PORT"] | ["ADDR"])
                }
                _ => false,
            },
            _ => false,
        }
    })
}

fn apply_env(table: &mut toml::Table, prefix: &str, env: &impl Fn(&str) -> Option<String>) {
    for (key, value) in table.iter_mut() {
        let name = format!("{prefix}_{}", key.to_ascii_uppercase());
        match value {
            toml::Value::Table(inner) => apply_env(inner, &name, env),
            leaf => {
                if let Some(raw) = env(&name) {
                    *leaf = parse_env_value(&raw, leaf);
                }
            }
        }
    }
}

/// Sets the leaf at `path`, making its tables as needed.
fn insert_leaf(table: &mut toml::Table, path: &[&str], value: toml::Value) {
    let Some((leaf, tables)) = path.split_last() else {
        return;
    };
    let mut at = table;
    for key in tables {
        let next = at
            .entry(key.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(inner) = next else {
            return;
        };
        at = inner;
    }
    at.insert(leaf.to_string(), value);
}

fn parse_env_value(raw: &str, like: &toml::Value) -> toml::Value {
    if !like.is_str()
        && let Ok(t) = format!("v = {raw}").parse::<toml::Table>()
        && let Some(v) = t.get("v")
    {
        return v.clone();
    }
    toml::Value::String(raw.to_owned())
}

/// A TOML parse error of `text` in one line, saying where: the line, and the line itself,
/// as the parser's own (multi-line) rendering shows it — less the value of a key that may
/// hold a secret, and less the passwords of URLs (the message goes to logs).
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|b| **b == b'\n').count() + 1;
            let source = text.lines().nth(line - 1).unwrap_or_default().trim();
            let secret = source.split_once('=').is_some_and(|(key, _)| {
                let key = key.to_ascii_lowercase();
                ["secret", "password", "token", "key"].iter().any(|k| key.contains(k))
            });
            let source = match source.split_once('=') {
                Some((key, _)) if secret => format!("{} = …", key.trim()),
                _ => without_passwords(source),
            };
            format!("line {line} ({source}): {}", one_line(e.message()))
        }
        None => one_line(e.message()),
    }
}

/// `text` with the password of every URL in it (`scheme://user:password@host`) and the
/// values of its query (`?api_key=…`, libpq's `?password=…`) shown as `***`: configuration
/// errors and warnings go to logs.
pub fn without_passwords(text: &str) -> String {
    // Where a URL ends in running text.
    let ends = |c: char| matches!(c, '"' | '\'' | ',' | ']' | ')') || c.is_whitespace();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#') || ends(c))
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                let user = tail[..at].split(':').next().unwrap_or_default();
                if tail[..at].contains(':') {
                    out.push_str(user);
                    out.push_str(":***");
                } else {
                    out.push_str(&tail[..at]);
                }
                out.push_str(&tail[at..end]);
            }
            None => out.push_str(&tail[..end]),
        }
        rest = &tail[end..];
        // The path as it is; each query value hidden (its names stay: they say what it was).
        let url_end = rest.find(ends).unwrap_or(rest.len());
        let (url, after) = rest.split_at(url_end);
        let (path, query) = url.split_once('?').map_or((url, None), |(p, q)| (p, Some(q)));
        out.push_str(path);
        if let Some(query) = query {
            let (query, fragment) = query.split_once('#').map_or((query, None), |(q, f)| (q, Some(f)));
            out.push('?');
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) => format!("{name}=***"),
                    None => pair.to_owned(),
                })
                .collect();
            out.push_str(&pairs.join("&"));
            if let Some(fragment) = fragment {
                out.push('#');
                out.push_str(fragment);
            }
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Whether `upstream` names the address tripgate itself serves on (`listen`): the same
/// port on the same address, a loopback name or the wildcard it listens on.
fn forwards_to(upstream: &axum::http::Uri, listen: std::net::SocketAddr) -> bool {
    let (Some(host), Some(port)) = (upstream.host(), upstream.port_u16()) else {
        return false;
    };
    if port != listen.port() {
        return false;
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => {
            ip == listen.ip()
                || ((ip.is_loopback() || ip.is_unspecified())
                    && (listen.ip().is_unspecified() || listen.ip().is_loopback()))
        }
        Err(_) => host.eq_ignore_ascii_case("localhost") && (listen.ip().is_loopback() || listen.ip().is_unspecified()),
    }
}

/// `message` with every run of white space (newlines included) folded to one space, so
/// an error reads as one line.
pub fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "[auth]\nhs256_secret = \"0123456789abcdef\"\n";

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_toml(Path::new("config.toml"), text, move |name| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults_fill_missing_keys() {
        let c = parse(SECRET, &[]).unwrap();
        assert_eq!(c.client.timeout_ms, 7_000);
        assert_eq!(c.providers.sms.latency_ms, 1_500);
        assert_eq!(c.providers.push.latency_ms, 800);
        assert_eq!(c.database.kind(), Some(DatabaseKind::Sqlite));
    }

    #[test]
    fn env_overrides_any_key() {
        let c = parse(
            SECRET,
            &[
                ("TRIPGATE_DATABASE_URL", "postgres://u@h/db"),
                ("TRIPGATE_REDIS_URL", "redis://127.0.0.1:6379"),
                ("TRIPGATE_PROVIDERS_SMS_LATENCY_MS", "5"),
                ("TRIPGATE_PROVIDERS_PUSH_KIND", "log"),
            ],
        )
        .unwrap();
        assert_eq!(c.database.kind(), Some(DatabaseKind::Postgres));
        assert_eq!(c.redis.url, "redis://127.0.0.1:6379");
        assert_eq!(c.providers.sms.latency_ms, 5);
        assert_eq!(c.providers.push.kind, ProviderKind::Log);
    }

    #[test]
    fn bad_values_name_their_key_on_one_line() {
        let cases = [
            ("[server]\nlisten = \"nowhere\"\n", "server.listen"),
            ("[server]\nlistne = \"127.0.0.1:1\"\n", "listne"),
            ("[jobs]\nworkers = \"many\"\n", "jobs.workers"),
            ("[database]\nurl = \"mysql://x\"\n", "database.url"),
            ("[database]\nshards = [\"mysql://x\"]\n", "database.shards"),
            (
                "[database]\nshards = [\"sqlite://a.db\", \"sqlite://a.db\"]\n",
                "database.shards",
            ),
            ("[providers.sms]\nfailure_rate = 2.0\n", "providers.sms.failure_rate"),
            ("[providers.push]\nkind = \"webhook\"\n", "providers.push.url"),
            ("[providers.sms]\nkind = \"carrier-pigeon\"\n", "providers.sms.kind"),
            (
                "[providers.sms]\nkind = \"webhook\"\nurl = \"http//127.0.0.1:9/sms\"\n",
                "providers.sms.url",
            ),
            (
                "[providers.sms]\nkind = \"webhook\"\nurl = \"http://\"\n",
                "providers.sms.url",
            ),
            ("[database]\nurl = \"sqlite://\"\n", "names no file"),
            ("[database]\nurl = \"sqlite:\"\n", "database.url"),
            ("[database]\nurl = \"sqlite://data/\"\n", "names a directory"),
            ("[database]\nurl = \"sqlite::memory:\"\n", "database.url"),
            ("[log]\nlevel = \"\"\n", "log.level"),
            (
                "[providers.sms]\nurl = \"http://127.0.0.1:9/sms\"\n",
                "providers.sms.kind",
            ),
            (
                "[providers.push]\nkind = \"log\"\nurl = \"http://127.0.0.1:9/push\"\n",
                "providers.push.kind",
            ),
            // A bare word is a target to tracing: "warning" would switch every log off.
            ("[log]\nlevel = \"warning\"\n", "log.level"),
            ("[log]\nlevel = \"info,verbose\"\n", "log.level"),
            ("[log]\nlevel = \"tripgate=verbose\"\n", "log.level"),
        ];
        for (text, key) in cases {
            let err = parse(&format!("{SECRET}{text}"), &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?} gave {err:?}");
            assert!(!err.contains('\n'), "{err:?} spans lines");
        }
        for good in ["warn", "INFO", "info,tripgate=debug", "tripgate::jobs=trace"] {
            let text = format!("{SECRET}[log]\nlevel = {good:?}\n");
            assert!(parse(&text, &[]).is_ok(), "{good} refused");
        }
        let err = parse("", &[]).unwrap_err().to_string();
        assert!(err.contains("auth.hs256_secret"), "{err}");
        let err = parse("[server\n", &[]).unwrap_err().to_string();
        assert!(!err.contains('\n'), "{err:?}");
        let err = parse(SECRET, &[("TRIPGATE_CLIENT_TIMEOUT_MS", "soon")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("client.timeout_ms"), "{err}");
        assert!(err.contains("environment TRIPGATE_CLIENT_TIMEOUT_MS"), "{err}");
        // The file's value is blamed on the file.
        let err = parse(&format!("{SECRET}[client]\ntimeout_ms = 0\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("config.toml: client.timeout_ms"), "{err}");
        // A syntax error says where.
        let err = parse(&format!("{SECRET}[server]\nrate_limit_per_driver = 20 20\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 4 (rate_limit_per_driver = 20 20)"), "{err}");
    }

    /// Configuration errors go to logs: no secret or password in them; an upstream that
    /// would receive credentials, or tripgate's own address, and a key set URL that is none
    /// are refused at start.
    #[test]
    fn errors_keep_secrets_out_and_odd_urls_are_refused() {
        let err = parse("[auth]\nhs256_secret = \"supersecret0123456\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2 (hs256_secret = …)") && !err.contains("supersecret"),
            "{err}"
        );
        let err = parse(SECRET, &[("TRIPGATE_DATABASE_URL", "postgresql+tls://u:hunter2@db/x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("u:***@db/x") && !err.contains("hunter2"), "{err}");
        let err = parse(&format!("{SECRET}[redis]\nurl = \"http://:hunter2@cache:6379\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains(":***@cache") && !err.contains("hunter2"), "{err}");
        let err = parse(&format!("{SECRET}[database]\nshards = [\"mysql://a:hunter2@x\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        // A provider's key in its webhook URL's query, libpq's password parameter.
        let err = parse(
            &format!("{SECRET}[providers.sms]\nkind = \"webhook\"\nurl = \"ftp://sms/send?api_key=hunter2&to=x\"\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("ftp://sms/send?api_key=***&to=***") && !err.contains("hunter2"),
            "{err}"
        );
        let err = parse(
            SECRET,
            &[("TRIPGATE_DATABASE_URL", "postgresql+tls://db/x?password=hunter2")],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("db/x?password=***") && !err.contains("hunter2"), "{err}");
        let err = parse(
            &format!("{SECRET}[auth]\njwks_url = \"idp://keys?token=hunter2\"\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert_eq!(
            without_passwords("warn url=https://u:p@h:1/a/b?k=v&flag#frag, next"),
            "warn url=https://u:***@h:1/a/b?k=***&flag#frag, next"
        );
        for (text, says) in [
            ("[upstream]\nurl = \"http://u:hunter2@backend:8000\"\n", "credentials"),
            ("[upstream]\nurl = \"http://127.0.0.1:8080\"\n", "own server.listen"),
            ("[upstream]\nurl = \"http://localhost:8080\"\n", "own server.listen"),
            (
                "[server]\nlisten = \"0.0.0.0:9000\"\n[upstream]\nurl = \"http://127.0.0.1:9000\"\n",
                "own server.listen",
            ),
            ("jwks_url = \"http\"\n", "auth.jwks_url"),
            ("jwks_url = \"https//idp/jwks\"\n", "auth.jwks_url"),
            ("jwks_url = \"http://\"\n", "auth.jwks_url"),
        ] {
            let err = parse(&format!("{SECRET}{text}"), &[]).unwrap_err().to_string();
            assert!(err.contains(says) && !err.contains("hunter2"), "{text:?} gave {err:?}");
        }
        for good in [
            "[upstream]\nurl = \"http://127.0.0.1:8081\"\n",
            "[upstream]\nurl = \"http://backend:8080\"\n",
            "jwks_url = \"https://idp.example/.well-known/jwks.json\"\n",
        ] {
            assert!(parse(&format!("{SECRET}{good}"), &[]).is_ok(), "{good} refused");
        }
    }

    #[test]
    fn a_misspelt_variable_of_a_section_is_refused() {
        let vars = |names: &[&str]| check_env_names(names.iter().map(|n| n.to_string()));
        assert!(
            vars(&[
                "TRIPGATE_SERVER_RATE_LIMIT_PER_DRIVER",
                "TRIPGATE_PROVIDERS_SMS_CA_FILE",
                "TRIPGATE_SERVER_DEMO_ROUTES",
                "TRIPGATE_ACTOR",
                "TRIPGATE_TEST_POSTGRES_URL",
                "PATH",
            ])
            .is_ok()
        );
        let err = vars(&["TRIPGATE_SERVER_BOGUS"]).unwrap_err().to_string();
        assert!(err.contains("TRIPGATE_SERVER_BOGUS names no setting"), "{err}");
        assert!(vars(&["TRIPGATE_PROVIDERS_SMS_URLL"]).is_err());
        // A misspelt section: a letter from a setting's name.
        let err = vars(&["TRIPGATE_DATABSE_URL"]).unwrap_err().to_string();
        assert!(err.contains("did you mean TRIPGATE_DATABASE_URL?"), "{err}");
        // Far from every setting: not ours, left alone.
        assert!(vars(&["TRIPGATE_IMAGE_VERSION", "TRIPGATE_BOGUS_X"]).is_ok());
        // What Kubernetes sets for a Service named tripgate-redis or tripgate-server: left alone.
        assert!(
            vars(&[
                "TRIPGATE_REDIS_PORT",
                "TRIPGATE_REDIS_SERVICE_HOST",
                "TRIPGATE_REDIS_SERVICE_PORT",
                "TRIPGATE_REDIS_SERVICE_PORT_REDIS",
                "TRIPGATE_REDIS_PORT_6379_TCP",
                "TRIPGATE_REDIS_PORT_6379_TCP_ADDR",
                "TRIPGATE_SERVER_PORT_8080_TCP_PROTO",
            ])
            .is_ok()
        );
        assert!(vars(&["TRIPGATE_REDIS_PORTT"]).is_err());
    }

    #[test]
    fn keys_without_a_default_are_read_from_the_environment_too() {
        let c = parse(
            SECRET,
            &[
                ("TRIPGATE_SERVER_DEMO_ROUTES", "false"),
                ("TRIPGATE_PROVIDERS_SMS_KIND", "webhook"),
                ("TRIPGATE_PROVIDERS_SMS_URL", "https://sms.example/send"),
                ("TRIPGATE_PROVIDERS_SMS_CA_FILE", "/etc/provider-ca.pem"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.demo_routes, Some(false));
        assert_eq!(
            c.providers.sms.ca_file.as_deref(),
            Some(Path::new("/etc/provider-ca.pem"))
        );
        assert_eq!(c.providers.push.ca_file, None);
        let err = parse(SECRET, &[("TRIPGATE_SERVER_DEMO_ROUTES", "maybe")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.demo_routes"), "{err}");
    }

    #[test]
    fn a_config_file_named_on_the_command_line_must_exist() {
        let missing = std::env::temp_dir().join(format!("tg-no-such-{}.toml", uuid::Uuid::new_v4()));
        let err = Config::load_named(&missing).unwrap_err().to_string();
        assert!(err.contains("cannot read") && err.contains("tg-no-such-"), "{err}");
    }

    #[test]
    fn whole_numbers_out_of_range_are_refused_by_name() {
        let defaults = parse(SECRET, &[]).unwrap();
        for (key, _, range) in defaults.whole_numbers() {
            let (section, leaf) = key.rsplit_once('.').unwrap();
            // SECRET ends inside [auth].
            let table = if section == "auth" {
                String::new()
            } else {
                format!("[{section}]\n")
            };
            let outside = [range.start().checked_sub(1), Some(range.end() + 1)];
            for value in outside.into_iter().flatten().chain([i64::MAX as u64]) {
                let text = format!("{SECRET}{table}{leaf} = {value}\n");
                let err = parse(&text, &[]).unwrap_err().to_string();
                assert!(err.contains(key), "{key} = {value} gave {err:?}");
            }
            for value in [range.start(), range.end()] {
                let text = format!("{SECRET}{table}{leaf} = {value}\n");
                assert!(parse(&text, &[]).is_ok(), "{key} = {value} refused");
            }
        }
    }

    #[test]
    fn shipped_config_is_valid() {
        let text = include_str!("../config.toml");
        let c = parse(text, &[]).unwrap();
        assert_eq!(c.providers.sms.kind, ProviderKind::Simulated);
        assert_eq!(c.providers.sms.latency_ms, 1_500);
        assert_eq!(c.providers.push.latency_ms, 800);
        // The demo routes follow `[upstream]`: on for the embedded demo, off in front of a
        // backend (its own customer routes answer; the shipped file used to force them on).
        assert!(c.demo_routes());
        let c = parse(text, &[("TRIPGATE_UPSTREAM_URL", "http://127.0.0.1:8000")]).unwrap();
        assert!(!c.demo_routes());
    }
}
