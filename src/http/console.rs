//! The ops console at `/` of the admin listener: one page (HTML, CSS and JS embedded in the
//! binary, no CDN, a strict Content-Security-Policy) and the JSON endpoints it needs.
//!
//! * **Login**: `POST /admin/login` exchanges an admin token for a session cookie
//!   (`HttpOnly`, `SameSite=Strict`, `Secure` behind HTTPS, expiring with the token) — a
//!   signed, stateless session any instance of the fleet accepts. `POST /admin/logout`
//!   clears it; `GET /admin/session` says who is logged in and gives the session's CSRF token.
//! * **CSRF**: a cookie-authenticated call that changes something must send the session's
//!   token in `X-CSRF-Token` (bearer-token calls — CLI, scripts — need none).
//! * `GET /admin/stats?seconds=N`: the cohorts side by side per 5 s, from the samples every
//!   process stores for the guard. `GET /admin/explain/{flag}/{driver}`: one driver's cohort.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppState, Params};
use crate::auth::{AuthUser, Role};
use crate::domain::{Cohort, now_ms};
use crate::error::ApiError;
use crate::samples::{CohortSample, SLOT_MS};

/// The session cookie's name.
pub const COOKIE: &str = "tg_session";
/// The header a cookie-authenticated change sends its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// Marks a request authenticated by the console's session cookie (its changes are audited
/// with source `console`).
#[derive(Debug, Clone, Copy)]
pub struct ViaConsole;

const PAGE: &str = include_str!("../../console/index.html");
const SCRIPT: &str = include_str!("../../console/console.js");
const STYLE: &str = include_str!("../../console/console.css");
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The page, its assets and the login/logout/session routes (no token needed).
pub fn public_routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { asset(PAGE, "text/html; charset=utf-8") }))
        .route(
            "/console.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route("/admin/login", post(login))
        .route("/admin/logout", post(logout))
        .route("/admin/session", get(session))
}

/// The console's JSON endpoints (behind the admin check).
pub fn admin_routes() -> Router<AppState> {
    Router::new()
        .route("/admin/stats", get(stats))
        .route("/admin/explain/{flag}/{driver}", get(explain))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

/// The session cookie of a request, if any.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// The request's console session: signed by us, not expired, and not ended by a logout.
/// While the database cannot say (it is down), a signed session is taken: the changes it
/// could make need the database anyway, and the console stays readable in an outage.
async fn live_session(state: &AppState, headers: &HeaderMap) -> Option<crate::auth::Session> {
    let session = cookie(headers).and_then(|c| state.keys.verify_session(c))?;
    match state.store.console_session_ended(&session.csrf).await {
        Ok(true) => None,
        Ok(false) => Some(session),
        Err(e) => {
            tracing::debug!(error = %e, "console logouts not readable; session taken as live");
            Some(session)
        }
    }
}

/// The admin check of the admin API: a bearer admin token (as before), or the console's
/// session cookie — with the session's CSRF token on anything but a read.
pub async fn admins(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if req.headers().contains_key(header::AUTHORIZATION) {
        return super::admins(State(state), req, next).await;
    }
    let Some(session) = live_session(&state, req.headers()).await else {
        return ApiError::Unauthorized.into_response();
    };
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    let csrf_ok = req
        .headers()
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t == session.csrf);
    if !read && !csrf_ok {
        return ApiError::CsrfRefused.into_response();
    }
    let user = AuthUser {
        id: session.sub,
        role: Role::Admin,
    };
    req.extensions_mut().insert(user.clone());
    req.extensions_mut().insert(ViaConsole);
    let mut res = next.run(req).await;
    res.extensions_mut().insert(user);
    res
}

/// `POST /admin/login` with `{"token"}` (JSON) or `token=` (a plain form post).
async fn login(State(state): State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return ApiError::PayloadTooLarge.into_response();
        }
        Err(rejection) => return ApiError::invalid("body", rejection.body_text()).into_response(),
    };
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let token = if form {
        String::from_utf8_lossy(&body)
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == "token")
            .map(|(_, v)| v.replace("%2E", ".").replace("%2e", ".").replace('+', " "))
            .unwrap_or_default()
    } else {
        serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["token"].as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    let claims = state
        .keys
        .verify(token.trim())
        .filter(|c| c.role == Role::Admin && !c.sub.trim().is_empty());
    let Some(claims) = claims else {
        return if form {
            redirect("/?login=failed", None)
        } else {
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({
                    "response_code": "auth_login_401",
                    "message": "That is not a valid admin token.",
                    "data": null,
                    "errors": [],
                })),
            )
                .into_response()
        };
    };
    let csrf = uuid::Uuid::new_v4().simple().to_string();
    let Ok(session) = state.keys.sign_session(&claims.sub, claims.exp, &csrf) else {
        return ApiError::Internal("session not signed".into()).into_response();
    };
    let max_age = claims.exp.saturating_sub(crate::auth::now_s());
    let secure = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let cookie = format!(
        "{COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    );
    if form {
        return redirect("/", Some(cookie));
    }
    let mut res = Json(json!({"admin": claims.sub, "csrf": csrf})).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    res
}

