//! HTTP: the driver and customer API (`server.listen`) and the admin listener
//! (`server.admin_listen`), built with axum.
//!
//! Layers, outside in: request id → per-request log line (and metrics) → body limit →
//! auth (401/403 before anything reads the body) → the body read whole, bounded in size
//! and time ([`read_body`]) → the route's handler; for the driver routes that parses the
//! command and hands it to the rollout router.

pub mod admin;
pub mod console;
pub mod customer;
pub mod driver;
pub mod listener;
pub mod observe;
pub mod rate_limit;
pub mod upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::{AuthUser, Role, TokenKeys};
use crate::config::Config;
use crate::error::ApiError;
use crate::flags::FlagsHandle;
use crate::lock_store::LockStore;
use crate::redis_conn::RedisHandle;
use crate::storage::Storage;

/// What every handler can reach: one shared [`Shared`] behind an `Arc`, so the per-request
/// clones axum makes (state extractors, middleware) cost one reference count, not one per
/// field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// The state of `shared`.
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct Shared {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// The global database (flags, overrides, audit, guard), the request path's pool.
    pub store: Storage,
    /// Where drivers, customers and trips live (the global database alone unless
    /// `database.shards`), the request path's pools.
    pub shards: crate::storage::shards::Shards,
    /// The same, the job workers' pools (reported by `/metrics`).
    pub job_shards: crate::storage::shards::Shards,
    /// Token verification.
    pub keys: TokenKeys,
    /// The rollout flags in force.
    pub flags: FlagsHandle,
    /// Redis, when configured (for `/readyz`).
    pub redis: Option<RedisHandle>,
    /// The lock store (for `/readyz`).
    pub locks: Arc<dyn LockStore>,
    /// True once the global database's migrations ran: until then `/readyz` answers 503.
    pub migrated: Arc<AtomicBool>,
    /// Each shard's readiness, and whether the shard list contradicts the shards' own record.
    pub shard_health: Arc<ShardHealth>,
    /// Request metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Users recently found to exist (`auth.user_cache_ms`).
    pub known_users: Arc<crate::storage::users::KnownUsers>,
    /// The backend's own tokens (RS256 / ES256), when `auth` names their keys.
    pub backend_keys: Option<Arc<crate::auth::BackendKeys>>,
    /// The backend routes tripgate does not own are forwarded to (`[upstream]`).
    pub upstream: Option<upstream::Upstream>,
}

/// What `/readyz` and the driver route know of the shards.
#[derive(Debug)]
pub struct ShardHealth {
    /// Per shard: migrated, its identity checked, its workers started.
    pub migrated: Vec<AtomicBool>,
    /// Set when a shard's database says it is another shard (or of another count) than
    /// `database.shards` makes it: the gateway then refuses to serve (503, not ready).
    pub misrouted: arc_swap::ArcSwapOption<String>,
}

impl ShardHealth {
    /// Nothing known yet of `shards` shards.
    pub fn new(shards: usize) -> Self {
        Self {
            migrated: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            misrouted: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// Shard `index` has been migrated; else 503: until its migrations ran (its database was
    /// down at start, or they are still running) it lacks the tables this release uses.
    pub fn ready(&self, index: usize) -> Result<(), ApiError> {
        if self.migrated.get(index).is_some_and(|m| m.load(Ordering::Acquire)) {
            Ok(())
        } else {
            Err(ApiError::Unavailable(format!("shard {index} is not migrated yet")))
        }
    }

    /// Every shard has been migrated (for a request that spans them all); else 503.
    pub fn all_ready(&self) -> Result<(), ApiError> {
        (0..self.migrated.len()).try_for_each(|i| self.ready(i))
    }
}

/// Who settles that a token's user exists: the auth layer, or the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UserCheck {
    /// The auth layer looks the user up (at most once per `auth.user_cache_ms`).
    Now,
    /// A driver the cache does not know is let through marked [`UserUnchecked`]: the route
    /// settles it (the driver route: inside the atomic_async accept's own statement, or
    /// by the same lookup before anything else).
    ByRoute,
}

/// On a request whose driver the auth layer let through unchecked ([`UserCheck::ByRoute`]).
#[derive(Debug, Clone, Copy)]
pub struct UserUnchecked;

/// Verifies the bearer token: valid signature and times, and (drivers and customers) a
/// user that exists with that role (looked up at most once per `auth.user_cache_ms`; with
/// [`UserCheck::ByRoute`] a driver the cache does not know is left to the route: the
/// second value is then false). Then the role must be one of `allowed`.
async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    allowed: &[Role],
    check: UserCheck,
) -> Result<(AuthUser, bool), ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .ok_or(ApiError::Unauthorized)?;
    let user = match state.keys.verify(token) {
        Some(claims) => AuthUser {
            id: claims.sub,
            role: claims.role,
        },
        None => match &state.backend_keys {
            Some(keys) => keys.verify(token).await.ok_or(ApiError::Unauthorized)?,
            None => return Err(ApiError::Unauthorized),
        },
    };
    // A token must name someone: an admin's subject is the audit's actor.
    if user.id.trim().is_empty() {
        return Err(ApiError::Unauthorized);
    }
    let mut checked = true;
    if user.role != Role::Admin {
        // A shard list that contradicts the shards' own record would look users and trips
        // up in the wrong database: refuse (admins still reach the admin API).
        if let Some(reason) = state.shard_health.misrouted.load_full() {
            return Err(ApiError::Unavailable(reason.to_string()));
        }
        let user_type = if check == UserCheck::ByRoute && user.role == Role::Driver {
            state.known_users.cached(&user.id).or_else(|| {
                checked = false;
                Some(user.role.as_str().to_owned())
            })
        } else {
            state
                .known_users
                .user_type(state.shards.for_id(&user.id), &user.id)
                .await?
        };
        if user_type.as_deref() != Some(user.role.as_str()) {
            return Err(ApiError::Unauthorized);
        }
    }
    if !allowed.contains(&user.role) {
        return Err(ApiError::Forbidden);
    }
    Ok((user, checked))
}

