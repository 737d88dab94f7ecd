//! The connection layer under both listeners: HTTP/1.1 (keep-alive) and HTTP/2 on the same
//! port, a header read timeout (slow-loris), a cap on concurrent connections with a clean
//! refusal, and graceful shutdown.
//!
//! `axum::serve` offers none of the limits, so connections are served with hyper-util's
//! `auto` builder directly — the same machinery axum uses.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};

/// Limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections served at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// A client must send its request headers within this (slow-loris).
    pub header_read_timeout: Duration,
    /// After shutdown is signalled, in-flight requests get this long.
    pub shutdown_grace: Duration,
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
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
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
        // The peer's address, for `X-Forwarded-For` on pass-through.
        let service = TowerToHyperService::new(tower::ServiceExt::map_request(
            router.clone(),
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                started.notify_one();
                req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                req
            },
        ));
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        let first_request_within = limits.header_read_timeout;
        tokio::spawn(async move {
            tokio::pin!(connection);
            // Errors here are the client's (reset, timeout, bad request line): nothing to do.
            tokio::select! {
                biased;
                _ = &mut connection => {}
                _ = first_request.notified() => {
                    let _ = connection.await;
                }
                // No request in time: dropping the connection closes it.
                _ = tokio::time::sleep(first_request_within) => {}
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!("shutdown grace period over; closing remaining connections");
        }
    }
}

async fn refuse(mut stream: TcpStream) {
    let _ = stream.write_all(&over_capacity()).await;
    let _ = stream.shutdown().await;
}
