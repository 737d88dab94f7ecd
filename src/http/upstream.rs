//! Pass-through to the existing backend (`[upstream]`): every request to `server.listen`
//! that no tripgate route owns is forwarded — method, path and query unchanged, bodies
//! streamed both ways, hop-by-hop headers (RFC 9110 §7.6.1) removed both ways,
//! `X-Forwarded-For` appended, `X-Forwarded-Proto` / `X-Forwarded-Host` set, `Via` added,
//! the request id kept — over hyper-util's pooled keep-alive client. A websocket upgrade
//! is tunnelled both ways until either side closes.
//!
//! Failures answer in the app's envelope: unreachable or reset → 502 `bad_gateway_502`; no
//! response head within `upstream.timeout_ms` of the request's body having been sent → 504
//! `gateway_timeout_504`. A body (an upload, then the answer's) or a tunnel runs as long as
//! it moves, with at most `upstream.idle_timeout_ms` between bytes: a slow upload is not cut
//! by `timeout_ms`, a stalled one is (504). Pass-through requests are counted in
//! `tripgate_upstream_*` only.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::oneshot;
use tower_http::timeout::{TimeoutBody, TimeoutError};

use crate::config::UpstreamConfig;
use crate::error::ApiError;
use crate::metrics::Metrics;

/// Marks a response as a pass-through one (the request log still has it; the
/// `tripgate_http_*` metrics do not).
#[derive(Debug, Clone, Copy)]
pub struct PassThrough;

/// The upstream and its pooled client; cloned per request (axum's state), so it is one
/// `Arc`.
#[derive(Clone)]
pub struct Upstream(Arc<Inner>);

impl std::ops::Deref for Upstream {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// What an [`Upstream`] holds.
pub struct Inner {
    client: Client<HttpConnector, Body>,
    /// The upstream's authority, as the forwarded requests' `Host`.
    host: Option<HeaderValue>,
    /// Scheme, authority and the URL's path prefix (without a trailing `/`): what a
    /// forwarded request's path and query are appended to.
    origin: String,
    timeout: Duration,
    idle: Duration,
    labels: Arc<Vec<String>>,
    trust_forwarded: bool,
    /// Bounds the websocket tunnels open at once (they outlive their HTTP connection).
    tunnels: Arc<tokio::sync::Semaphore>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Upstream({})", self.0.origin)
    }
}

/// The hop-by-hop headers a proxy never forwards (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// A client's own forwarding headers that tripgate does not set, dropped unless
/// `upstream.trust_forwarded`.
const CLIENT_FORWARDED: [HeaderName; 4] = [
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-real-ip"),
    header::FORWARDED,
];

/// What tripgate adds to `Via`.
const VIA: &str = "1.1 tripgate";

impl Upstream {
    /// The upstream of `config` (already validated: an `http://` URL); at most
    /// `max_tunnels` websockets at once.
    pub fn new(config: &UpstreamConfig, max_tunnels: usize, metrics: Arc<Metrics>) -> Result<Self, String> {
        let uri: Uri = config.url.parse().map_err(|e| format!("upstream.url: {e}"))?;
        let base = Uri::builder()
            .scheme(uri.scheme_str().unwrap_or("http"))
            .authority(uri.authority().map(|a| a.as_str()).unwrap_or_default())
            .path_and_query("/")
            .build()
            .map_err(|e| format!("upstream.url: {e}"))?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(config.connect_timeout_ms)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(config.max_idle_per_host)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Ok(Self(Arc::new(Inner {
            client,
            host: base.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
            origin: format!(
                "{}{}",
                base.to_string().trim_end_matches('/'),
                uri.path().trim_end_matches('/')
            ),
            timeout: Duration::from_millis(config.timeout_ms),
            idle: Duration::from_millis(config.idle_timeout_ms),
            labels: Arc::new(config.route_labels.clone()),
            trust_forwarded: config.trust_forwarded,
            tunnels: Arc::new(tokio::sync::Semaphore::new(max_tunnels)),
            metrics,
        })))
    }

