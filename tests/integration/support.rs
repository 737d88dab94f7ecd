//! Test harness: fresh databases per test (a SQLite file, or a new Postgres database on the
//! shared server), a unique Redis key prefix, in-process gateways on `127.0.0.1:0`, a
//! webhook stub that records provider calls, private Redis servers and a cuttable TCP
//! proxy for fault tests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::http::StatusCode;
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tripgate::auth::{Role, TokenKeys};
use tripgate::config::{Config, ProviderKind};
use tripgate::domain::{LatLng, Receiver, TripType};
use tripgate::server::{Role as ServerRole, Running, start};
use tripgate::storage::Storage;
use tripgate::storage::trips::NewTrip;
use tripgate::storage::users::NewDriver;

pub const SECRET: &str = "integration-test-secret-0123456789";

/// Which database a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates one test per backend: `name::sqlite` and `name::postgres`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn sqlite() {
                    super::$name($crate::support::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn postgres() {
                    if $crate::support::postgres_url().is_some() {
                        super::$name($crate::support::Backend::Postgres).await
                    }
                }
            }
        )*
    };
}

fn required() -> bool {
    std::env::var("TRIPGATE_TEST_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// The shared Postgres server's URL, or `None` (loudly) when the tests run without one.
pub fn postgres_url() -> Option<String> {
    match std::env::var("TRIPGATE_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                !required(),
                "TRIPGATE_TEST_REQUIRE_SERVICES=1 but TRIPGATE_TEST_POSTGRES_URL is not set"
            );
            eprintln!(
                "SKIPPED (Postgres): set TRIPGATE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run"
            );
            None
        }
    }
}

/// The shared Redis server's URL, or `None` (loudly).
pub fn redis_url() -> Option<String> {
    match std::env::var("TRIPGATE_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                !required(),
                "TRIPGATE_TEST_REQUIRE_SERVICES=1 but TRIPGATE_TEST_REDIS_URL is not set"
            );
            eprintln!("SKIPPED (Redis): set TRIPGATE_TEST_REDIS_URL=redis://127.0.0.1:6379 to run");
            None
        }
    }
}

/// The Redis a test of `backend` runs with: the shared one with Postgres (the production
/// pair), none (in-process lock store) with SQLite.
pub fn redis_for(backend: Backend) -> Option<String> {
    match backend {
        Backend::Postgres => redis_url(),
        Backend::Sqlite => None,
    }
}

/// Whether `redis-server` can be started for private fault-test instances.
pub fn redis_server_available() -> bool {
    program_installed("redis-server", "redis-server")
}

/// Whether `program` runs (`program --version`); when not, `false` (loudly), or a failure
/// under `TRIPGATE_TEST_REQUIRE_SERVICES=1`. `package` is the Debian package that has it.
pub fn program_installed(program: &str, package: &str) -> bool {
    let ok = std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !required(),
            "TRIPGATE_TEST_REQUIRE_SERVICES=1 but {program} is not installed (Debian package {package})"
        );
        eprintln!("SKIPPED ({program}): install Debian's {package} package to run");
    }
    ok
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// A temp directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("tripgate-test"));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A database of its own for one test. A guard: the Postgres database is dropped (and the
/// SQLite file's temp dir removed) when it goes out of scope, also when the test panics.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    /// On Postgres: the shared server's URL (its own database) and the test database's name.
    pg: Option<(String, String)>,
    _dir: TempDir,
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        let dir = TempDir::new();
        match backend {
            Backend::Sqlite => Self {
                backend,
                url: format!("sqlite://{}", dir.path().join("tripgate.db").display()),
                pg: None,
                _dir: dir,
            },
            Backend::Postgres => {
                let base = postgres_url().expect("postgres tests only run with a URL");
                let name = unique("tg_test");
                let mut conn = sqlx::PgConnection::connect(&base).await.unwrap();
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                Self {
                    backend,
                    url: with_database(&base, &name),
                    pg: Some((base, name)),
                    _dir: dir,
                }
            }
        }
    }

    /// The Postgres database's name (`None` on SQLite).
    pub fn pg_name(&self) -> Option<&str> {
        self.pg.as_ref().map(|(_, name)| name.as_str())
    }

    /// A storage handle on this database, migrated.
    pub async fn store(&self) -> Storage {
        let mut config = Config::default();
        config.database.url = self.url.clone();
        let store = Storage::connect(&config.database).unwrap();
        store.migrate().await.unwrap();
        store
    }
}

