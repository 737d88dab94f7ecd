//! Request ids, the per-request log line and the request metrics.
//!
//! One structured line per request: request id, method, route template, status, driver,
//! cohort, outcome, latency. The cohort and outcome come from response extensions the
//! router and the handlers set, so nothing parses bodies.
//!
//! All of it is one tower layer, [`Observe`], which allocates nothing per pass-through or
//! admin request besides a new request id. It used to be four layers (tower-http's two
//! request-id layers and two axum middlewares), which cost about 2 µs more per pass-through
//! request (BENCHMARKS.md §0c run 9).
//!
//! A request to one of tripgate's own routes on the API listener is served in place, its
//! answer's future boxed: when a driver app gives up at `client.timeout_ms` and hangs up,
//! hyper drops what serves the connection, and the rest of the request then runs on a task
//! of its own and is measured — else the slow requests, the ones the timeouts metric and
//! the cohort comparison are about, would go unmeasured. Such a line says `hung_up=true`.
//! (A task for every request instead cost the idle accept 0.3–0.5 ms on two shared cores,
//! BENCHMARKS.md §0 "U".)

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use tower::{Layer, Service};

use crate::auth::AuthUser;
use crate::domain::Cohort;
use crate::error::{ApiError, FailureReason, Outcome};
use crate::metrics::Metrics;

/// The request id header, set when the client did not send one and echoed back.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Wraps `router` in the observe layer. With `metrics` the requests are also counted (the
/// API listener); the admin listener's requests (scrapes, health checks) are only logged.
pub fn wrap(router: Router, metrics: Option<Arc<Metrics>>) -> Router {
    router.layer(ObserveLayer { metrics })
}

/// The longest client request id kept; a longer one is replaced as an unusable one is.
const MAX_REQUEST_ID: usize = 128;

/// The request's id: the client's own when it sent exactly one usable one, else a new one
/// (a UUID) that replaces whatever it sent. An id that is empty, too long or not printable
/// ASCII would be logged as "" or flood the log line.
fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    let usable = |v: &HeaderValue| {
        let bytes = v.as_bytes();
        !bytes.is_empty() && bytes.len() <= MAX_REQUEST_ID && bytes.iter().all(|b| b.is_ascii_graphic())
    };
    let mut sent = headers.get_all(&REQUEST_ID).iter();
    if let (Some(id), None) = (sent.next(), sent.next())
        && usable(id)
    {
        return id.clone();
    }
    let mut text = uuid::Uuid::encode_buffer();
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    let id = HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static("-"));
    headers.insert(REQUEST_ID, id.clone());
    id
}

/// The [`Layer`] of [`Observe`].
#[derive(Clone)]
struct ObserveLayer {
    metrics: Option<Arc<Metrics>>,
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// Gives each request its id (on the request, for the handlers and the upstream, and on
/// the answer), then logs and counts the answer.
#[derive(Clone)]
struct Observe<S> {
    inner: S,
    metrics: Option<Arc<Metrics>>,
}

impl<S> Service<Request> for Observe<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Observed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let seen = Seen {
            done: false,
            started: Instant::now(),
            id: request_id(req.headers_mut()),
            route: req.extensions().get::<MatchedPath>().cloned(),
            method: req.method().clone(),
            metrics: self.metrics.clone(),
        };
        let answer = self.inner.call(req);
        // Tripgate's own routes (a matched path) on the listener that counts requests; not
        // pass-through (the fallback), whose body or tunnel ends with its client.
        if seen.metrics.is_some() && seen.route.is_some() {
            return Observed::Owned {
                answer: Finishing {
                    answer: Some(Box::pin(answer)),
                    seen: Some(seen),
                },
            };
        }
        Observed::Here {
            answer,
            seen: Some(seen),
        }
    }
}

/// What the log line and the metrics need of the request.
struct Seen {
    /// Logged (and counted): a `Seen` dropped before is a request whose client hung up.
    done: bool,
    started: Instant,
    id: HeaderValue,
    route: Option<MatchedPath>,
    method: Method,
    metrics: Option<Arc<Metrics>>,
}