    /// Where a request for `path_and_query` (it starts with `/`) goes: the upstream's
    /// origin, its path prefix, then the request's path and query.
    fn target(&self, path_and_query: &str) -> Option<Uri> {
        let mut target = String::with_capacity(self.origin.len() + path_and_query.len());
        target.push_str(&self.origin);
        target.push_str(path_and_query);
        target.parse().ok()
    }

    /// The bounded `route` label of `path`.
    fn label(&self, path: &str) -> &str {
        self.labels
            .iter()
            .find(|p| path.starts_with(p.as_str()))
            .map_or("other", String::as_str)
    }
}

/// The fallback of the API router: forwards the request.
pub async fn forward(State(up): State<Upstream>, mut req: Request) -> Response {
    let started = Instant::now();
    let route = up.label(req.uri().path());
    let websocket = is_websocket(req.headers());
    let tunnel_slot = if websocket {
        match up.tunnels.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                return ApiError::Unavailable("too many websocket tunnels".into()).into_response();
            }
        }
    } else {
        None
    };
    let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let (parts, body) = req.into_parts();
    // A reverse proxy forwards requests for a path: not CONNECT (a forward proxy's tunnel)
    // nor `OPTIONS *` (a question to tripgate itself), which the upstream URL cannot carry.
    if parts.method == axum::http::Method::CONNECT {
        let mut refused = ApiError::MethodNotAllowed.into_response();
        refused.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
        return refused;
    }
    let Some(path_and_query) = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| p.starts_with('/'))
    else {
        return ApiError::invalid("path", "Only requests for a path (/…) are forwarded.").into_response();
    };
    let Some(uri) = up.target(path_and_query) else {
        return ApiError::invalid("path", "The request path cannot be forwarded.").into_response();
    };
    let mut headers = parts.headers;
    // HTTP/2 carries the host as `:authority`, not as a Host header.
    let original_host = headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    strip_hop_by_hop(&mut headers);
    // Credentials meant for tripgate, not for the backend.
    headers.remove(header::PROXY_AUTHORIZATION);
    strip_session_cookie(&mut headers);
    if websocket {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    if !up.trust_forwarded {
        // A client's own say on how it reached us (spoofable): what tripgate saw replaces
        // Proto and Host; the rest, which tripgate does not set, goes.
        for name in [X_FORWARDED_PROTO, X_FORWARDED_HOST]
            .into_iter()
            .chain(CLIENT_FORWARDED)
        {
            headers.remove(name);
        }
    }
    forwarded_headers(&mut headers, peer, original_host);
    if let Some(host) = &up.host {
        headers.insert(header::HOST, host.clone());
    }
    let bodiless = body.is_end_stream();
    let (body, mut upload) = if websocket || bodiless {
        (Body::empty(), None)
    } else {
        let (body, upload) = Upload::of(Body::new(TimeoutBody::new(up.idle, body)));
        (body, Some(upload))
    };
    // A safe request without a body is sent again, once, when its pooled connection failed
    // before an answer (the upstream closed it while idle: the usual race of keep-alive),
    // as a browser or nginx would; anything else is the client's to retry.
    let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    let again = (!websocket && bodiless && safe).then(|| (parts.method.clone(), uri.clone(), headers.clone()));
    let request = |method, uri, headers, body| {
        let mut upstream_req = axum::http::Request::new(body);
        *upstream_req.method_mut() = method;
        *upstream_req.uri_mut() = uri;
        *upstream_req.headers_mut() = headers;
        *upstream_req.version_mut() = axum::http::Version::HTTP_11;
        upstream_req
    };
    let mut sent = Pending {
        answer: Some(up.client.request(request(parts.method, uri, headers, body))),
        up: &up,
        route,
        started,
        client_broke: upload.as_ref().map(|u| u.client_broke.clone()),
    };
    let mut answer = match &mut upload {
        Some(upload) => head_after_upload(up.timeout, up.idle, &mut sent, upload).await,
        // Only a head to send: the wait for the answer starts at once.
        None => tokio::time::timeout(up.timeout, &mut sent).await.ok(),
    };
    // From here every way out counts the request itself.
    sent.answer = None;
    if let (Some(Err(e)), Some((method, uri, headers))) = (&answer, again)
        && !e.is_connect()
    {
        tracing::debug!(error = %e, "upstream connection failed before an answer; sending again");
        let retry = up.client.request(request(method, uri, headers, Body::empty()));
        answer = tokio::time::timeout(up.timeout.saturating_sub(started.elapsed()), retry)
            .await
            .ok();
    }
    let mut res = match answer {
        None => return failed(&up, route, "timeout", ApiError::GatewayTimeout, started),
        // The client's own upload broke off (an abort, a malformed chunked body): its
        // fault, not the upstream's.
        Some(Err(_)) if upload.as_ref().is_some_and(|u| u.client_broke.load(Ordering::Acquire)) => {
            let mut res = ApiError::invalid("body", "The request body broke off before its end.").into_response();
            up.metrics
                .upstream_request(route, res.status().as_u16(), started.elapsed());
            res.extensions_mut().insert(PassThrough);
            return res;
        }
        // The client stopped sending for `idle_timeout_ms`.
        Some(Err(_)) if upload.is_some_and(|u| u.stalled.load(Ordering::Acquire)) => {
            return failed(&up, route, "timeout", ApiError::GatewayTimeout, started);
        }
        Some(Err(e)) => {
            let kind = if e.is_connect() { "connect" } else { "reset" };
            tracing::debug!(error = %e, kind, "upstream request failed");
            return failed(&up, route, kind, ApiError::BadGateway, started);
        }
        Some(Ok(res)) => res,
    };
    up.metrics
        .upstream_request(route, res.status().as_u16(), started.elapsed());

    if res.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut res);
        let idle = up.idle;
        tokio::spawn(async move {
            let _slot = tunnel_slot;
            if let (Ok(client), Ok(upstream)) = (client_upgrade.await, upstream_upgrade.await) {
                tunnel(TokioIo::new(client), TokioIo::new(upstream), idle).await;
            }
        });
        let (parts, _) = res.into_parts();
        let mut out = Response::from_parts(parts, Body::empty());
        add_via(out.headers_mut());
        out.extensions_mut().insert(PassThrough);
        return out;
    }
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    add_via(&mut parts.headers);
    // An answer that breaks off after its head (the upstream resets, or stops sending for
    // `idle_timeout_ms`) is counted as the error it is; its head was counted above.
    let metrics = up.metrics.clone();
    let body = http_body_util::BodyExt::map_err(TimeoutBody::new(up.idle, body), move |e| {
        metrics.upstream_error(if is_timeout(&*e) { "timeout" } else { "reset" });
        e
    });
    let mut out = Response::from_parts(parts, Body::new(body));
    out.extensions_mut().insert(PassThrough);
    out
}

