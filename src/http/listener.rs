//! The connection layer under both listeners: HTTP/1.1 (keep-alive) and HTTP/2 on the same
//! port, a header read timeout (slow-loris), an idle timeout for HTTP/2 connections, a cap
//! on concurrent connections with a clean refusal, and graceful shutdown.
//!
//! `axum::serve` offers none of the limits, so connections are served with hyper-util's
//! `auto` builder directly — the same machinery axum uses.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, Version};
use futures_util::future::{BoxFuture, Either};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tower::Service;

/// Limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections served at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// A client must send its request headers within this (slow-loris). An HTTP/1.1
    /// keep-alive connection waits this long for its next request (hyper's timer).
    pub header_read_timeout: Duration,
    /// An HTTP/2 connection with no request open (response bodies included) for this long
    /// is closed (GOAWAY; the socket at the latest `header_read_timeout` later).
    pub idle_timeout: Duration,
    /// After shutdown is signalled, in-flight requests get this long.
    pub shutdown_grace: Duration,
}

/// What one connection is doing, for its idle timer: HTTP/2 or not, requests still being
/// answered (their response bodies included), and when the last one started or ended.
struct Activity {
    since: Instant,
    http2: AtomicBool,
    open: AtomicUsize,
    /// Milliseconds from `since` to the last start or end of a request.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            since: Instant::now(),
            http2: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// A request started; it ends when the guard (held by its response body) drops.
    fn begin(self: &Arc<Self>) -> OpenRequest {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.touch();
        OpenRequest(self.clone())
    }

    /// When this HTTP/2 connection will have been idle for `limit` if nothing happens
    /// meanwhile; `None` while a request is open, and for HTTP/1.1 (hyper's timer).
    fn idle_until(&self, limit: Duration) -> Option<Instant> {
        (self.http2.load(Ordering::Relaxed) && self.open.load(Ordering::Relaxed) == 0)
            .then(|| self.since + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + limit)
    }
}

/// One open request of a connection (see [`Activity::begin`]).
struct OpenRequest(Arc<Activity>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The router of one connection: each HTTP/2 request counted open until its response body
/// is done or dropped (hyper's own timer covers HTTP/1.1 keep-alive).
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<Body>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        if req.version() != Version::HTTP_2 {
            return Either::Left(self.inner.call(req));
        }
        self.activity.http2.store(true, Ordering::Relaxed);
        let open = self.activity.begin();
        let answer = self.inner.call(req);
        Either::Right(Box::pin(async move {
            let response = answer.await?;
            // The body owns the guard: the request stays open while its body streams.
            Ok(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _open = &open;
                    frame
                }))
            }))
        }))
    }
}

/// The answer to a connection over the cap: a complete HTTP response, then close, so the
/// client sees a clear 503 instead of a reset.
fn over_capacity() -> Vec<u8> {
    let body = r#"{"response_code":"service_unavailable_503","message":"Too many connections, try again.","data":null,"errors":[]}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `router` on `listener` until `shutdown` turns true, then stops accepting, lets
/// in-flight requests finish within the grace period and closes idle keep-alive
/// connections.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
    limits: ConnectionLimits,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    // One permit per connection: all of them back means every connection has ended.
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // The connections' tasks, aborted if they outlive the shutdown grace: their requests
    // (a legacy accept mid-way through its side effects) end before the process says its
    // jobs are free (`Storage::instance_gone`).
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Set by the connection's first request. hyper's header timeout starts once it knows
        // the protocol, and it reads the client's first bytes to learn it with no bound: a
        // client that connects and sends nothing (or half an HTTP/2 preface) would hold its
        // slot for ever.
        let first_request = Arc::new(Notify::new());
        let started = first_request.clone();
        let activity = Arc::new(Activity::new());
        // The peer's address, for `X-Forwarded-For` on pass-through.
        let service = TowerToHyperService::new(Tracked {
            inner: tower::ServiceExt::map_request(router.clone(), move |mut req: Request<Incoming>| {
                started.notify_one();
                req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                req
            }),
            activity: activity.clone(),
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let mut stop = shutdown.clone();
        connections.spawn(async move {
            // Held until the connection ends, whichever way.
            let _permit = permit;
            tokio::pin!(connection);
            // Errors here are the client's (reset, timeout, bad request line): nothing to do.
            tokio::select! {
                biased;
                _ = first_request.notified() => {}
                _ = &mut connection => return,
                // No request in time (or shutting down first): dropping the connection
                // closes it.
                _ = tokio::time::sleep(limits.header_read_timeout) => return,
                _ = stop.wait_for(|stop| *stop) => return,
            }
            let mut closing = false;
            // Set once an idle connection was told to go: HTTP/2 closes after the client
            // acknowledges the GOAWAY's PING, which a broken or hostile one never does.
            let mut closed_by: Option<Instant> = None;
            loop {
                let idle_until = activity.idle_until(limits.idle_timeout);
                // While requests are open, look again after one idle period.
                let wake = idle_until.unwrap_or_else(|| Instant::now() + limits.idle_timeout);
                tokio::select! {
                    biased;
                    _ = &mut connection => break,
                    _ = stop.wait_for(|stop| *stop), if !closing => {
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    _ = tokio::time::sleep_until(wake.into()), if !closing => {
                        if activity.idle_until(limits.idle_timeout).is_some_and(|at| at <= Instant::now()) {
                            connection.as_mut().graceful_shutdown();
                            closing = true;
                            closed_by = Some(Instant::now() + limits.header_read_timeout);
                        }
                    }
                    // Dropping the connection closes the socket.
                    _ = tokio::time::sleep_until(closed_by.unwrap_or_else(Instant::now).into()), if closed_by.is_some() => break,
                }
            }
        });
    }
    drop(listener);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    tokio::select! {
        _ = slots.acquire_many(all) => {}
        _ = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!("shutdown grace period over; closing remaining connections");
        }
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

async fn refuse(mut stream: TcpStream) {
    let _ = stream.write_all(&over_capacity()).await;
    let _ = stream.shutdown().await;
}
