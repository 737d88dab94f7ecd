//! The domain error and the response envelope, mapped to HTTP in one place.
//!
//! Both cohorts answer through [`ApiError`] and [`Envelope`], so a driver app cannot tell
//! which implementation served it from the shape of an answer. (A database error becomes
//! an `ApiError` in `storage`, which knows which of its errors mean "try again".)

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

/// One invalid field of a request, as listed in the envelope's `errors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// The field's name, or `body` when the JSON itself is malformed.
    pub error_code: String,
    /// What is wrong, for a person.
    pub message: String,
}

impl FieldError {
    /// An error on `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error_code: field.into(),
            message: message.into(),
        }
    }
}

/// Everything a request can end in other than success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON or an invalid field.
    #[error("invalid request")]
    Invalid(Vec<FieldError>),
    /// No, bad, expired or not-yet-valid token, or a user that does not exist.
    #[error("unauthenticated")]
    Unauthorized,
    /// A valid token of the wrong role.
    #[error("forbidden for this role")]
    Forbidden,
    /// A customer's token on another customer's trip.
    #[error("not the token's trip")]
    NotYourTrip,
    /// Another driver has the trip (or, on legacy, this driver's retry).
    #[error("trip already taken")]
    TripTaken,
    /// The driver is offline, unavailable or on a trip.
    #[error("driver unavailable")]
    DriverUnavailable,
    /// The driver's vehicle is not in the trip's category.
    #[error("vehicle category mismatch")]
    VehicleMismatch,
    /// The trip was cancelled or is no longer pending.
    #[error("trip not pending")]
    TripNotPending,
    /// No such trip.
    #[error("trip not found")]
    TripNotFound,
    /// Some other resource (job, customer trip) does not exist.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The route exists, not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request conflicts with the state it would change (e.g. an override while the
    /// flags file's kill switch is on).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The body exceeds `server.max_body_bytes`.
    #[error("request body too large")]
    PayloadTooLarge,
    /// The body did not all arrive within `server.header_read_timeout_ms`.
    #[error("request body not received within {0:?}")]
    BodyTimeout(std::time::Duration),
    /// The body is not `application/json`.
    #[error("unsupported content type")]
    UnsupportedMediaType,
    /// Over `server.rate_limit_per_driver`.
    #[error("too many requests")]
    RateLimited,
    /// A console (cookie) call that changes something came without the session's CSRF token.
    #[error("CSRF token missing or wrong")]
    CsrfRefused,
    /// The upstream (pass-through) could not be reached, or reset the connection.
    #[error("bad gateway")]
    BadGateway,
    /// The upstream sent no response head within `upstream.timeout_ms`.
    #[error("gateway timeout")]
    GatewayTimeout,
    /// The database (or another dependency the answer needs) cannot be reached.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected failure; logged, answered 500.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A single invalid field.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldError::new(field, message)])
    }

    /// HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden
            | Self::NotYourTrip
            | Self::TripTaken
            | Self::DriverUnavailable
            | Self::VehicleMismatch
            | Self::TripNotPending => StatusCode::FORBIDDEN,
            Self::TripNotFound | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadGateway => StatusCode::BAD_GATEWAY,
            Self::CsrfRefused => StatusCode::FORBIDDEN,
            Self::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The envelope's `response_code` (SPEC §5).
    pub fn response_code(&self) -> &'static str {
        match self {
            Self::Invalid(_) | Self::PayloadTooLarge | Self::BodyTimeout(_) | Self::UnsupportedMediaType => {
                "default_400"
            }
            Self::Unauthorized => "auth_login_401",
            Self::Forbidden | Self::NotYourTrip => "auth_forbidden_403",
            Self::TripTaken => "trip_request_driver_403",
            Self::DriverUnavailable => "driver_unavailable_403",
            Self::VehicleMismatch => "vehicle_category_mismatch_403",
            Self::TripNotPending => "trip_not_pending_403",
            Self::TripNotFound => "trip_request_404",
            Self::NotFound(_) => "default_404",
            Self::MethodNotAllowed => "method_not_allowed_405",
            Self::Conflict(_) => "conflict_409",
            Self::RateLimited => "too_many_requests_429",
            Self::Unavailable(_) => "service_unavailable_503",
            Self::BadGateway => "bad_gateway_502",
            Self::CsrfRefused => "auth_csrf_403",
            Self::GatewayTimeout => "gateway_timeout_504",
            Self::Internal(_) => "default_500",
        }
    }

    /// The metrics `outcome` label (SPEC §7).
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Invalid(_) | Self::PayloadTooLarge | Self::BodyTimeout(_) | Self::UnsupportedMediaType => {
                Outcome::Invalid
            }
            Self::Unauthorized | Self::Forbidden | Self::NotYourTrip | Self::CsrfRefused => Outcome::Unauthorized,
            Self::TripTaken => Outcome::Taken,
            Self::DriverUnavailable => Outcome::Unavailable,
            Self::VehicleMismatch => Outcome::Mismatch,
            Self::TripNotPending => Outcome::NotPending,
            Self::TripNotFound | Self::NotFound(_) => Outcome::NotFound,
            Self::Conflict(_) | Self::MethodNotAllowed => Outcome::Invalid,
            Self::RateLimited => Outcome::RateLimited,
            Self::Unavailable(_) | Self::Internal(_) | Self::BadGateway | Self::GatewayTimeout => Outcome::Error,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Invalid(_) => "The given data was invalid.".into(),
            Self::Unauthorized => "Unauthenticated.".into(),
            Self::Forbidden => "This token's role may not use this endpoint.".into(),
            Self::NotYourTrip => "This trip request belongs to another customer.".into(),
            Self::TripTaken => "This trip has already been accepted.".into(),
            Self::DriverUnavailable => "Driver is offline, unavailable or already on a trip.".into(),
            Self::VehicleMismatch => "Your vehicle is not in this trip's category.".into(),
            Self::TripNotPending => "This trip is no longer pending.".into(),
            Self::TripNotFound => "Trip request not found.".into(),
            Self::NotFound(what) => format!("{what} not found."),
            Self::MethodNotAllowed => "This route does not take this method (see the Allow header).".into(),
            Self::Conflict(why) => why.clone(),
            Self::PayloadTooLarge => "Request body too large.".into(),
            Self::BodyTimeout(within) => format!("The request body did not arrive within {} ms.", within.as_millis()),
            Self::UnsupportedMediaType => "Content-Type must be application/json.".into(),
            Self::RateLimited => "Too many requests.".into(),
            Self::Unavailable(_) => "Service temporarily unavailable, try again.".into(),
            Self::BadGateway => "The backend could not be reached.".into(),
            Self::CsrfRefused => "Send the session's X-CSRF-Token with changes made from the console.".into(),
            Self::GatewayTimeout => "The backend did not answer in time.".into(),
            Self::Internal(_) => "Internal server error.".into(),
        }
    }
}