/// The upstream's answer being waited for. Dropped before it came — the client hung up,
/// and hyper dropped the handler — the request is counted then, as nginx logs it: status
/// 499 ("client closed request") with the time it waited, and the upstream request is
/// cancelled with it (waiting on for the backend's answer would hold its connection, and
/// load the backend, long after the app gave up). A backend that hangs so shows as 499s at
/// the apps' timeout instead of nothing. The normal way out takes `answer` first and
/// counts the request itself.
struct Pending<'a> {
    answer: Option<hyper_util::client::legacy::ResponseFuture>,
    up: &'a Upstream,
    route: &'a str,
    started: Instant,
    /// The client's upload broke off: not a request that waited for its answer.
    client_broke: Option<Arc<AtomicBool>>,
}

impl Future for Pending<'_> {
    type Output = Result<axum::http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.answer.as_mut() {
            Some(answer) => Pin::new(answer).poll(cx),
            None => Poll::Pending,
        }
    }
}

/// nginx's status for a request whose client closed the connection before the answer.
const CLIENT_CLOSED: u16 = 499;

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.answer.take().is_none() || self.client_broke.as_ref().is_some_and(|b| b.load(Ordering::Acquire)) {
            return;
        }
        self.up
            .metrics
            .upstream_request(self.route, CLIENT_CLOSED, self.started.elapsed());
    }
}

/// Whether a body's error is (or was caused by) `idle_timeout_ms` running out.
fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source()).any(|e| e.is::<TimeoutError>())
}