/// Middleware: authenticate as one of `allowed`, or answer 401/403.
async fn require(
    state: AppState,
    allowed: &'static [Role],
    check: UserCheck,
    mut req: Request,
    next: Next,
) -> Response {
    match authenticate(&state, req.headers(), allowed, check).await {
        Ok((user, checked)) => {
            req.extensions_mut().insert(user.clone());
            if !checked {
                req.extensions_mut().insert(UserUnchecked);
            }
            let mut res = next.run(req).await;
            res.extensions_mut().insert(user);
            res
        }
        Err(e) => e.into_response(),
    }
}

/// Middleware: drivers only; a driver the user cache does not know is passed on
/// [`UserUnchecked`], for the route to settle.
pub async fn drivers_checked_by_route(State(s): State<AppState>, req: Request, next: Next) -> Response {
    require(s, &[Role::Driver], UserCheck::ByRoute, req, next).await
}

/// Middleware: customers only.
pub async fn customers(State(s): State<AppState>, req: Request, next: Next) -> Response {
    require(s, &[Role::Customer], UserCheck::Now, req, next).await
}

/// Middleware: customers and admins.
pub async fn customers_or_admins(State(s): State<AppState>, req: Request, next: Next) -> Response {
    require(s, &[Role::Customer, Role::Admin], UserCheck::Now, req, next).await
}

/// Middleware: admins only.
pub async fn admins(State(s): State<AppState>, req: Request, next: Next) -> Response {
    require(s, &[Role::Admin], UserCheck::Now, req, next).await
}

/// A query string's parameters, or a 400 in the API's envelope naming the query (axum's own
/// rejection is plain text).
pub fn query<T>(q: Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>) -> Result<T, ApiError> {
    q.map(|axum::extract::Query(q)| q)
        .map_err(|e| ApiError::invalid("query", e.body_text()))
}

/// A route's path parameters (axum's `Path`), refused in the envelope: a parameter that is
/// not UTF-8 (`%FF`) or not of its type is a `400 default_400`, not axum's plain text.
pub struct Params<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for Params<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        use axum::extract::rejection::PathRejection;
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(t)) => Ok(Params(t)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => Err(ApiError::invalid("path", e.body_text())),
            Err(e) => Err(ApiError::Internal(e.body_text())),
        }
    }
}

/// The bounds of reading a request body on tripgate's own routes.
#[derive(Debug, Clone, Copy)]
pub struct BodyRead {
    /// `server.max_body_bytes`.
    max: usize,
    /// `server.header_read_timeout_ms`: the body, once the headers are in, within as long
    /// again.
    within: std::time::Duration,
}

impl BodyRead {
    /// The bounds `config` sets for the API's routes.
    pub fn of(config: &Config) -> Self {
        Self {
            max: config.server.max_body_bytes,
            within: std::time::Duration::from_millis(config.server.header_read_timeout_ms),
        }
    }

    /// The admin listener's: the same time, and axum's default size (2 MiB) as before —
    /// `server.max_body_bytes` is the API's (SPEC §3).
    pub fn admin(config: &Config) -> Self {
        Self {
            max: 2 << 20,
            ..Self::of(config)
        }
    }
}