/// Why a request failed (a 500's or 503's reason, which its answer does not show), on the
/// answer's extensions: the request's log line carries it, with its request id.
#[derive(Debug, Clone)]
pub struct FailureReason(pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let reason = match &self {
            Self::Internal(reason) | Self::Unavailable(reason) => Some(FailureReason(reason.clone())),
            _ => None,
        };
        let errors = match &self {
            Self::Invalid(errors) => errors.clone(),
            _ => Vec::new(),
        };
        let body = Envelope {
            response_code: self.response_code(),
            message: self.message(),
            data: Value::Null,
            errors,
        };
        let mut response = (self.status(), Json(body)).into_response();
        if matches!(self, Self::RateLimited) {
            // The budget refills at least one request a second (`server.rate_limit_per_driver`
            // ≥ 1): a client that waits this long is let through.
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response.extensions_mut().insert(self.outcome());
        if let Some(reason) = reason {
            response.extensions_mut().insert(reason);
        }
        response
    }
}

/// The response envelope shared by every driver and customer answer.
#[derive(Debug, Serialize)]
pub struct Envelope {
    /// Machine-readable result, e.g. `default_update_200`.
    pub response_code: &'static str,
    /// For a person.
    pub message: String,
    /// The payload, or null.
    pub data: Value,
    /// Field errors (400 only).
    pub errors: Vec<FieldError>,
}

impl Envelope {
    /// A 200 answer with `code` and `data`.
    pub fn ok(code: &'static str, message: &str, data: Value) -> Self {
        Self {
            response_code: code,
            message: message.into(),
            data,
            errors: Vec::new(),
        }
    }
}

/// How a request ended, the `outcome` metric label. Attached to responses as an extension
/// so the metrics layer reads it instead of parsing bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Trip accepted (first time).
    Accepted,
    /// Driver rejected the offer.
    Rejected,
    /// Same driver again, answered idempotently.
    Retry,
    /// Another driver had the trip.
    Taken,
    /// Driver unavailable.
    Unavailable,
    /// Vehicle category mismatch.
    Mismatch,
    /// Trip no longer pending.
    NotPending,
    /// No such trip.
    NotFound,
    /// Bad input.
    Invalid,
    /// Bad token or role.
    Unauthorized,
    /// Over the rate limit.
    RateLimited,
    /// 5xx.
    Error,
    /// A 2xx of a route that is not an accept (customer routes).
    Ok,
}

impl Outcome {
    /// Every outcome, for creating metric children up front.
    pub const ALL: [Outcome; 13] = [
        Self::Accepted,
        Self::Rejected,
        Self::Retry,
        Self::Taken,
        Self::Unavailable,
        Self::Mismatch,
        Self::NotPending,
        Self::NotFound,
        Self::Invalid,
        Self::Unauthorized,
        Self::RateLimited,
        Self::Error,
        Self::Ok,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Rejected => "rejected",
            Self::Retry => "retry",
            Self::Taken => "taken",
            Self::Unavailable => "unavailable",
            Self::Mismatch => "mismatch",
            Self::NotPending => "not_pending",
            Self::NotFound => "not_found",
            Self::Invalid => "invalid",
            Self::Unauthorized => "unauthorized",
            Self::RateLimited => "rate_limited",
            Self::Error => "error",
            Self::Ok => "ok",
        }
    }
}