impl Drop for TestDb {
    /// Drops the Postgres database, waiting for it; never panics (it may run while a failed
    /// test unwinds). `Drop` is synchronous and may run on a runtime's thread, so the
    /// cleanup gets a thread and a small runtime of its own. `WITH (FORCE)` ends the
    /// sessions still open on it (a gateway not shut down, a `tripgate` process).
    fn drop(&mut self) {
        let Some((server, name)) = self.pg.take() else {
            return;
        };
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let dropped = async {
                    let mut conn = sqlx::PgConnection::connect(&server).await?;
                    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await?;
                    conn.close().await
                };
                match tokio::time::timeout(Duration::from_secs(30), dropped).await {
                    Ok(result) => result.map_err(|e| format!("{name}: {e}")),
                    Err(_) => Err(format!("{name}: timed out")),
                }
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("test database not dropped: {e}"),
            Err(_) => eprintln!("test database not dropped: cleanup thread panicked"),
        }
    }
}

/// `url` with its database name replaced.
pub fn with_database(url: &str, name: &str) -> String {
    let (head, query) = url.split_once('?').map_or((url, None), |(h, q)| (h, Some(q)));
    let scheme_end = head.find("://").map_or(0, |i| i + 3);
    let base = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i],
        None => head,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

// === webhook stub ===

/// A local provider endpoint: records every call, can fail or be slow on demand.
#[derive(Clone)]
pub struct WebhookStub {
    pub addr: SocketAddr,
    calls: Arc<Mutex<Vec<Value>>>,
    fail: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    /// (kind, delay) pairs: slow down one kind of call only.
    kind_delays: Arc<Mutex<Vec<(String, u64)>>>,
}

impl WebhookStub {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// The stub behind HTTPS, with a certificate for `localhost` / 127.0.0.1 issued by a
    /// test CA made here (openssl). Returns the stub and the CA's PEM file.
    pub async fn start_https(dir: &Path) -> (Self, PathBuf) {
        let tls = test_ca_and_server_cert(dir);
        (Self::start_with(Some(tls)).await, dir.join("ca.pem"))
    }

    async fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let fail = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let kind_delays: Arc<Mutex<Vec<(String, u64)>>> = Arc::new(Mutex::new(Vec::new()));
        let (c, f, d, k) = (calls.clone(), fail.clone(), delay_ms.clone(), kind_delays.clone());
        let app = axum::Router::new().route(
            "/{channel}",
            axum::routing::post(move |Json(body): Json<Value>| {
                let (c, f, d, k) = (c.clone(), f.clone(), d.clone(), k.clone());
                async move {
                    let kind = body["kind"].as_str().unwrap_or_default().to_owned();
                    c.lock().unwrap().push(body);
                    let per_kind = k.lock().unwrap().iter().find(|(n, _)| *n == kind).map(|(_, ms)| *ms);
                    let delay = per_kind.unwrap_or_else(|| d.load(Ordering::SeqCst));
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    if f.load(Ordering::SeqCst) {
                        (StatusCode::INTERNAL_SERVER_ERROR, "provider down")
                    } else {
                        (StatusCode::OK, "ok")
                    }
                }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        match tls {
            None => {
                tokio::spawn(async move { axum::serve(listener, app).await });
            }
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                tokio::spawn(async move {
                    while let Ok((tcp, _)) = listener.accept().await {
                        let (acceptor, app) = (acceptor.clone(), app.clone());
                        tokio::spawn(async move {
                            // A client that refuses the certificate ends here.
                            let Ok(stream) = acceptor.accept(tcp).await else { return };
                            let service = hyper_util::service::TowerToHyperService::new(app);
                            let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        });
                    }
                });
            }
        }
        Self {
            addr,
            calls,
            fail,
            delay_ms,
            kind_delays,
        }
    }

    /// Slows down calls of `kind` only.
    pub fn set_delay_for(&self, kind: &str, ms: u64) {
        let mut delays = self.kind_delays.lock().unwrap();
        delays.retain(|(k, _)| k != kind);
        delays.push((kind.to_owned(), ms));
    }

    pub fn url(&self, channel: &str) -> String {
        format!("http://{}/{channel}", self.addr)
    }
    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }
    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }
    pub fn calls(&self) -> Vec<Value> {
        self.calls.lock().unwrap().clone()
    }
    /// Calls of `kind` about `trip_id`.
    pub fn calls_for(&self, kind: &str, trip_id: &str) -> Vec<Value> {
        self.calls()
            .into_iter()
            .filter(|c| c["kind"] == kind && c["trip_id"] == trip_id)
            .collect()
    }
    /// Calls of `kind`.
    pub fn count(&self, kind: &str) -> usize {
        self.calls().iter().filter(|c| c["kind"] == kind).count()
    }
}

