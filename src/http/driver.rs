//! The driver route: `POST /api/driver/trip/request-action` (and the path the existing app
//! calls, `/api/driver/ride/trip-action`).
//!
//! Auth first (a bad token or role: 401/403 before the body is read; whether a driver the
//! user cache does not know is an active driver is left to the accept, which settles it in
//! its statement on atomic_async); then the body is parsed into an
//! [`AcceptCommand`] (400 here: a malformed request never gets a cohort); then the rollout
//! router sends the command to its cohort's service — the per-driver rate limit in front of
//! each, one budget for both — and the answer goes out in the shared envelope, tagged with
//! the cohort that produced it.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tower::{Layer, ServiceExt};

use super::rate_limit::{DriverRateLimit, DriverRateLimitLayer};
use super::{AppState, UserUnchecked, json_body};
use crate::accept::atomic_async::AtomicAsyncAccept;
use crate::accept::legacy::LegacyAccept;
use crate::accept::{AcceptCommand, parse_request};
use crate::auth::AuthUser;
use crate::budget::DriverBudget;
use crate::domain::{Cohort, TRIP_ACCEPT_FLAG, now_ms};
use crate::error::{ApiError, Envelope};
use crate::rollout::{RolloutRouter, Routed};

/// The driver routes (their metrics children are created up front).
pub const ROUTES: [&str; 2] = ["/api/driver/trip/request-action", "/api/driver/ride/trip-action"];

/// The response header naming the cohort that served a request (for ops and debugging;
/// the driver app ignores it).
pub const COHORT_HEADER: &str = "x-tripgate-cohort";

/// The two implementations the router chooses between.
#[derive(Clone)]
pub struct AcceptServices {
    /// Cohort `legacy`.
    pub legacy: LegacyAccept,
    /// Cohort `atomic_async` (built `with_budget` of the same budget, its accepts check it
    /// in the lock claim where they can).
    pub atomic: AtomicAsyncAccept,
    /// The per-driver budget both share.
    pub budget: DriverBudget,
}

/// The rollout router over both cohorts, each behind the shared rate limit.
type DriverRouter = RolloutRouter<DriverRateLimit<LegacyAccept>, DriverRateLimit<AtomicAsyncAccept>>;

#[derive(Clone)]
struct DriverRoute {
    /// One router per shard, in shard order.
    routers: Arc<[DriverRouter]>,
    state: AppState,
}

/// The driver routes over each shard's services (`services[i]` runs on shard `i`).
pub fn routes(state: &AppState, services: Vec<AcceptServices>) -> Router {
    let routers = services
        .into_iter()
        .map(|services| {
            let limit = DriverRateLimitLayer::new(services.budget);
            let atomic_limit = if services.atomic.checks_budget() {
                limit.checked_by_lock_claim()
            } else {
                limit.clone()
            };
            RolloutRouter::new(
                state.flags.clone(),
                limit.layer(services.legacy),
                atomic_limit.layer(services.atomic),
            )
        })
        .collect();
    let route = DriverRoute {
        routers,
        state: state.clone(),
    };
    let mut routes = Router::new();
    for path in ROUTES {
        routes = routes.route(path, post(trip_action));
    }
    routes
        .with_state(route)
        .route_layer(axum::middleware::from_fn_with_state(
            super::BodyRead::of(&state.config),
            super::read_body,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::drivers_checked_by_route,
        ))
}

/// Parse, route (to the driver's shard, then the driver's cohort), answer.
async fn trip_action(
    State(route): State<DriverRoute>,
    Extension(user): Extension<AuthUser>,
    unchecked: Option<Extension<UserUnchecked>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let received_at_ms = now_ms();
    let parsed = json_body(&headers, body).and_then(|body| parse_request(&body));
    let (trip_id, action) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => return e.into_response(),
    };
    // The driver's shard must hold the trip: a trip of another shard (region) is not one
    // this driver can see, and no accept ever spans two shards.
    let shards = &route.state.shards;
    let shard = shards.index_of(&user.id);
    if shards.index_of(&trip_id) != shard {
        // A driver the auth layer left to the accept to check is checked here, where no
        // accept follows: someone who is no driver is unauthenticated (401), not told of
        // trips (404), and reaches no cohort.
        if unchecked.is_some() {
            let kind = match route
                .state
                .known_users
                .user_type(shards.for_id(&user.id), &user.id)
                .await
            {
                Ok(kind) => kind,
                Err(e) => return ApiError::from(e).into_response(),
            };
            if kind.as_deref() != Some(crate::auth::Role::Driver.as_str()) {
                return ApiError::Unauthorized.into_response();
            }
        }
        let cohort = route.state.flags.load().trip_accept_cohort(&user.id);
        route.state.metrics.cohort_assigned(TRIP_ACCEPT_FLAG, cohort);
        return tag(ApiError::TripNotFound.into_response(), cohort);
    }
    // A shard whose migrations have not run yet (its database was down at start) has not
    // the statements this release sends: unavailable, not a 500.
    if let Err(e) = route.state.shard_health.ready(shard) {
        return e.into_response();
    }
    let command = AcceptCommand {
        driver_id: user.id,
        trip_id,
        action,
        received_at_ms,
        driver_checked: unchecked.is_none(),
    };
    let Some(router) = route.routers.get(shard) else {
        return ApiError::Internal(format!("no accept services for shard {shard}")).into_response();
    };
    let Routed { cohort, result } = match router.clone().oneshot(command).await {
        Ok(routed) => routed,
        Err(e) => return e.into_response(),
    };
    // A driver who turned out not to be one (deleted or deactivated since the token was
    // issued) is unauthenticated, as the auth layer would have answered: no cohort.
    if let Err(e @ ApiError::Unauthorized) = result {
        return e.into_response();
    }
    route.state.metrics.cohort_assigned(TRIP_ACCEPT_FLAG, cohort);
    let response = match result {
        Ok(reply) => {
            let mut response =
                axum::Json(Envelope::ok("default_update_200", reply.message, reply.data)).into_response();
            response.extensions_mut().insert(reply.outcome);
            response
        }
        Err(e) => e.into_response(),
    };
    tag(response, cohort)
}

/// Names the cohort on the response: a header for people, an extension for the log line
/// and the metrics.
fn tag(mut response: Response, cohort: Cohort) -> Response {
    response
        .headers_mut()
        .insert(COHORT_HEADER, HeaderValue::from_static(cohort.as_str()));
    response.extensions_mut().insert(cohort);
    response
}