fn failed(up: &Upstream, route: &str, kind: &str, error: ApiError, started: Instant) -> Response {
    up.metrics.upstream_error(kind);
    let mut res = error.into_response();
    up.metrics
        .upstream_request(route, res.status().as_u16(), started.elapsed());
    res.extensions_mut().insert(PassThrough);
    res
}

/// The upstream's answer: while the request's body is still being sent, as long as the
/// upload moves — no byte for `idle` (the client stopped sending, or the upstream stopped
/// reading) ends it; from the moment it is sent (or abandoned), at most `timeout` more.
/// An upstream may answer before the upload ends. `None`: timed out.
async fn head_after_upload<F: Future>(
    timeout: Duration,
    idle: Duration,
    answer: F,
    upload: &mut Upload,
) -> Option<F::Output> {
    tokio::pin!(answer);
    loop {
        let quiet_until = upload.moved_at() + idle;
        tokio::select! {
            // In this order: a bodiless request (sent at once) never arms the idle timer.
            biased;
            out = &mut answer => return Some(out),
            // Sent, or the body was dropped (the request failed or was answered early).
            _ = &mut upload.sent => break,
            () = tokio::time::sleep_until(quiet_until.into()) => {
                if upload.moved_at() + idle <= Instant::now() {
                    upload.stalled.store(true, Ordering::Release);
                    return None;
                }
            }
        }
    }
    tokio::time::timeout(timeout, answer).await.ok()
}

/// A request body being forwarded, and what the wait for the answer needs to know of it.
struct Upload {
    /// Resolves once the body has been sent (or dropped).
    sent: oneshot::Receiver<()>,
    /// The upload stopped moving for `idle_timeout_ms`.
    stalled: Arc<AtomicBool>,
    /// The client's body failed (not by `idle_timeout_ms`): aborted, or malformed.
    client_broke: Arc<AtomicBool>,
    /// When the upload began.
    began: Instant,
    /// When it last moved: milliseconds after `began`.
    moved_ms: Arc<AtomicU64>,
}

impl Upload {
    /// `body`, watched.
    fn of(body: Body) -> (Body, Self) {
        let (tx, sent) = oneshot::channel();
        let upload = Self {
            sent,
            stalled: Arc::new(AtomicBool::new(false)),
            client_broke: Arc::new(AtomicBool::new(false)),
            began: Instant::now(),
            moved_ms: Arc::new(AtomicU64::new(0)),
        };
        let watched = Watched {
            inner: body,
            sent: Some(tx),
            stalled: upload.stalled.clone(),
            client_broke: upload.client_broke.clone(),
            began: upload.began,
            moved_ms: upload.moved_ms.clone(),
        };
        (Body::new(watched), upload)
    }

    /// When the upload last moved.
    fn moved_at(&self) -> Instant {
        self.began + Duration::from_millis(self.moved_ms.load(Ordering::Acquire))
    }
}

/// A body that says when it moves and when it has been sent to its end (dropping it says
/// so too).
struct Watched {
    inner: Body,
    sent: Option<oneshot::Sender<()>>,
    stalled: Arc<AtomicBool>,
    client_broke: Arc<AtomicBool>,
    began: Instant,
    moved_ms: Arc<AtomicU64>,
}

impl HttpBody for Watched {
    type Data = <Body as HttpBody>::Data;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        let moved = self.began.elapsed().as_millis() as u64;
        self.moved_ms.store(moved, Ordering::Release);
        if let Some(Err(e)) = &frame {
            if std::error::Error::source(e).is_some_and(is_timeout) {
                self.stalled.store(true, Ordering::Release);
            } else {
                self.client_broke.store(true, Ordering::Release);
            }
        }
        if frame.is_none() || self.inner.is_end_stream() {
            self.sent.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Copies both ways until either side closes or nothing moves either way for `idle`. The
/// two directions run side by side: a side that does not read (its buffers full) holds up
/// only what is sent to it, never what it sends.
async fn tunnel<A, B>(a: A, b: B, idle: Duration)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let began = tokio::time::Instant::now();
    // When anything last moved, either way: milliseconds after `began`.
    let moved = AtomicU64::new(0);
    let quiet = async {
        loop {
            let last = began + Duration::from_millis(moved.load(Ordering::Acquire));
            tokio::time::sleep_until(last + idle).await;
            if began + Duration::from_millis(moved.load(Ordering::Acquire)) + idle <= tokio::time::Instant::now() {
                return;
            }
        }
    };
    tokio::select! {
        () = one_way(&mut a_read, &mut b_write, began, &moved) => {}
        () = one_way(&mut b_read, &mut a_write, began, &moved) => {}
        () = quiet => {}
    }
    let _ = a_write.shutdown().await;
    let _ = b_write.shutdown().await;
}

/// Copies `from` to `to` until `from` ends or either fails, noting each move in `moved`.
async fn one_way<R, W>(from: &mut R, to: &mut W, began: tokio::time::Instant, moved: &AtomicU64)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    let note = || moved.store(began.elapsed().as_millis() as u64, Ordering::Release);
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        note();
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        note();
    }
}

