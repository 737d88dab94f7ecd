//! The admin listener: `/metrics`, `/healthz`, `/readyz`, and the admin API (flags, audit,
//! jobs; while `server.demo_routes`, seed and checks), which needs an admin token.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppState, Params, json_body};
use crate::auth::AuthUser;
use crate::domain::{JobState, now_ms};
use crate::error::ApiError;
use crate::flags::{self, fleet};
use crate::storage::flag_state::{ChangeBy, OverridePatch};

/// The admin routes.
pub fn routes(state: AppState) -> Router {
    let admin = Router::new()
        .route("/admin/flags", get(get_flags))
        .route("/admin/flags/{name}", put(put_flag))
        .route("/admin/flags/{name}/override", delete(clear_override))
        .route("/admin/audit", get(audit))
        .route("/admin/guard", get(guard_status))
        .route("/admin/guard/{name}/{action}", post(guard_action))
        .route("/admin/jobs", get(jobs))
        .route("/admin/jobs/{id}/retry", post(retry_job));
    let admin = if state.config.demo_routes() {
        admin
            .route("/admin/seed", post(seed))
            .route("/admin/checks", get(checks))
    } else {
        admin
    };
    let body = super::BodyRead::admin(&state.config);
    let admin = admin
        .merge(super::console::admin_routes())
        .route_layer(axum::middleware::from_fn_with_state(body, super::read_body))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::console::admins,
        ));
    let public =
        super::console::public_routes().route_layer(axum::middleware::from_fn_with_state(body, super::read_body));
    health_routes(state.clone()).merge(admin.merge(public).with_state(state))
}