/// `openssl <args>` in `dir`; its stdout (fails the test when openssl does).
pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes, with openssl, a test CA (`ca.pem`) and a server certificate it signed for
/// `localhost` and 127.0.0.1; returns a rustls server config serving the latter.
fn test_ca_and_server_cert(dir: &Path) -> Arc<rustls::ServerConfig> {
    let run = |args: &[&str]| {
        openssl(dir, args);
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=tripgate test CA",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"],
    ]
    .concat());
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-outform",
        "DER",
        "-out",
        "server.der",
    ]);
    run(&[
        "pkcs8",
        "-topk8",
        "-nocrypt",
        "-in",
        "server.key",
        "-outform",
        "DER",
        "-out",
        "server.key.der",
    ]);
    let cert = rustls::pki_types::CertificateDer::from(std::fs::read(dir.join("server.der")).unwrap());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(std::fs::read(dir.join("server.key.der")).unwrap().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    Arc::new(config)
}

// === gateway ===

/// How to configure a test gateway.
#[derive(Clone)]
pub struct Options {
    pub percent: f64,
    pub redis_url: Option<String>,
    pub webhook: Option<String>,
    pub provider_latency_ms: u64,
    pub lock_ttl_s: u64,
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub visibility_timeout_s: u64,
    pub client_timeout_ms: u64,
    pub allow: Vec<String>,
    pub acquire_timeout_ms: u64,
    pub rate_limit_per_driver: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            percent: 0.0,
            redis_url: None,
            webhook: None,
            provider_latency_ms: 0,
            lock_ttl_s: 300,
            max_attempts: 5,
            backoff_base_ms: 20,
            visibility_timeout_s: 60,
            client_timeout_ms: 7_000,
            allow: Vec::new(),
            acquire_timeout_ms: 2_000,
            rate_limit_per_driver: 20,
        }
    }
}

/// The flags file text for `percent` and an allow list.
pub fn flags_text(percent: f64, allow: &[String]) -> String {
    let allow: Vec<String> = allow.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "# test flags\n[trip_accept_v2]\npercent = {percent}\nsalt = \"trip_accept_v2\"\nallow = [{}]\ndeny = []\n",
        allow.join(", ")
    )
}

/// A config for a test gateway on `db`.
pub fn config(db_url: &str, dir: &Path, o: &Options) -> Config {
    let flags = dir.join("flags").join("rollout.toml");
    if !flags.exists() {
        std::fs::create_dir_all(flags.parent().unwrap()).unwrap();
        std::fs::write(&flags, flags_text(o.percent, &o.allow)).unwrap();
    }
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    c.jobs.admin_listen = "127.0.0.1:0".parse().unwrap();
    c.server.shutdown_grace_ms = 2_000;
    c.server.rate_limit_per_driver = o.rate_limit_per_driver;
    c.database.url = db_url.to_owned();
    c.database.max_connections = 16;
    c.database.acquire_timeout_ms = o.acquire_timeout_ms;
    c.redis.url = o.redis_url.clone().unwrap_or_default();
    c.redis.key_prefix = unique("tgtest");
    c.redis.lock_ttl_s = o.lock_ttl_s;
    c.redis.timeout_ms = 200;
    c.flags.path = flags;
    c.auth.hs256_secret = SECRET.into();
    c.client.timeout_ms = o.client_timeout_ms;
    for (provider, channel) in [(&mut c.providers.sms, "sms"), (&mut c.providers.push, "push")] {
        match &o.webhook {
            Some(base) => {
                provider.kind = ProviderKind::Webhook;
                provider.url = format!("{base}/{channel}");
                provider.timeout_ms = 3_000;
            }
            None => {
                provider.kind = ProviderKind::Simulated;
                provider.latency_ms = o.provider_latency_ms;
            }
        }
    }
    c.jobs.workers = 4;
    c.jobs.max_attempts = o.max_attempts;
    c.jobs.backoff_base_ms = o.backoff_base_ms;
    c.jobs.visibility_timeout_s = o.visibility_timeout_s;
    c.jobs.poll_interval_ms = 200;
    c
}

