//! Request ids, the per-request log line and the request metrics.
//!
//! One structured line per request: request id, method, route template, status, driver,
//! cohort, outcome, latency. The cohort and outcome come from response extensions the
//! router and the handlers set, so nothing parses bodies.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderName;
use axum::middleware::Next;
use axum::response::Response;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use crate::auth::AuthUser;
use crate::domain::Cohort;
use crate::error::Outcome;
use crate::metrics::Metrics;

/// The request id header, set when the client did not send one and echoed back.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Wraps `router` in the request-id and observe layers (the request id outermost, so the
/// log line has it). With `metrics` the requests are also counted (the API listener); the
/// admin listener's requests (scrapes, health checks) are only logged.
pub fn wrap(router: Router, metrics: Option<Arc<Metrics>>) -> Router {
    router
        .layer(axum::middleware::from_fn_with_state(metrics, observe))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(axum::middleware::map_request(drop_unusable_request_id))
}

/// The longest client request id kept; a longer one is replaced as an unusable one is.
const MAX_REQUEST_ID: usize = 128;

/// A client's request id that is empty, too long or not printable ASCII (it would be
/// logged as "" or flood the log line) is dropped, so the request gets one of ours.
async fn drop_unusable_request_id(mut req: Request) -> Request {
    let usable = |v: &axum::http::HeaderValue| {
        let bytes = v.as_bytes();
        !bytes.is_empty() && bytes.len() <= MAX_REQUEST_ID && bytes.iter().all(|b| b.is_ascii_graphic())
    };
    let headers = req.headers_mut();
    let all: Vec<_> = headers.get_all(&REQUEST_ID).iter().collect();
    if all.len() > 1 || all.first().is_some_and(|v| !usable(v)) {
        headers.remove(&REQUEST_ID);
    }
    req
}

async fn observe(State(metrics): State<Option<Arc<Metrics>>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().clone();
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let response = next.run(req).await;
    let elapsed = started.elapsed();
    let status = response.status();
    let cohort = response.extensions().get::<Cohort>().copied();
    let outcome = response
        .extensions()
        .get::<Outcome>()
        .copied()
        .unwrap_or(if status.is_server_error() {
            Outcome::Error
        } else if status.is_client_error() {
            Outcome::Invalid
        } else {
            // A 2xx that is not an accept's (those set their own outcome).
            Outcome::Ok
        });
    let driver = response
        .extensions()
        .get::<AuthUser>()
        .map(|u| u.id.as_str())
        .unwrap_or("");
    tracing::info!(
        request_id = %request_id,
        method = %method,
        route = %route,
        status = status.as_u16(),
        driver = %driver,
        cohort = cohort.map_or("none", Cohort::as_str),
        outcome = outcome.as_str(),
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    let pass_through = response.extensions().get::<super::upstream::PassThrough>().is_some();
    if let Some(metrics) = metrics.filter(|_| !pass_through) {
        metrics.request(cohort, driver, &route, outcome, status.as_u16(), elapsed);
    }
    response
}