/// Removes the console's session cookie (`tg_session`) from `Cookie`: cookies ignore
/// ports, so a browser may send it to the API listener too. Every other cookie goes on
/// as its bytes are (a UTF-8 value such as `city=München` included), and a request
/// without that cookie keeps its `Cookie` lines untouched.
fn strip_session_cookie(headers: &mut HeaderMap) {
    const SESSION: &[u8] = b"tg_session=";
    let holds_session = headers
        .get_all(header::COOKIE)
        .iter()
        .any(|v| v.as_bytes().windows(SESSION.len()).any(|w| w == SESSION));
    if !holds_session {
        return;
    }
    let mut kept: Vec<u8> = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        for pair in value.as_bytes().split(|b| *b == b';') {
            let pair = pair.trim_ascii();
            if pair.is_empty() || pair.starts_with(SESSION) {
                continue;
            }
            if !kept.is_empty() {
                kept.extend_from_slice(b"; ");
            }
            kept.extend_from_slice(pair);
        }
    }
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_bytes(&kept)
    {
        headers.insert(header::COOKIE, v);
    }
}

/// A websocket upgrade: `Upgrade: websocket` and `Connection` naming `upgrade`.
fn is_websocket(headers: &HeaderMap) -> bool {
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    upgrade && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
}

/// Removes the hop-by-hop headers and every header `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<String> = connection_tokens(headers).collect();
        for name in named {
            if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                headers.remove(name);
            }
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// `X-Forwarded-For` (appended), `X-Forwarded-Proto` and `X-Forwarded-Host` (kept when a
/// proxy in front already set them), `Via`.
fn forwarded_headers(headers: &mut HeaderMap, peer: Option<std::net::IpAddr>, host: Option<HeaderValue>) {
    if let Some(ip) = peer
        && let Ok(ip) = HeaderValue::try_from(ip.to_string())
    {
        append_to_list(headers, X_FORWARDED_FOR, ip);
    }
    headers
        .entry(X_FORWARDED_PROTO)
        .or_insert(HeaderValue::from_static("http"));
    if let Some(host) = host
        && let header::Entry::Vacant(entry) = headers.entry(X_FORWARDED_HOST)
    {
        entry.insert(host);
    }
    add_via(headers);
}

fn add_via(headers: &mut HeaderMap) {
    append_to_list(headers, header::VIA, HeaderValue::from_static(VIA));
}

