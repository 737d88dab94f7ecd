//! The driver route: `POST /api/driver/trip/request-action` (and the path the existing app
//! calls, `/api/driver/ride/trip-action`). Auth first, then the rollout router, then the
//! cohort's handler — the same code for both cohorts, over a different implementation.

use std::num::NonZeroU32;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::handler::Handler;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post_service;
use tower::{Service, ServiceExt};

use super::{AppState, AuthUser, json_body};
use crate::accept::atomic_async::AtomicAsyncAccept;
use crate::accept::legacy::LegacyAccept;
use crate::accept::{AcceptCommand, AcceptReply, parse_request};
use crate::error::{ApiError, Envelope};
use crate::flags::TRIP_ACCEPT_FLAG;
use crate::metrics::DRIVER_ROUTES;
use crate::rollout::{Cohort, RolloutRouter};
use crate::storage::now_ms;

/// The two implementations the router chooses between.
#[derive(Clone)]
pub struct AcceptServices {
    /// Cohort `legacy`.
    pub legacy: LegacyAccept,
    /// Cohort `atomic_async`.
    pub atomic: AtomicAsyncAccept,
}

/// Per-driver request budget (`server.rate_limit_per_driver` per second, equal burst),
/// shared by both cohorts: one misbehaving app cannot starve the others.
pub type DriverLimiter = governor::DefaultKeyedRateLimiter<String>;

/// A cohort's handler state: its implementation and the shared rate limiter.
#[derive(Clone)]
struct CohortHandler<S> {
    service: S,
    limiter: Arc<DriverLimiter>,
}

/// The driver routes.
pub fn routes(state: &AppState, services: AcceptServices) -> Router {
    let per_second = NonZeroU32::new(state.config.server.rate_limit_per_driver).unwrap_or(NonZeroU32::MIN);
    let limiter = Arc::new(governor::RateLimiter::keyed(governor::Quota::per_second(per_second)));
    let router = RolloutRouter::new(
        state.flags.clone(),
        trip_action::<LegacyAccept>.with_state(CohortHandler {
            service: services.legacy,
            limiter: limiter.clone(),
        }),
        trip_action::<AtomicAsyncAccept>.with_state(CohortHandler {
            service: services.atomic,
            limiter,
        }),
    );
    let mut routes = Router::new();
    for path in DRIVER_ROUTES {
        routes = routes.route(path, post_service(router.clone()));
    }
    routes
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            count_cohort,
        ))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), super::drivers))
}

/// Counts cohort decisions (the router tags the response).
async fn count_cohort(
    State(metrics): State<std::sync::Arc<crate::metrics::Metrics>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(req).await;
    if let Some(cohort) = response.extensions().get::<Cohort>() {
        metrics.cohort_assigned(TRIP_ACCEPT_FLAG, *cohort);
    }
    response
}

/// The handler both cohorts share: validate, then hand the command to `S`.
async fn trip_action<S>(
    State(CohortHandler { service, limiter }): State<CohortHandler<S>>,
    Extension(user): Extension<AuthUser>,
    Extension(cohort): Extension<Cohort>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response
where
    S: Service<AcceptCommand, Response = AcceptReply, Error = ApiError> + Clone + Send + Sync + 'static,
    S::Future: Send,
{
    let received_at_ms = now_ms();
    if limiter.check_key(&user.id).is_err() {
        return ApiError::RateLimited.into_response();
    }
    // Forget drivers idle for a while now and then, so the limiter's map stays small.
    if rand::random_ratio(1, 4096) {
        limiter.retain_recent();
    }
    let parsed = json_body(&headers, body).and_then(|body| parse_request(&body));
    let (trip_id, action) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => return e.into_response(),
    };
    let command = AcceptCommand {
        driver_id: user.id,
        trip_id,
        action,
        received_at_ms,
        cohort,
    };
    match service.oneshot(command).await {
        Ok(reply) => {
            let mut response =
                axum::Json(Envelope::ok("default_update_200", reply.message, reply.data)).into_response();
            response.extensions_mut().insert(reply.outcome);
            response
        }
        Err(e) => e.into_response(),
    }
}
