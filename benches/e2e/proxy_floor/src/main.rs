//! A bare reverse proxy: the floor of the stack tripgate's pass-through is built on.
//!
//! `proxy-floor MODE LISTEN UPSTREAM`, e.g. `proxy-floor pooled 127.0.0.1:18184
//! 127.0.0.1:18191`. It forwards every request's method, path, headers and body to
//! `UPSTREAM` over HTTP/1.1 and returns the answer; nothing else (no forwarding headers, no
//! timeouts, no metrics, no logs). The modes:
//!
//! * `pooled`: hyper's HTTP/1 server and hyper-util's pooled client — the parts the issue
//!   asks tripgate to use, with nothing of tripgate's on top;
//! * `axum`: the same behind an axum router's fallback, as tripgate's is;
//! * `same-task`: no pool — each client connection gets its own upstream connection, driven
//!   in the client connection's task (hyper's `client::conn`), so a request never crosses
//!   tasks. The best a pool of our own over `client::conn` could do. When the upstream
//!   closes its connection, the client's is closed too.
//! * `per-core`: `pooled` on one single-threaded runtime per core, each with a listener of
//!   its own on the same address (`SO_REUSEPORT`: the kernel spreads the connections) and a
//!   pool of its own — nginx's shape (a worker per core, nothing shared), on the same stack.
//!   A request and its upstream connection stay on one thread.

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

type Pooled = Client<HttpConnector, Body>;

fn bad_gateway() -> Response<Body> {
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::BAD_GATEWAY;
    res
}

/// `req` with its URI pointed at `origin` (`http://host:port`).
fn retarget<B>(origin: &str, mut req: Request<B>) -> Option<Request<B>> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    *req.uri_mut() = format!("{origin}{path}").parse::<Uri>().ok()?;
    Some(req)
}

async fn pooled(client: &Pooled, origin: &str, req: Request<Body>) -> Response<Body> {
    let Some(req) = retarget(origin, req) else {
        return bad_gateway();
    };
    match client.request(req).await {
        Ok(res) => res.map(Body::new),
        Err(_) => bad_gateway(),
    }
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, listen, upstream] = args.as_slice() else {
        return Err("usage: proxy-floor pooled|axum|same-task|per-core LISTEN UPSTREAM".into());
    };
    if mode == "per-core" {
        let cores = std::thread::available_parallelism()?.get();
        let threads: Vec<_> = (0..cores)
            .map(|_| {
                let (listen, upstream) = (listen.clone(), upstream.clone());
                std::thread::spawn(move || -> Result<(), Error> {
                    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    runtime.block_on(async {
                        let socket = tokio::net::TcpSocket::new_v4()?;
                        socket.set_reuseport(true)?;
                        socket.bind(listen.parse()?)?;
                        pooled_server(socket.listen(1024)?, &upstream).await
                    })
                })
            })
            .collect();
        for thread in threads {
            thread.join().map_err(|_| "a worker thread panicked")??;
        }
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(mode, listen, upstream))
}

fn client() -> Arc<Pooled> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Arc::new(Client::builder(TokioExecutor::new()).build(connector))
}

/// The `pooled` mode on `listener`, with a pool of its own.
async fn pooled_server(listener: TcpListener, upstream: &str) -> Result<(), Error> {
    let origin: Arc<str> = format!("http://{upstream}").into();
    let client = client();
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let (client, origin) = (client.clone(), origin.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (client, origin) = (client.clone(), origin.clone());
                async move { Ok::<_, Infallible>(pooled(&client, &origin, req.map(Body::new)).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn serve(mode: &str, listen: &str, upstream: &str) -> Result<(), Error> {
    let listener = TcpListener::bind(listen).await?;
    let origin: Arc<str> = format!("http://{upstream}").into();
    let client = client();
    match mode {
        "axum" => {
            let app = axum::Router::new().fallback(move |req: Request<Body>| {
                let (client, origin) = (client.clone(), origin.clone());
                async move { pooled(&client, &origin, req).await }
            });
            let listener = axum::serve::ListenerExt::tap_io(listener, |stream: &mut TcpStream| {
                let _ = stream.set_nodelay(true);
            });
            axum::serve(listener, app).await?;
        }
        "pooled" => pooled_server(listener, upstream).await?,
        "same-task" => loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let upstream = upstream.to_string();
            tokio::spawn(async move {
                let Ok(up) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = up.set_nodelay(true);
                let Ok((sender, connection)) =
                    hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(up)).await
                else {
                    return;
                };
                // HTTP/1.1 sends one request at a time on a connection, as the client does.
                let sender = Arc::new(tokio::sync::Mutex::new(sender));
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let sender = sender.clone();
                    async move {
                        let res = sender.lock().await.send_request(req).await;
                        Ok::<_, Infallible>(res.map_or_else(|_| bad_gateway(), |r| r.map(Body::new)))
                    }
                });
                let server = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                // Both connections in this one task. When the upstream closes its side (an
                // nginx ends a keep-alive connection after `keepalive_requests`), the client
                // connection ends too, and the client's next connection gets a new one.
                tokio::select! {
                    _ = server => {}
                    _ = connection => {}
                }
            });
        },
        other => return Err(format!("unknown mode {other}").into()),
    }
    Ok(())
}