/// `/metrics`, `/healthz`, `/readyz`: all a worker's admin listener serves.
pub fn health_routes(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::NotFound("route").into_response() })
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> Response {
    // Job gauges are read at scrape time, every shard at once; a shard that does not
    // answer quickly keeps its last counts rather than stalling the scrape or holding back
    // the others' (a dead job on a healthy shard still shows while another is down).
    let counts = futures_util::future::join_all(
        state
            .shards
            .all()
            .iter()
            .map(|store| tokio::time::timeout(Duration::from_millis(500), store.job_counts())),
    )
    .await;
    for (shard, counts) in counts.into_iter().enumerate() {
        if let Ok(Ok(counts)) = counts {
            state.metrics.set_job_counts(shard, &counts);
        }
    }
    state.store.report_pool();
    for store in state.shards.all().iter().chain(state.job_shards.all()) {
        store.report_pool();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// Ready when the global database answers and its migrations ran, and no shard's own record
/// contradicts `database.shards`. Redis down does not make the gateway unready (the SQL
/// fence decides alone) but is named in the body. Neither does one shard down: the other
/// regions go on (its drivers get 503); each shard is named in the body.
async fn readyz(State(state): State<AppState>) -> Response {
    let timeout = Duration::from_secs(1);
    let up = |ping: Result<Result<(), sqlx::Error>, tokio::time::error::Elapsed>| matches!(ping, Ok(Ok(())));
    let database = up(tokio::time::timeout(timeout, state.store.ping()).await);
    let migrated = state.migrated.load(Ordering::Acquire);
    let misrouted = state.shard_health.misrouted.load_full();
    let redis = match &state.redis {
        None => "disabled",
        Some(redis) => {
            if redis.ping().await.is_ok() {
                "up"
            } else {
                "down"
            }
        }
    };
    let ready = database && migrated && misrouted.is_none();
    let mut body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "database": if database { "up" } else { "down" },
        "migrated": migrated,
        "redis": redis,
        "lock_store": state.locks.backend(),
    });
    if state.shards.len() > 1 {
        let pings = state
            .shards
            .all()
            .iter()
            .map(|db| tokio::time::timeout(timeout, db.ping()));
        let shards: Vec<Value> = futures_util::future::join_all(pings)
            .await
            .into_iter()
            .zip(&state.shard_health.migrated)
            .map(|(ping, migrated)| {
                json!({"database": if up(ping) { "up" } else { "down" }, "migrated": migrated.load(Ordering::Acquire)})
            })
            .collect();
        body["shards"] = Value::Array(shards);
    }
    if let Some(reason) = misrouted {
        body["misrouted"] = Value::String(reason.to_string());
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn get_flags(State(state): State<AppState>) -> Json<Value> {
    let snapshot = state.flags.snapshot();
    Json(json!({
        "flags": snapshot.flags_json(),
        "version": snapshot.version,
        "loaded_at": snapshot.loaded_at_ms,
        "path": snapshot.path.display().to_string(),
    }))
}

/// Longest `reason` an override change takes.
const REASON_MAX: usize = 1000;
/// Most driver ids in an override's allow or deny list.
const IDS_MAX: usize = 10_000;
/// Longest driver id in an allow or deny list (ids are UUIDs; each audit entry keeps the
/// lists, and every instance reads them every half second).
const ID_MAX: usize = 128;
/// Longest actor (a token's subject) an override change records.
const ACTOR_MAX: usize = 200;
/// Audit entries `GET /admin/audit` returns by default, and at most (`?limit=`).
const AUDIT_DEFAULT: i64 = 1_000;
const AUDIT_MAX: i64 = 10_000;

/// `PUT /admin/flags/{name}` `{"percent"?, "allow"?, "deny"?, "reason"?}`: sets the
/// fleet-wide override (absent fields keep the override's current values), audited with
/// the token's subject as actor; in force here when the answer arrives, on every instance
/// within a second.
async fn put_flag(
    State(state): State<AppState>,
    Extension(user): Extension<AuthUser>,
    console: Option<Extension<super::console::ViaConsole>>,
    Params(name): Params<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let fields = &json_object(&headers, body, &["percent", "allow", "deny", "reason"])?;
    let percent_bp = match fields.get("percent") {
        None => None,
        Some(v) => {
            let p = v
                .as_f64()
                .ok_or_else(|| ApiError::invalid("percent", "The percent must be a number in 0..=100."))?;
            Some(flags::percent_to_threshold(p).map_err(|reason| ApiError::invalid("percent", reason))?)
        }
    };
    let patch = OverridePatch {
        percent_bp,
        allow: driver_ids(fields, "allow")?,
        deny: driver_ids(fields, "deny")?,
    };
    if patch == OverridePatch::default() {
        return Err(ApiError::invalid("body", "Give a percent, an allow or a deny list."));
    }
    let by = change_by(&user, console.is_some(), fields)?;
    let file_bp = state.flags.snapshot().file.percent_bp(&name);
    fleet::set_override(&state.store, file_bp, &name, &patch, &by)
        .await
        .map_err(override_error)?;
    let _ = fleet::refresh(&state.flags, &state.store, &state.metrics).await;
    Ok(get_flags(State(state)).await.into_response())
}

/// `DELETE /admin/flags/{name}/override` (optional body `{"reason"}`): back to the file.
async fn clear_override(
    State(state): State<AppState>,
    Extension(user): Extension<AuthUser>,
    console: Option<Extension<super::console::ViaConsole>>,
    Params(name): Params<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let fields = &match &body {
        Ok(bytes) if bytes.is_empty() => serde_json::Map::new(),
        _ => json_object(&headers, body, &["reason"])?,
    };
    let by = change_by(&user, console.is_some(), fields)?;
    let file_bp = state.flags.snapshot().file.percent_bp(&name);
    fleet::clear_override(&state.store, file_bp, &name, &by)
        .await
        .map_err(override_error)?;
    let _ = fleet::refresh(&state.flags, &state.store, &state.metrics).await;
    Ok(get_flags(State(state)).await.into_response())
}

/// The token's subject, the API (or the console) as source, the body's `reason`, now.
fn change_by(user: &AuthUser, console: bool, fields: &serde_json::Map<String, Value>) -> Result<ChangeBy, ApiError> {
    let reason = match fields.get("reason") {
        None => String::new(),
        // One line: it goes into log lines, where a newline could forge another.
        Some(v) => v
            .as_str()
            .filter(|r| r.len() <= REASON_MAX && !r.chars().any(char::is_control))
            .ok_or_else(|| {
                ApiError::invalid(
                    "reason",
                    format!("The reason must be one line of text of at most {REASON_MAX} bytes."),
                )
            })?
            .trim()
            .to_owned(),
    };
    // The token's subject is the audit's actor, shown and logged as the reason is.
    if user.id.len() > ACTOR_MAX || user.id.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "actor",
            format!(
                "The token's subject must be one line of at most {ACTOR_MAX} bytes to be recorded as who made a change."
            ),
        ));
    }
    Ok(ChangeBy {
        actor: user.id.clone(),
        source: if console { "console" } else { "api" }.into(),
        reason,
        at: now_ms(),
    })
}

/// An optional list of driver ids.
fn driver_ids(fields: &serde_json::Map<String, Value>, field: &'static str) -> Result<Option<Vec<String>>, ApiError> {
    let Some(value) = fields.get(field) else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::invalid(
            field,
            format!(
                "The {field} list must be an array of at most {IDS_MAX} driver id strings, each of 1 to {ID_MAX} bytes without control characters."
            ),
        )
    };
    let items = value.as_array().filter(|a| a.len() <= IDS_MAX).ok_or_else(invalid)?;
    let ids = items
        .iter()
        .map(|v| {
            v.as_str()
                .filter(|s| !s.is_empty() && s.len() <= ID_MAX && !s.chars().any(char::is_control))
                .map(str::to_owned)
                .ok_or_else(invalid)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(ids))
}

fn override_error(e: fleet::OverrideError) -> ApiError {
    match e {
        fleet::OverrideError::UnknownFlag(_) => ApiError::NotFound("flag"),
        fleet::OverrideError::KillSwitch(_) | fleet::OverrideError::PeopleFirst(_) => ApiError::Conflict(e.to_string()),
        fleet::OverrideError::Database(e) => e.into(),
    }
}

async fn guard_status(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(crate::guard::status(&state.store, &state.flags).await?))
}