/// An in-process gateway on its own database, with an HTTP client.
pub struct Gateway {
    pub running: Option<Running>,
    pub api: String,
    pub admin: String,
    pub store: Storage,
    pub config: Config,
    pub http: reqwest::Client,
    pub keys: TokenKeys,
    pub dir: TempDir,
}

impl Gateway {
    pub async fn start(db: &TestDb, options: Options) -> Self {
        let dir = TempDir::new();
        let config = config(&db.url, dir.path(), &options);
        Self::start_with(config, dir).await
    }

    pub async fn start_with(config: Config, dir: TempDir) -> Self {
        let running = start(config.clone(), ServerRole::Serve).await.unwrap();
        let api = format!("http://{}", running.api_addr.unwrap());
        let admin = format!("http://{}", running.admin_addr.unwrap());
        let store = running.store.clone();
        let gw = Self {
            running: Some(running),
            api,
            admin,
            store,
            keys: TokenKeys::new(SECRET, 3600),
            config,
            http: reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap(),
            dir,
        };
        gw.wait_ready().await;
        gw
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.admin)).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "gateway not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn token(&self, sub: &str, role: Role) -> String {
        self.keys.mint(sub, role).unwrap()
    }

    /// POST the trip action as `driver`.
    pub async fn action(&self, driver: &str, trip: &str, action: &str) -> (u16, Value, String) {
        let token = self.token(driver, Role::Driver);
        let body = json!({"trip_request_id": trip, "action": action});
        self.post_raw(
            "/api/driver/trip/request-action",
            Some(&token),
            "application/json",
            body.to_string().into_bytes(),
        )
        .await
    }

    pub async fn accept(&self, driver: &str, trip: &str) -> (u16, Value, String) {
        self.action(driver, trip, "accepted").await
    }

    /// A raw POST; returns status, JSON body (or Null) and the cohort header.
    pub async fn post_raw(
        &self,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> (u16, Value, String) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.api))
            .header("content-type", content_type)
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let cohort = res
            .headers()
            .get("x-tripgate-cohort")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = res.json::<Value>().await.unwrap_or(Value::Null);
        (status, body, cohort)
    }

    pub async fn admin_get(&self, path: &str) -> (u16, Value) {
        let token = self.token("admin", Role::Admin);
        let res = self
            .http
            .get(format!("{}{path}", self.admin))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Trip details as an admin sees them.
    pub async fn details(&self, trip: &str) -> Value {
        let token = self.token("admin", Role::Admin);
        let res = self
            .http
            .get(format!("{}/api/customer/ride/details/{trip}", self.api))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        res.json::<Value>().await.unwrap()["data"].clone()
    }

    /// Waits until every side effect of `trip` is done; returns the trip's details.
    pub async fn wait_effects_done(&self, trip: &str, within: Duration) -> Value {
        wait_effects_done(&self.store, trip, within).await;
        self.details(trip).await
    }

    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

// === world ===

/// Creates categories, drivers, customers and trips directly in storage.
pub struct World {
    pub store: Storage,
    pub category: String,
    pub other_category: String,
    pub customer: String,
}

impl World {
    pub async fn new(store: &Storage) -> Self {
        let category = store.create_vehicle_category("Standard").await.unwrap();
        let other_category = store.create_vehicle_category("Premium").await.unwrap();
        let customer = store.create_customer("Test Customer", "+8800000000001").await.unwrap();
        Self {
            store: store.clone(),
            category,
            other_category,
            customer,
        }
    }

    pub async fn driver(&self) -> String {
        self.driver_in(&self.category.clone()).await
    }

    pub async fn driver_in(&self, category: &str) -> String {
        let n = uuid::Uuid::new_v4().as_u128() % 1_000_000_000;
        self.store
            .create_driver(&NewDriver {
                name: format!("Driver {n}"),
                phone: format!("+8801{n:09}"),
                vehicle_category_id: category.to_owned(),
                online: true,
                position: LatLng { lat: 23.80, lng: 90.41 },
            })
            .await
            .unwrap()
            .0
    }

    pub async fn drivers(&self, n: usize) -> Vec<String> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.driver().await);
        }
        out
    }

    pub async fn trip(&self, offered_to: &[String]) -> String {
        self.trip_of(TripType::Ride, offered_to).await
    }

    pub async fn trip_of(&self, trip_type: TripType, offered_to: &[String]) -> String {
        let trip = NewTrip {
            customer_id: self.customer.clone(),
            vehicle_category_id: self.category.clone(),
            trip_type,
            estimated_fare_cents: 25_000,
            offered_to: offered_to.to_vec(),
            pickup: LatLng { lat: 23.81, lng: 90.41 },
            destination: LatLng { lat: 23.75, lng: 90.39 },
            receiver: (trip_type == TripType::Parcel).then(|| Receiver {
                name: "Rahim".into(),
                phone: "+8809999999999".into(),
            }),
            bid_on_fare: false,
        };
        self.store.create_trip(&trip).await.unwrap().unwrap()
    }
}

