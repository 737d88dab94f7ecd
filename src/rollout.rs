//! The rollout router: puts each driver request in a cohort and runs it on that cohort's
//! implementation.
//!
//! [`RolloutRouter`] is an ordinary `tower::Service` holding both inner services (the
//! linkerd `distribute` pattern). Per request it reads the flags in force (lock-free), takes
//! the driver id from the verified token (an extension the auth layer set — never the
//! body), attaches the [`Cohort`] to the request and to the response (for metrics and
//! logs), and calls the chosen service.

use std::task::{Context, Poll};

use axum::extract::Request;
use axum::response::Response;
use futures_util::future::{Either, MapOk, TryFutureExt};
use tower::Service;

use crate::flags::FlagsHandle;
use crate::http::AuthUser;

/// Which implementation serves a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cohort {
    /// The synchronous handler of today.
    Legacy,
    /// The atomic claim + durable job.
    AtomicAsync,
}

impl Cohort {
    /// Both cohorts.
    pub const ALL: [Cohort; 2] = [Cohort::Legacy, Cohort::AtomicAsync];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Legacy => "legacy",
            Self::AtomicAsync => "atomic_async",
        }
    }

    /// The cohort named `s`.
    pub fn parse(s: &str) -> Option<Cohort> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// Routes each request to `legacy` or `atomic` by the driver's cohort.
#[derive(Clone)]
pub struct RolloutRouter<L, A> {
    flags: FlagsHandle,
    legacy: L,
    atomic: A,
}

impl<L, A> RolloutRouter<L, A> {
    /// A router over the two implementations, reading `flags` per request.
    pub fn new(flags: FlagsHandle, legacy: L, atomic: A) -> Self {
        Self { flags, legacy, atomic }
    }
}

type Tagged<F> = MapOk<F, fn(Response) -> Response>;

impl<L, A> Service<Request> for RolloutRouter<L, A>
where
    L: Service<Request, Response = Response>,
    A: Service<Request, Response = Response, Error = L::Error>,
{
    type Response = Response;
    type Error = L::Error;
    type Future = Either<Tagged<L::Future>, Tagged<A::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both must be ready: the cohort is only known once the request is seen.
        match (self.legacy.poll_ready(cx)?, self.atomic.poll_ready(cx)?) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        // Without an authenticated driver (the auth layer refuses those first) there is
        // nothing to bucket: the known path serves.
        let cohort = match req.extensions().get::<AuthUser>() {
            Some(user) => self.flags.load().trip_accept_cohort(&user.id),
            None => Cohort::Legacy,
        };
        req.extensions_mut().insert(cohort);
        match cohort {
            Cohort::Legacy => Either::Left(self.legacy.call(req).map_ok(tag_legacy as fn(Response) -> Response)),
            Cohort::AtomicAsync => Either::Right(self.atomic.call(req).map_ok(tag_atomic as fn(Response) -> Response)),
        }
    }
}

/// The response header naming the cohort that served a request (for ops and debugging;
/// the driver app ignores it).
pub const COHORT_HEADER: &str = "x-tripgate-cohort";

fn tag(mut res: Response, cohort: Cohort) -> Response {
    res.headers_mut()
        .insert(COHORT_HEADER, axum::http::HeaderValue::from_static(cohort.as_str()));
    res.extensions_mut().insert(cohort);
    res
}

fn tag_legacy(res: Response) -> Response {
    tag(res, Cohort::Legacy)
}

fn tag_atomic(res: Response) -> Response {
    tag(res, Cohort::AtomicAsync)
}
