//! The admin listener: `/metrics`, `/healthz`, `/readyz`, and the admin API (flags, audit,
//! jobs; while `server.demo_routes`, seed and checks), which needs an admin token.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppState, json_body};
use crate::auth::AuthUser;
use crate::domain::{JobState, now_ms};
use crate::error::ApiError;
use crate::flags::{self, watcher};
use crate::storage::audit::AuditEntry;

/// The admin routes.
pub fn routes(state: AppState) -> Router {
    let admin = Router::new()
        .route("/admin/flags", get(get_flags))
        .route("/admin/flags/{name}", put(put_flag))
        .route("/admin/audit", get(audit))
        .route("/admin/jobs", get(jobs))
        .route("/admin/jobs/{id}/retry", post(retry_job));
    let admin = if state.config.server.demo_routes() {
        admin
            .route("/admin/seed", post(seed))
            .route("/admin/checks", get(checks))
    } else {
        admin
    };
    let admin = admin.route_layer(axum::middleware::from_fn_with_state(state.clone(), super::admins));
    health_routes(state.clone()).merge(admin.with_state(state))
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
    // Job gauges are read at scrape time; a database that does not answer quickly leaves
    // the last values in place rather than stalling the scrape.
    if let Ok(Ok(counts)) = tokio::time::timeout(Duration::from_millis(500), state.store.job_counts()).await {
        state.metrics.set_job_counts(&counts);
    }
    state.store.report_pool();
    state.jobs_store.report_pool();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// Ready when the database answers and migrations ran. Redis down does not make the
/// gateway unready (the SQL fence decides alone) but is named in the body.
async fn readyz(State(state): State<AppState>) -> Response {
    let timeout = Duration::from_secs(1);
    let database = matches!(tokio::time::timeout(timeout, state.store.ping()).await, Ok(Ok(())));
    let migrated = state.migrated.load(Ordering::Acquire);
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
    let ready = database && migrated;
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "database": if database { "up" } else { "down" },
        "migrated": migrated,
        "redis": redis,
        "lock_store": state.locks.backend(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn get_flags(State(state): State<AppState>) -> Json<Value> {
    let snapshot = state.flags.snapshot();
    let flags: serde_json::Map<String, Value> = snapshot
        .set
        .flags
        .iter()
        .map(|(name, f)| {
            (
                name.clone(),
                json!({"percent": f.percent(), "salt": f.salt, "allow": f.allow, "deny": f.deny}),
            )
        })
        .collect();
    Json(json!({
        "flags": flags,
        "version": snapshot.version,
        "loaded_at": snapshot.loaded_at_ms,
        "path": snapshot.path.display().to_string(),
    }))
}

/// Writes the new percentage to the flags file (the single source of truth), then loads
/// it at once so the change is in force when the answer arrives.
async fn put_flag(
    State(state): State<AppState>,
    Extension(user): Extension<AuthUser>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let value = json_value(&headers, body)?;
    let percent = value
        .get("percent")
        .and_then(Value::as_f64)
        .ok_or_else(|| ApiError::invalid("percent", "The percent must be a number in 0..=100."))?;
    flags::percent_to_threshold(percent).map_err(|reason| ApiError::invalid("percent", reason))?;
    let path = state.config.flags.path.clone();
    let name_for_write = name.clone();
    let written = tokio::task::spawn_blocking(move || flags::write_percent(&path, &name_for_write, percent))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let from = match written {
        Ok(from) => from,
        Err(flags::FlagsError::Missing(_)) => return Err(ApiError::NotFound("flag")),
        Err(flags::FlagsError::Invalid { reason, .. }) => return Err(ApiError::invalid("percent", reason)),
        Err(e) => return Err(ApiError::Internal(e.to_string())),
    };
    if let Ok(watcher::Reload::Changed(_)) = watcher::reload(&state.flags, &state.config.flags.path) {
        let snapshot = state.flags.snapshot();
        state.metrics.flags_reload("ok");
        state.metrics.flags_loaded(snapshot.percents(), snapshot.loaded_at_ms);
    }
    let entry = AuditEntry {
        at: now_ms(),
        actor: user.id,
        source: "api".into(),
        flag: name.clone(),
        from: Some(from),
        to: percent,
    };
    state.store.record_flag_change(&entry).await?;
    Ok(get_flags(State(state)).await.into_response())
}

async fn audit(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let entries = state.store.flag_audit().await?;
    Ok(Json(json!({"entries": entries})))
}

#[derive(Deserialize)]
struct JobsQuery {
    state: Option<String>,
}

async fn jobs(State(state): State<AppState>, Query(q): Query<JobsQuery>) -> Result<Json<Value>, ApiError> {
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
    let jobs = state.store.list_jobs(wanted).await?;
    Ok(Json(json!({"jobs": jobs})))
}

async fn retry_job(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let job = state
        .store
        .retry_job(&id)
        .await?
        .ok_or(ApiError::NotFound("dead job"))?;
    Ok(Json(serde_json::to_value(job).unwrap_or_default()))
}

/// Most rows of each kind one `POST /admin/seed` creates.
const SEED_MAX: u64 = 100_000;

/// `POST /admin/seed` `{"drivers", "customers", "trips"}` (each a count, absent = 0) →
/// what was created, as `tripgate seed --json` prints it.
async fn seed(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let value = json_value(&headers, body)?;
    let fields = value
        .as_object()
        .ok_or_else(|| ApiError::invalid("body", "The body must be a JSON object."))?;
    if let Some(unknown) = fields
        .keys()
        .find(|k| !["drivers", "customers", "trips"].contains(&k.as_str()))
    {
        return Err(ApiError::invalid("body", format!("Unknown field {unknown}.")));
    }
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
    let seeded = crate::seed::seed(&state.store, plan, || {}).await?;
    Ok(Json(seeded).into_response())
}

/// `GET /admin/checks`: the safety invariants over the whole database, each must be 0.
async fn checks(State(state): State<AppState>) -> Result<Json<crate::storage::assign::Checks>, ApiError> {
    Ok(Json(state.store.checks().await?))
}

/// A JSON request body (`application/json`), parsed; 400 naming the body otherwise.
fn json_value(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = json_body(headers, body)?;
    serde_json::from_slice(&body).map_err(|e| ApiError::invalid("body", format!("not valid JSON: {e}")))
}