pin_project_lite::pin_project! {
    /// The answer of an [`Observe`]d request.
    #[project = ObservedProj]
    enum Observed<F> {
        /// Made and measured here, in the connection's task.
        Here {
            #[pin]
            answer: F,
            seen: Option<Seen>,
        },
        /// Made and measured here, and finished on a task of its own if the client hangs
        /// up first.
        Owned {
            answer: Finishing,
        },
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for Observed<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ObservedProj::Here { answer, seen } => {
                // A panicking handler (admin, pass-through) is a counted, logged 500 here
                // too — not a connection dropped and logged as the client's hang-up.
                let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| answer.poll(cx)));
                let mut response = match polled {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(Ok(response))) => response,
                    Err(_) => ApiError::Internal("the request's handler panicked".into()).into_response(),
                };
                if let Some(seen) = seen.take() {
                    seen.answered(&mut response, false);
                }
                Poll::Ready(Ok(response))
            }
            ObservedProj::Owned { answer } => Pin::new(answer).poll(cx).map(Ok),
        }
    }
}

/// An own-route request's answer, served in the connection's task (no task hop on the
/// hot path), its future boxed so that it can move: dropped unfinished — the client hung
/// up, and hyper drops what serves the connection — the rest runs on a task of its own and
/// is measured (`hung_up=true`). A handler that panics is a 500, logged and counted.
struct Finishing {
    answer: Option<Answer>,
    seen: Option<Seen>,
}

/// A route's answer, boxed.
type Answer = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl Future for Finishing {
    type Output = Response;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response> {
        let Some(answer) = self.answer.as_mut() else {
            return Poll::Pending;
        };
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| answer.as_mut().poll(cx)));
        let mut response = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(Ok(response))) => response,
            Err(_) => ApiError::Internal("the request's handler panicked".into()).into_response(),
        };
        self.answer = None;
        if let Some(seen) = self.seen.take() {
            seen.answered(&mut response, false);
        }
        Poll::Ready(response)
    }
}

impl Drop for Finishing {
    fn drop(&mut self) {
        let (Some(answer), Some(seen)) = (self.answer.take(), self.seen.take()) else {
            return;
        };
        // (No runtime — the process is ending: the unfinished request is logged as one
        // whose client hung up, when `seen` drops.)
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            use futures_util::FutureExt;
            let mut response = match std::panic::AssertUnwindSafe(answer).catch_unwind().await {
                Ok(Ok(response)) => response,
                Err(_) => ApiError::Internal("the request's handler panicked".into()).into_response(),
            };
            seen.answered(&mut response, true);
        });
    }
}

/// A method as logged: a client's own method (forwarded as sent) can be as long as the
/// request head; its log line takes at most 32 bytes of it.
fn method_shown(method: &Method) -> &str {
    let m = method.as_str();
    match m.char_indices().nth(32) {
        Some((cut, _)) => &m[..cut],
        None => m,
    }
}

impl Seen {
    /// Logs and counts `response`, and echoes the request id on it. `hung_up`: the client
    /// closed its connection before the answer (it was not sent).
    fn answered(mut self, response: &mut Response, hung_up: bool) {
        self.done = true;
        let elapsed = self.started.elapsed();
        let route = self.route.as_ref().map_or("unmatched", MatchedPath::as_str);
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
        // One line per request; a failure's reason in it, at error level.
        let failure = response.extensions().get::<FailureReason>().map(|r| r.0.as_str());
        macro_rules! request_line {
            ($level:ident) => {
                tracing::$level!(
                    request_id = %self.id.to_str().unwrap_or_default(),
                    method = %method_shown(&self.method),
                    route = %route,
                    status = status.as_u16(),
                    driver = %driver,
                    cohort = cohort.map_or("none", Cohort::as_str),
                    outcome = outcome.as_str(),
                    latency_ms = elapsed.as_secs_f64() * 1000.0,
                    hung_up,
                    error = failure.unwrap_or_default(),
                    "request"
                )
            };
        }
        if failure.is_some() {
            request_line!(error);
        } else {
            request_line!(info);
        }
        let pass_through = response.extensions().get::<super::upstream::PassThrough>().is_some();
        if let Some(metrics) = self.metrics.take().filter(|_| !pass_through) {
            metrics.request(cohort, driver, route, outcome, status.as_u16(), elapsed);
        }
        // An upstream's own request id (pass-through) is its answer's to keep.
        response.headers_mut().entry(REQUEST_ID).or_insert(self.id.clone());
    }
}