fn redirect(to: &'static str, cookie: Option<String>) -> Response {
    let mut res = (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response();
    if let Some(v) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    res
}

/// `POST /admin/logout` (with the session's CSRF token).
async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let session = cookie(&headers).and_then(|c| state.keys.verify_session(c));
    let csrf = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
    if session.as_ref().is_some_and(|s| Some(s.csrf.as_str()) != csrf) {
        return ApiError::CsrfRefused.into_response();
    }
    // The cookie is self-contained: unless the logout is remembered, a copy of it would
    // keep working until it expires (as long as the admin token it was made from).
    if let Some(s) = session
        && let Err(e) = state
            .store
            .end_console_session(&s.csrf, i64::try_from(s.exp).unwrap_or(i64::MAX))
            .await
    {
        return ApiError::from(e).into_response();
    }
    let mut res = StatusCode::NO_CONTENT.into_response();
    res.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("tg_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    res
}

/// `GET /admin/session`: who is logged in, and the session's CSRF token.
async fn session(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match live_session(&state, &headers).await {
        Some(s) => Json(json!({"admin": s.sub, "csrf": s.csrf, "expires": s.exp})).into_response(),
        None => ApiError::Unauthorized.into_response(),
    }
}

#[derive(Deserialize)]
struct StatsQuery {
    seconds: Option<i64>,
}

/// Width of one point of the console's charts.
const POINT_MS: i64 = 5 * SLOT_MS;

/// `GET /admin/stats?seconds=N` (10 to 3600, default 300; else 400): per 5 s and cohort,
/// over every instance: requests/s, p50/p95/p99 ms, 5xx and timeout rates, OTP delivery p95
/// ms.
async fn stats(
    State(state): State<AppState>,
    q: Result<Query<StatsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = super::query(q)?;
    let seconds = q.seconds.unwrap_or(300);
    if !(10..=3600).contains(&seconds) {
        return Err(ApiError::invalid(
            "seconds",
            "The seconds must be a whole number in 10..=3600.",
        ));
    }
    let now = now_ms();
    let end = now - now.rem_euclid(SLOT_MS);
    let start = end - seconds * 1000;
    let rows = state.store.samples_between(start, end, false).await?;
    let mut points: std::collections::BTreeMap<(i64, Cohort), CohortSample> = Default::default();
    for r in &rows {
        let at = r.slot - (r.slot - start).rem_euclid(POINT_MS);
        let merged = crate::guard::merge_rows(std::slice::from_ref(r));
        for (cohort, sample) in merged {
            points.entry((at, cohort)).or_default().merge(&sample);
        }
    }
    let mut series = serde_json::Map::new();
    for cohort in [Cohort::Legacy, Cohort::AtomicAsync] {
        let list: Vec<Value> = points
            .iter()
            .filter(|((_, c), _)| *c == cohort)
            .map(|((at, _), s)| {
                let n = s.requests.max(1) as f64;
                json!({
                    "at": at,
                    "rps": s.requests as f64 / (POINT_MS as f64 / 1000.0),
                    "p50_ms": s.latency.quantile(0.5),
                    "p95_ms": s.latency.quantile(0.95),
                    "p99_ms": s.latency.quantile(0.99),
                    "error_rate": s.errors as f64 / n,
                    "timeout_rate": s.timeouts as f64 / n,
                    "otp_p95_ms": s.otp.quantile(0.95),
                })
            })
            .collect();
        series.insert(cohort.as_str().to_owned(), Value::Array(list));
    }
    Ok(Json(
        json!({"from": start, "to": end, "step_ms": POINT_MS, "cohorts": series}),
    ))
}

/// `GET /admin/explain/{flag}/{driver}`: the driver's bucket, threshold, list and cohort
/// under the flags in force, and their source.
async fn explain(
    State(state): State<AppState>,
    Params((flag, driver)): Params<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    if driver.trim().is_empty() {
        return Err(ApiError::invalid("driver", "must not be empty"));
    }
    let e = state
        .flags
        .snapshot()
        .explain(&flag, &driver)
        .ok_or(ApiError::NotFound("flag"))?;
    Ok(Json(serde_json::to_value(e).unwrap_or_default()))
}