// === private Redis ===

/// A `redis-server` of the test's own on a free port; killed on drop.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        let port = free_port();
        let mut r = Self { port, child: None };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(Instant::now() < deadline, "private redis did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port free now, for a child process to listen on. Taken below the kernel's ephemeral
/// range (32768–60999 by default), so that none of the run's many outgoing connections can
/// take it as its local port between here and the child's bind (which made a spawned
/// `serve` fail to start under load); handed out in sequence from a random start, so two
/// tests of this run never get the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: std::sync::OnceLock<AtomicU32> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| AtomicU32::new(rand::random_range(0..12_000)));
    loop {
        let port = 20_000 + (next.fetch_add(1, Ordering::Relaxed) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

// === TCP proxy ===

/// A TCP proxy in front of a server; `cut` drops every connection and refuses new ones
/// (the server "goes away"), `restore` lets them through again.
pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    /// While cut: hold new connections open without an answer (a host that went silent)
    /// instead of closing them (a host that refuses).
    silent: Arc<AtomicBool>,
    /// Added before each chunk of the server's answers (a slow server or link).
    reply_delay_ms: Arc<AtomicU64>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let silent = Arc::new(AtomicBool::new(false));
        let reply_delay_ms = Arc::new(AtomicU64::new(0));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::new(Mutex::new(Vec::new()));
        let (u, c, quiet, slow) = (up.clone(), conns.clone(), silent.clone(), reply_delay_ms.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !u.load(Ordering::SeqCst) {
                    if quiet.load(Ordering::SeqCst) {
                        let held = tokio::spawn(async move {
                            let _inbound = inbound;
                            std::future::pending::<()>().await
                        });
                        c.lock().unwrap().push(held);
                    }
                    continue;
                }
                let slow = slow.clone();
                let task = tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut in_read, mut in_write) = inbound.into_split();
                    let (mut out_read, mut out_write) = outbound.into_split();
                    let requests = tokio::io::copy(&mut in_read, &mut out_write);
                    let replies = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match out_read.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            let delay = slow.load(Ordering::SeqCst);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            if in_write.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = requests => {}
                        () = replies => {}
                    }
                });
                c.lock().unwrap().push(task);
            }
        });
        Self {
            port,
            up,
            silent,
            reply_delay_ms,
            conns,
            accept,
        }
    }

    /// Connections let through so far (not counting any held or refused while cut).
    pub fn connections(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// Delays each chunk of the server's answers by `ms` (0: none).
    pub fn slow_replies(&self, ms: u64) {
        self.reply_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Cuts every connection; new ones are held open and never answered.
    pub fn go_silent(&self) {
        self.silent.store(true, Ordering::SeqCst);
        self.cut();
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for task in self.conns.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    pub fn restore(&self) {
        self.silent.store(false, Ordering::SeqCst);
        self.up.store(true, Ordering::SeqCst);
        // Drop the connections held while silent.
        for task in self.conns.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// A cuttable TCP proxy in front of the shared Postgres server (whose URL is `base`), and
/// `db`'s URL through it.
pub async fn proxied_postgres(base: &str, db: &TestDb) -> (Proxy, String) {
    let host = base
        .split('@')
        .nth(1)
        .unwrap_or("127.0.0.1:5432")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let target = tokio::net::lookup_host(host).await.unwrap().next().unwrap();
    let proxy = Proxy::start(target).await;
    let url = db
        .url
        .replacen(&format!(":{}/", target.port()), &format!(":{}/", proxy.port), 1);
    assert_ne!(url, db.url, "the proxy's port is in the URL");
    (proxy, url)
}

/// Runs `n` accepts of `drivers` on `trip` at once; returns (status, body, cohort) each.
pub async fn race(gw: &Gateway, drivers: &[String], trip: &str) -> Vec<(u16, Value, String)> {
    let barrier = Arc::new(tokio::sync::Barrier::new(drivers.len()));
    let futures = drivers.iter().map(|d| {
        let barrier = barrier.clone();
        async move {
            barrier.wait().await;
            gw.accept(d, trip).await
        }
    });
    futures_util::future::join_all(futures).await
}

/// Polls `check` every 25 ms until it returns `Some`, or panics after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until `trip` has side effects recorded and every one is done (read in `store`,
/// so also for the gateway processes of a test); panics with the states after `within`.
pub async fn wait_effects_done(store: &Storage, trip: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let states = store.effect_states(trip).await;
        if let Ok(states) = &states
            && !states.is_empty()
            && states.values().all(|s| s == "done")
        {
            return;
        }
        assert!(Instant::now() < deadline, "effects of {trip} not done: {states:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The `/metrics` exposition of the admin listener at `admin` (`http://host:port`).
pub async fn metrics_at(admin: &str) -> String {
    reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Waits until a `tripgate serve` process answers 200 on `/readyz` of its admin listener
/// (`host:port`).
pub async fn wait_process_ready(admin: impl std::fmt::Display) {
    let http = reqwest::Client::new();
    let url = format!("http://{admin}/readyz");
    eventually(Duration::from_secs(20), "serve ready", || {
        let (http, url) = (http.clone(), url.clone());
        async move { (http.get(url).send().await.ok()?.status() == 200).then_some(()) }
    })
    .await;
}

/// Applies only the given migration files (from `migrations/<database>/`) to `db`: the
/// schema of an earlier release, for upgrade tests.
pub async fn apply_migrations(db: &TestDb, sqlite: &[&str], postgres: &[&str]) {
    let (dialect, files) = match db.backend {
        Backend::Sqlite => ("sqlite", sqlite),
        Backend::Postgres => ("postgres", postgres),
    };
    let dir = TempDir::new();
    for file in files {
        let from = format!("{}/migrations/{dialect}/{file}", env!("CARGO_MANIFEST_DIR"));
        std::fs::copy(&from, dir.path().join(file)).unwrap();
    }
    let migrator = sqlx::migrate::Migrator::new(dir.path()).await.unwrap();
    assert_eq!(migrator.iter().count(), files.len());
    match db.backend {
        Backend::Sqlite => {
            let options: sqlx::sqlite::SqliteConnectOptions = db.url.parse().unwrap();
            let pool = sqlx::SqlitePool::connect_with(options.create_if_missing(true))
                .await
                .unwrap();
            migrator.run(&pool).await.unwrap();
            pool.close().await;
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            migrator.run(&pool).await.unwrap();
            pool.close().await;
        }
    }
}

/// Runs SQL on the test database directly (fault injection).
/// The one integer `sql` answers on `db`.
pub async fn query_i64(db: &TestDb, sql: &str) -> i64 {
    match db.backend {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap()
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap()
        }
    }
}

/// Deactivates user `id` behind the gateway's back (as the backend's admin would).
pub async fn deactivate_user(db: &TestDb, id: &str) {
    execute_sql(db, &format!("UPDATE users SET is_active = FALSE WHERE id = '{id}'")).await;
}

pub async fn execute_sql(db: &TestDb, sql: &str) {
    match db.backend {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
        }
    }
}

/// A `tripgate` process of its own (serve or worker), killed on drop.
pub struct Process {
    pub child: std::process::Child,
    pub config_path: PathBuf,
}

impl Process {
    /// Writes `config` as TOML beside its flags and starts `tripgate <command>`.
    pub fn spawn(command: &str, config: &Config, dir: &Path) -> Self {
        let config_path = dir.join(format!("{}.toml", unique(command)));
        std::fs::write(&config_path, toml::to_string(config).unwrap()).unwrap();
        let log = std::fs::File::create(config_path.with_extension("log")).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tripgate"))
            .arg(command)
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self { child, config_path }
    }

    /// SIGKILL: no cleanup, no graceful anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The `response_code` of an API answer (`""` when there is none).
pub fn code(body: &Value) -> &str {
    body["response_code"].as_str().unwrap_or("")
}

/// The value of the sample in a `/metrics` exposition whose line starts with `series`
/// (name and labels, as rendered); panics when there is none, so a renamed series fails
/// loudly instead of reading as 0.
pub fn metric_value(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in /metrics"))
}