/// Middleware: the request's body read whole before the handler, bounded in size and time:
/// 413 past `server.max_body_bytes`, 408 when it has not all arrived within
/// `server.header_read_timeout_ms`. Without this, a client that sends its headers and then
/// stalls or trickles its body held its connection and its task for ever (the listener's
/// timeout covers the headers only). A `Content-Length` over the limit is not answered
/// before the body is read up to the limit: the connection closes after the answer, and a
/// client still sending would see a reset instead of the 413. Pass-through requests are not
/// read here: they stream, bounded by `upstream.idle_timeout_ms`.
/// On each own route inside its auth layer, so 401/403 come before any read.
pub async fn read_body(State(bounds): State<BodyRead>, req: Request, next: Next) -> Response {
    use http_body_util::BodyExt;
    let (parts, body) = req.into_parts();
    let limited = http_body_util::Limited::new(body, bounds.max);
    let body = match tokio::time::timeout(bounds.within, limited.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return ApiError::PayloadTooLarge.into_response();
        }
        Ok(Err(e)) => return ApiError::invalid("body", format!("the body could not be read: {e}")).into_response(),
        Err(_) => return ApiError::BodyTimeout(bounds.within).into_response(),
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(body))).await
}

/// The body of a JSON request: 413 past the limit, 415 for another content type.
pub fn json_body(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::invalid("body", rejection.body_text())
        }
    })?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
        });
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    Ok(body)
}

/// The API router (driver and customer routes) with its layers.
pub fn api_router(state: AppState, accept: Vec<driver::AcceptServices>) -> Router {
    let limit = state.config.server.max_body_bytes;
    let mut router = Router::new().merge(driver::routes(&state, accept));
    if state.config.demo_routes() {
        router = router.merge(customer::routes(&state));
    }
    let router = router.method_not_allowed_fallback(method_not_allowed);
    // Every route tripgate does not own goes to the upstream when there is one.
    let router = match state.upstream.clone() {
        // Through a method router (not the bare handler): axum then empties the body of an
        // answer to HEAD, which hyper's HTTP/2 server would otherwise send.
        Some(upstream) => router.fallback_service(axum::routing::any(upstream::forward).with_state(upstream)),
        None => router.fallback(|| async { ApiError::NotFound("route").into_response() }),
    };
    let router = router.layer(DefaultBodyLimit::max(limit));
    let router = observe::wrap(router, Some(state.metrics.clone()));
    if state.upstream.is_none() {
        return router;
    }
    // Before routing (a URI changed after it would not be routed again).
    Router::new().fallback_service(tower::util::MapRequest::new(router, as_owned_route))
}

/// A path the backend would take for one of tripgate's driver routes, though it is not
/// written as one — with escapes (`%2D`), a trailing `/` or a doubled `/` (Laravel matches
/// the decoded path less its trailing slashes): forwarded, it would reach the backend's own
/// accept and pass by the rollout, the rate limit and the fence. It is served as the route.
fn owned_alias(path: &str) -> Option<&'static str> {
    if !(path.ends_with('/') || path.contains('%') || path.contains("//")) {
        return None;
    }
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8().ok()?;
    let mut canonical = String::with_capacity(decoded.len());
    for segment in decoded.split('/').filter(|s| !s.is_empty()) {
        canonical.push('/');
        canonical.push_str(segment);
    }
    driver::ROUTES.into_iter().find(|route| *route == canonical)
}

/// [`owned_alias`]'s route in place of the path (the query kept).
fn as_owned_route(mut req: Request) -> Request {
    let Some(route) = owned_alias(req.uri().path()) else {
        return req;
    };
    let path_and_query = match req.uri().query() {
        Some(query) => format!("{route}?{query}"),
        None => route.to_owned(),
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(path_and_query) = path_and_query.parse() {
        parts.path_and_query = Some(path_and_query);
        if let Ok(uri) = axum::http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    req
}

/// The admin router.
pub fn admin_router(state: AppState) -> Router {
    observe::wrap(
        admin::routes(state).method_not_allowed_fallback(method_not_allowed),
        None,
    )
}

/// A route of tripgate's called with a method it does not take: the envelope, and axum
/// adds the `Allow` header.
async fn method_not_allowed() -> Response {
    ApiError::MethodNotAllowed.into_response()
}

/// A worker's admin router: `/metrics`, `/healthz`, `/readyz` only.
pub fn worker_admin_router(state: AppState) -> Router {
    observe::wrap(
        admin::health_routes(state).method_not_allowed_fallback(method_not_allowed),
        None,
    )
}