/// Appends `item` to the list header `name`. Several lines of it are one comma-separated
/// list (RFC 9110 §5.3): they are joined in order into one line, none dropped. A line that
/// is not visible ASCII is kept as it is, with `item` on a line of its own. With no line
/// yet, `item` is the header as it is (nothing to join, nothing copied).
fn append_to_list(headers: &mut HeaderMap, name: HeaderName, item: HeaderValue) {
    if !headers.contains_key(&name) {
        headers.insert(name, item);
        return;
    }
    let lines: Option<Vec<&str>> = headers.get_all(&name).iter().map(|v| v.to_str().ok()).collect();
    let (Some(lines), Ok(text)) = (lines, item.to_str()) else {
        headers.append(name, item);
        return;
    };
    let joined = lines
        .into_iter()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .chain(std::iter::once(text))
        .collect::<Vec<_>>()
        .join(", ");
    if let Ok(v) = HeaderValue::from_str(&joined) {
        headers.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that does not read (its buffers full of the upstream's pushes) still gets
    /// what it sends through; a tunnel where nothing moves either way for `idle` ends.
    #[tokio::test]
    async fn one_stalled_direction_holds_up_only_itself() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, client_side) = tokio::io::duplex(1024);
        let (upstream_side, upstream) = tokio::io::duplex(1024);
        let tunnelled = tokio::spawn(tunnel(client_side, upstream_side, Duration::from_millis(500)));
        // The upstream pushes far more than the client's buffers hold; the client reads none.
        let (mut up_read, mut up_write) = tokio::io::split(upstream);
        let pushing = tokio::spawn(async move {
            let chunk = vec![7u8; 4096];
            while up_write.write_all(&chunk).await.is_ok() {}
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(1), up_read.read_exact(&mut got))
            .await
            .expect("the client's message was held up by the other direction")
            .unwrap();
        assert_eq!(&got, b"ping");
        pushing.abort();
        // Then nothing moves: the tunnel ends after `idle`.
        tokio::time::timeout(Duration::from_secs(3), tunnelled)
            .await
            .expect("a quiet tunnel ended")
            .unwrap();
        drop((client, up_read));
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_go() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "close, x-secret"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("x-secret", "1"),
            ("x-kept", "2"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[tokio::test]
    async fn a_request_goes_to_the_upstream_origin_under_its_path_prefix() {
        let to = |url: &str, path: &str| {
            let config = UpstreamConfig {
                url: url.into(),
                ..UpstreamConfig::default()
            };
            let metrics = Arc::new(Metrics::new(Duration::from_secs(7), &[]));
            let up = Upstream::new(&config, 1, metrics).unwrap();
            (up.target(path).map(|u| u.to_string()), up.host.clone())
        };
        let (uri, host) = to("http://127.0.0.1:9", "/api/v1/x?a=1&b=%20");
        assert_eq!(uri.as_deref(), Some("http://127.0.0.1:9/api/v1/x?a=1&b=%20"));
        assert_eq!(host, Some(HeaderValue::from_static("127.0.0.1:9")));
        let (uri, _) = to("http://backend.internal:8080/legacy/", "/api/v1/x?a=1");
        assert_eq!(uri.as_deref(), Some("http://backend.internal:8080/legacy/api/v1/x?a=1"));
        let (uri, _) = to("http://backend.internal:8080/legacy", "/");
        assert_eq!(uri.as_deref(), Some("http://backend.internal:8080/legacy/"));
    }

    #[test]
    fn the_console_cookie_stays_with_tripgate() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; tg_session=secret; b=2"));
        strip_session_cookie(&mut h);
        assert_eq!(h[header::COOKIE], "a=1; b=2");
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("tg_session=secret"));
        strip_session_cookie(&mut h);
        assert!(h.get(header::COOKIE).is_none());
    }

    #[test]
    fn forwarded_headers_append_and_keep() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        forwarded_headers(
            &mut h,
            Some([127, 0, 0, 1].into()),
            Some(HeaderValue::from_static("app.example")),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert_eq!(h["via"], "1.1 tripgate");
    }

    /// Several lines of a list header are one list: every hop is kept, in order.
    #[test]
    fn every_line_of_a_list_header_is_kept() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2, 3.3.3.3"),
            ("via", "1.0 a"),
            ("via", "1.0 b"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        forwarded_headers(&mut h, Some([127, 0, 0, 1].into()), None);
        let all = |k: &str| h.get_all(k).iter().map(|v| v.to_str().unwrap()).collect::<Vec<_>>();
        assert_eq!(all("x-forwarded-for"), ["1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1"]);
        assert_eq!(all("via"), ["1.0 a, 1.0 b, 1.1 tripgate"]);

        // A line that is not visible ASCII is kept as it is; ours goes on a line of its own.
        let mut h = HeaderMap::new();
        h.insert(header::VIA, HeaderValue::from_bytes(b"1.0 caf\xe9").unwrap());
        add_via(&mut h);
        let lines: Vec<&[u8]> = h.get_all(header::VIA).iter().map(HeaderValue::as_bytes).collect();
        assert_eq!(lines, [&b"1.0 caf\xe9"[..], b"1.1 tripgate"]);
    }
}