/// `POST /admin/guard/{name}/pause|resume|ack`.
async fn guard_action(
    State(state): State<AppState>,
    Extension(user): Extension<AuthUser>,
    console: Option<Extension<super::console::ViaConsole>>,
    Params((name, action)): Params<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let action = crate::guard::Action::parse(&action).ok_or(ApiError::NotFound("route"))?;
    if name != crate::domain::TRIP_ACCEPT_FLAG {
        return Err(ApiError::NotFound("guarded flag"));
    }
    if let Some(why) = action.kill_switch_holds(&name, state.flags.snapshot().file.percent_bp(&name)) {
        return Err(ApiError::Conflict(why));
    }
    let who = format!("{} ({})", user.id, if console.is_some() { "console" } else { "api" });
    match crate::guard::act(&state.store, action, &who).await? {
        Some(_) => Ok(Json(crate::guard::status(&state.store, &state.flags).await?)),
        None => Err(ApiError::Conflict(format!(
            "{} (see GET /admin/guard)",
            action.refused(&name)
        ))),
    }
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<i64>,
}

/// The newest `?limit=` entries (default 1,000, at most 10,000), newest last: the log only
/// grows, and each entry keeps the lists in force.
async fn audit(
    State(state): State<AppState>,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let limit = match super::query(q)?.limit {
        None => AUDIT_DEFAULT,
        Some(n) if (1..=AUDIT_MAX).contains(&n) => n,
        Some(_) => {
            return Err(ApiError::invalid(
                "limit",
                format!("The limit must be a whole number in 1..={AUDIT_MAX}."),
            ));
        }
    };
    let entries = state.store.flag_audit(limit).await?;
    Ok(Json(json!({"entries": entries})))
}

#[derive(Deserialize)]
struct JobsQuery {
    state: Option<String>,
}

async fn jobs(
    State(state): State<AppState>,
    q: Result<Query<JobsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = super::query(q)?;
    let wanted = match q.state.as_deref().map(|s| JobState::parse(s).ok_or(s)) {
        None => None,
        Some(Ok(wanted)) => Some(wanted),
        Some(Err(_)) => {
            return Err(ApiError::invalid(
                "state",
                "The state must be queued, running, done or dead.",
            ));
        }
    };
    state.shard_health.all_ready()?;
    let jobs = state.shards.list_jobs(wanted).await?;
    Ok(Json(json!({"jobs": jobs})))
}

async fn retry_job(State(state): State<AppState>, Params(id): Params<String>) -> Result<Json<Value>, ApiError> {
    // Job ids are UUIDs: anything else names no job (and some bytes, NUL, no SQL text).
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(ApiError::NotFound("dead job"));
    }
    state.shard_health.all_ready()?;
    let job = state
        .shards
        .retry_job(&id)
        .await?
        .ok_or(ApiError::NotFound("dead job"))?;
    Ok(Json(serde_json::to_value(job).unwrap_or_default()))
}

/// Most rows of each kind one `POST /admin/seed` creates.
pub const SEED_MAX: u64 = 100_000;

/// `POST /admin/seed` `{"drivers", "customers", "trips"}` (each a count, absent = 0) →
/// what was created, as `tripgate seed --json` prints it.
async fn seed(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let fields = &json_object(&headers, body, &["drivers", "customers", "trips"])?;
    let count = |field: &'static str| -> Result<usize, ApiError> {
        match fields.get(field) {
            None => Ok(0),
            Some(v) => v
                .as_u64()
                .filter(|n| *n <= SEED_MAX)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    ApiError::invalid(field, format!("The {field} must be a whole number in 0..={SEED_MAX}."))
                }),
        }
    };
    let plan = crate::seed::SeedPlan {
        drivers: count("drivers")?,
        customers: count("customers")?,
        trips: count("trips")?,
    };
    state.shard_health.all_ready()?;
    let seeded = crate::seed::seed_shards(&state.shards, plan, || {}).await?;
    Ok(Json(seeded).into_response())
}

/// `GET /admin/checks`: the safety invariants over the whole database (every shard), each
/// must be 0.
async fn checks(State(state): State<AppState>) -> Result<Json<crate::storage::assign::Checks>, ApiError> {
    state.shard_health.all_ready()?;
    Ok(Json(state.shards.checks().await?))
}

/// A JSON object body whose fields are all among `known`; 400 naming the body otherwise.
fn json_object(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    known: &[&str],
) -> Result<serde_json::Map<String, Value>, ApiError> {
    let Value::Object(fields) = json_value(headers, body)? else {
        return Err(ApiError::invalid("body", "The body must be a JSON object."));
    };
    if let Some(unknown) = fields.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ApiError::invalid("body", format!("Unknown field {unknown}.")));
    }
    Ok(fields)
}

/// A JSON request body (`application/json`), parsed; 400 naming the body otherwise.
fn json_value(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = json_body(headers, body)?;
    serde_json::from_slice(&body).map_err(|e| ApiError::invalid("body", format!("not valid JSON: {e}")))
}