impl Drop for Seen {
    /// The client hung up before the answer (hyper dropped what served the request): a
    /// pass-through request, or one tripgate answered in place. Logged all the same, with
    /// nginx's 499 ("client closed request"); a pass-through request is counted when its
    /// upstream answers ([`super::upstream`]).
    fn drop(&mut self) {
        if self.done {
            return;
        }
        tracing::info!(
            request_id = %self.id.to_str().unwrap_or_default(),
            method = %method_shown(&self.method),
            route = %self.route.as_ref().map_or("unmatched", MatchedPath::as_str),
            status = 499_u16,
            driver = "",
            cohort = "none",
            outcome = "hung_up",
            latency_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            hung_up = true,
            "request"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::body::Body;

    use super::*;

    /// A log sink for the test's subscriber.
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// This thread's log lines, written to the returned buffer while the guard lives.
    fn capture() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Capture(sink.clone()))
            .with_ansi(false)
            .finish();
        (out, tracing::subscriber::set_default(subscriber))
    }

    #[tokio::test]
    async fn a_request_is_one_log_line_with_its_id_echoed() {
        let (out, _default) = capture();
        let answer = tower::service_fn(|_: Request| async { Ok::<_, Infallible>(Response::new(Body::empty())) });
        let mut service = ObserveLayer { metrics: None }.layer(answer);
        let req = Request::builder()
            .uri("/x")
            .header(REQUEST_ID, "abc-1")
            .body(Body::empty())
            .unwrap();
        let res = service.call(req).await.unwrap();
        assert_eq!(res.headers()[REQUEST_ID], "abc-1");
        let log = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(
            log.contains(
                "request request_id=abc-1 method=GET route=unmatched status=200 driver= cohort=\"none\" outcome=\"ok\""
            ),
            "{log}"
        );
    }

    /// A 500's or 503's reason is in its request's one line (at error level, with its id),
    /// not on a line of its own that no request id ties to it; a handler that panics on
    /// the admin listener or in pass-through is a logged 500, not a client's hang-up; a
    /// client's own method is logged cut short.
    #[tokio::test]
    async fn a_failure_is_one_line_with_its_reason() {
        let (out, _default) = capture();
        let failing = tower::service_fn(|req: Request| async move {
            if req.uri().path() == "/panic" {
                panic!("a handler's bug");
            }
            Ok::<_, Infallible>(ApiError::Unavailable("database down".into()).into_response())
        });
        let mut service = ObserveLayer { metrics: None }.layer(failing);
        let method = format!("X{}", "Y".repeat(200));
        for (path, method) in [("/down", "GET"), ("/panic", "POST"), ("/down", method.as_str())] {
            let req = Request::builder()
                .uri(path)
                .method(method)
                .header(REQUEST_ID, "abc-2")
                .body(Body::empty())
                .unwrap();
            let status = service.call(req).await.unwrap().status().as_u16();
            assert_eq!(status, if path == "/panic" { 500 } else { 503 });
        }
        let log = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = log.lines().filter(|l| !l.contains("panicked at")).collect();
        assert_eq!(lines.len(), 3, "{log}");
        assert!(
            lines[0].contains("ERROR")
                && lines[0].contains("request_id=abc-2")
                && lines[0].contains("status=503")
                && lines[0].contains("error=\"database down\""),
            "{log}"
        );
        assert!(
            lines[1].contains("status=500") && lines[1].contains("panicked") && !lines[1].contains("hung_up=true"),
            "{log}"
        );
        assert!(
            lines[2].contains(&format!("method={}", &method[..32])) && !lines[2].contains(&method[..33]),
            "{log}"
        );
    }

    fn ids(lines: &[&[u8]]) -> (HeaderValue, Vec<HeaderValue>) {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(REQUEST_ID, HeaderValue::from_bytes(line).unwrap());
        }
        let id = request_id(&mut headers);
        (id, headers.get_all(REQUEST_ID).iter().cloned().collect())
    }

    #[test]
    fn a_single_usable_id_is_kept_and_anything_else_replaced_by_one_of_ours() {
        let (id, on_request) = ids(&[b"abc-1"]);
        assert_eq!(
            (id.as_bytes(), on_request),
            (&b"abc-1"[..], vec![HeaderValue::from_static("abc-1")])
        );
        let long = vec![b'a'; MAX_REQUEST_ID + 1];
        let sent: [&[&[u8]]; 6] = [
            &[],
            &[b"a", b"b"],
            &[b""],
            &[&long],
            &["caf\u{e9}".as_bytes()],
            &[b"a b"],
        ];
        for sent in sent {
            let (id, on_request) = ids(sent);
            assert!(uuid::Uuid::parse_str(id.to_str().unwrap()).is_ok(), "{sent:?} → {id:?}");
            assert_eq!(on_request, vec![id], "the request carries the new id, alone");
        }
    }
}
