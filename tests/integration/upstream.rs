//! Pass-through to the existing backend, against a real HTTP/websocket server the test
//! starts: requests arrive intact, hop-by-hop headers go both ways, forwarding headers are
//! added, 100 MB bodies stream with bounded memory, failures answer 502/504 in the app's
//! envelope, upstream errors pass through, websockets are tunnelled, 1,000 concurrent
//! requests are all answered; tripgate's own routes stay its own.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message as WsMessage, WebSocketUpgrade};
use axum::extract::{Query, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tripgate::auth::Role;

use crate::support::{
    Backend, Gateway, Options, Process, TempDir, TestDb, World, free_port, metric_value as metric, openssl,
    wait_process_ready,
};

/// The upstream: echo, upload, download, slow, drip, status, hop-by-hop, websocket echo.
async fn upstream() -> SocketAddr {
    async fn echo(req: Request) -> Response {
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
        let headers: serde_json::Map<String, Value> = parts
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), json!(String::from_utf8_lossy(v.as_bytes()))))
            .collect();
        axum::Json(json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
        }))
        .into_response()
    }
    async fn upload(body: Body) -> String {
        let mut stream = body.into_data_stream();
        let mut n = 0usize;
        while let Some(Ok(chunk)) = stream.next().await {
            n += chunk.len();
        }
        n.to_string()
    }
    #[derive(serde::Deserialize)]
    struct Size {
        mb: usize,
    }
    async fn download(Query(size): Query<Size>) -> Body {
        let chunk = Bytes::from(vec![7u8; 1024 * 1024]);
        Body::from_stream(futures_util::stream::iter(
            (0..size.mb).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
        ))
    }
    /// A head and the start of a body, then the connection breaks.
    async fn breaks() -> Body {
        let start = futures_util::stream::iter([Ok(Bytes::from_static(b"the start"))]);
        let fall = futures_util::stream::once(async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Err(std::io::Error::other("the backend fell over"))
        });
        Body::from_stream(start.chain(fall))
    }
    /// Ten chunks, 100 ms apart.
    async fn drip() -> Body {
        Body::from_stream(futures_util::stream::iter(0..10).then(|i| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, std::io::Error>(Bytes::from(format!("{i}")))
        }))
    }
    async fn slow() -> &'static str {
        tokio::time::sleep(Duration::from_secs(3)).await;
        "late"
    }
    async fn status(axum::extract::Path(code): axum::extract::Path<u16>) -> Response {
        (
            StatusCode::from_u16(code).unwrap(),
            [("x-upstream", "yes")],
            format!("upstream says {code}"),
        )
            .into_response()
    }
    async fn hop() -> Response {
        let mut res = "hop".into_response();
        let h = res.headers_mut();
        h.insert("connection", "x-up-secret".parse().unwrap());
        h.insert("x-up-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-up-kept", "2".parse().unwrap());
        h.insert("x-request-id", "up-7".parse().unwrap());
        res
    }
    async fn ws(upgrade: WebSocketUpgrade) -> Response {
        upgrade.on_upgrade(|mut socket| async move {
            while let Some(Ok(msg)) = socket.recv().await {
                let echo = matches!(msg, WsMessage::Text(_) | WsMessage::Binary(_));
                if matches!(msg, WsMessage::Close(_)) || (echo && socket.send(msg).await.is_err()) {
                    return;
                }
            }
        })
    }
    let app = Router::new()
        .route("/upload", post(upload))
        .route("/download", get(download))
        .route("/slow", get(slow))
        .route("/drip", get(drip))
        .route("/breaks", get(breaks))
        .route("/status/{code}", get(status))
        .route("/hop", get(hop))
        .route("/ws", get(ws))
        .fallback(any(echo));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// An HTTP/2 connection with no request in progress is closed after
/// `server.idle_timeout_ms` (it would hold one of `max_connections` for ever), but not while
/// a response body still streams on it; an HTTP/1.1 keep-alive connection waits
/// `header_read_timeout_ms` for its next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_are_closed_but_not_mid_body() {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::new(Backend::Sqlite).await;
    let up = upstream().await;
    let dir = TempDir::new();
    let mut config = crate::support::config(&db.url, dir.path(), &Options::default());
    upstream_options(&mut config, up);
    config.upstream.timeout_ms = 5_000;
    config.server.idle_timeout_ms = 300;
    config.server.header_read_timeout_ms = 300;
    let gw = Gateway::start_with(config, dir).await;
    let api = gw.api.trim_start_matches("http://").to_owned();

    let stream = tokio::net::TcpStream::connect(&api).await.unwrap();
    let (mut h2, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let get = |path: &str| {
        axum::http::Request::get(format!("http://{api}{path}"))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };
    // A body that streams for a second, three idle periods: delivered whole.
    let res = h2.send_request(get("/drip")).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.expect("not cut mid-body").to_bytes();
    assert_eq!(&body[..], b"0123456789");
    // The connection was not being closed meanwhile (no GOAWAY): it takes another request.
    let res = h2
        .send_request(get("/status/204"))
        .await
        .expect("the connection still open");
    assert_eq!(res.status(), 204);
    // Then nothing: the server closes the connection.
    let idle_since = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(closed.is_ok(), "an idle HTTP/2 connection still open after 5 s");
    assert!(
        idle_since.elapsed() >= Duration::from_millis(250),
        "{:?}",
        idle_since.elapsed()
    );

    // HTTP/1.1 keep-alive: one request, then silence.
    let mut h1 = tokio::net::TcpStream::connect(&api).await.unwrap();
    h1.write_all(b"GET /status/204 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), h1.read_to_end(&mut seen)).await;
    assert!(read.is_ok(), "an idle HTTP/1.1 connection still open after 5 s");
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 204"));
    gw.shutdown().await;
}

fn upstream_options(config: &mut tripgate::config::Config, upstream: SocketAddr) {
    config.upstream.url = format!("http://{upstream}");
    config.upstream.timeout_ms = 500;
    config.upstream.route_labels = vec!["/api/v1/".into(), "/upload".into()];
}

/// A gateway (in this process) in front of `upstream`, with `idle_timeout_ms`.
async fn in_front_of(db: &TestDb, upstream: SocketAddr, idle_timeout_ms: u64) -> Gateway {
    in_front_of_with(db, upstream, |config| config.upstream.idle_timeout_ms = idle_timeout_ms).await
}

/// A gateway (in this process) in front of `upstream`, its config changed by `adjust`.
async fn in_front_of_with(
    db: &TestDb,
    upstream: SocketAddr,
    adjust: impl FnOnce(&mut tripgate::config::Config),
) -> Gateway {
    let dir = TempDir::new();
    let mut config = crate::support::config(&db.url, dir.path(), &Options::default());
    upstream_options(&mut config, upstream);
    adjust(&mut config);
    Gateway::start_with(config, dir).await
}

/// A `tripgate serve` process in front of `upstream` (its memory is measured).
async fn gateway_process(db: &TestDb, upstream: SocketAddr) -> (Process, String, String, TempDir) {
    let dir = TempDir::new();
    let mut config = crate::support::config(&db.url, dir.path(), &Options::default());
    config.server.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config.server.admin_listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    upstream_options(&mut config, upstream);
    let process = Process::spawn("serve", &config, dir.path());
    wait_process_ready(config.server.admin_listen).await;
    (
        process,
        format!("http://{}", config.server.listen),
        format!("http://{}", config.server.admin_listen),
        dir,
    )
}

/// Peak resident memory of `pid` (kB).
fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_pass_through_intact_and_bodies_stream() {
    let db = TestDb::new(Backend::Sqlite).await;
    let up = upstream().await;
    let (process, api, admin, _dir) = gateway_process(&db, up).await;
    let http = reqwest::Client::new();

    // Method, path, query, body and headers arrive; hop-by-hop ones (and the one
    // `Connection` names) do not; forwarding headers are added; the request id goes along.
    let res = http
        .patch(format!("{api}/api/v1/profile/7?x=1&y=%20two"))
        .header("connection", "x-hop-secret")
        .header("x-hop-secret", "s")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-host", "evil.example")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-port", "8443")
        .header("x-forwarded-prefix", "/evil")
        .header("x-real-ip", "1.2.3.4")
        .header("forwarded", "for=1.2.3.4;host=evil.example;proto=https")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("cookie", "app=1; tg_session=console-secret")
        .header("x-request-id", "req-42")
        .header("authorization", "Bearer backend-token")
        .header("content-type", "application/json")
        .body(r#"{"name":"Ada"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["via"], "1.1 tripgate");
    assert_eq!(res.headers()["x-request-id"], "req-42", "echoed");
    let seen: Value = res.json().await.unwrap();
    assert_eq!(seen["method"], "PATCH");
    assert_eq!(seen["path"], "/api/v1/profile/7");
    assert_eq!(seen["query"], "x=1&y=%20two");
    assert_eq!(seen["body"], r#"{"name":"Ada"}"#);
    let h = &seen["headers"];
    assert_eq!(h["cookie"], "app=1", "the console's session stays with tripgate");
    // Cookie values in UTF-8 (browsers send them as they are) go on as they are, with the
    // console's session taken out or not there at all.
    for (sent, arrives) in [
        ("laravel_session=abc; city=München", "laravel_session=abc; city=München"),
        ("city=München; tg_session=console-secret; a=1", "city=München; a=1"),
    ] {
        let res = http
            .get(format!("{api}/api/v1/profile/cookies"))
            .header("cookie", axum::http::HeaderValue::from_bytes(sent.as_bytes()).unwrap())
            .send()
            .await
            .unwrap();
        let seen: Value = res.json().await.unwrap();
        assert_eq!(seen["headers"]["cookie"], arrives, "{sent}");
    }
    for gone in [
        "x-hop-secret",
        "keep-alive",
        "te",
        "connection",
        "proxy-authorization",
        // A client's say on how it reached us, not trusted (upstream.trust_forwarded).
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-real-ip",
        "forwarded",
    ] {
        assert!(h[gone].is_null(), "{gone} forwarded: {h}");
    }
    assert_eq!(h["authorization"], "Bearer backend-token");
    assert_eq!(h["x-request-id"], "req-42");
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert!(
        h["x-forwarded-host"].as_str().unwrap().starts_with("127.0.0.1:"),
        "a client's X-Forwarded-Host is not trusted: {h}"
    );
    assert_eq!(h["via"], "1.1 tripgate");

    // Repeated list headers are one list: no hop is dropped.
    let res = http
        .get(format!("{api}/echo"))
        .header("x-forwarded-for", "1.1.1.1")
        .header("x-forwarded-for", "2.2.2.2")
        .header("via", "1.0 a")
        .header("via", "1.0 b")
        .send()
        .await
        .unwrap();
    // No request id sent: the gateway's own goes to the upstream, and back in the answer.
    let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    let h = &res.json::<Value>().await.unwrap()["headers"];
    assert_eq!(h["x-request-id"], id.as_str());
    assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 127.0.0.1");
    assert_eq!(h["via"], "1.0 a, 1.0 b, 1.1 tripgate");
    // Over HTTP/2 the host comes as `:authority`; it is the forwarded host all the same.
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let res = h2.get(format!("{api}/echo")).send().await.unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    let h = &res.json::<Value>().await.unwrap()["headers"];
    assert_eq!(h["x-forwarded-host"], api.trim_start_matches("http://"), "{h}");
    // Hop-by-hop headers of the answer go too.
    let res = http.get(format!("{api}/hop")).send().await.unwrap();
    assert!(res.headers().get("x-up-secret").is_none() && res.headers().get("keep-alive").is_none());
    assert_eq!(res.headers()["x-up-kept"], "2");
    assert_eq!(
        res.headers()["x-request-id"],
        "up-7",
        "the upstream's own request id is its answer's"
    );

    // The upstream's own errors pass through with their bodies.
    for code in [500u16, 404] {
        let res = http.get(format!("{api}/status/{code}")).send().await.unwrap();
        assert_eq!(res.status().as_u16(), code);
        assert_eq!(res.headers()["x-upstream"], "yes");
        assert_eq!(res.text().await.unwrap(), format!("upstream says {code}"));
    }

    // 100 MB up and 100 MB down stream through: the gateway's peak memory grows far less.
    let before = peak_rss_kb(process.child.id());
    let res = http
        .post(format!("{api}/upload"))
        .body(vec![1u8; 100 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), (100 * 1024 * 1024).to_string());
    let mut res = http.get(format!("{api}/download?mb=100")).send().await.unwrap();
    let mut n = 0;
    while let Some(chunk) = res.chunk().await.unwrap() {
        n += chunk.len();
    }
    assert_eq!(n, 100 * 1024 * 1024);
    let grown_mb = (peak_rss_kb(process.child.id()) - before) / 1024;
    assert!(
        grown_mb < 30,
        "the gateway's peak memory grew {grown_mb} MB for 100 MB bodies"
    );

    // A slow upstream: 504 within timeout_ms (500) + 500 ms, in the app's envelope.
    let started = Instant::now();
    let res = http.get(format!("{api}/slow")).send().await.unwrap();
    assert_eq!(res.status(), 504);
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["response_code"], "gateway_timeout_504");
    // An answer that breaks off after its head: the client sees it cut, and it is counted
    // as a reset although its head was a 200.
    let res = http.get(format!("{api}/breaks")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.bytes().await.is_err(), "the body was cut");

    // Counted in tripgate_upstream_*, not in tripgate_http_*.
    let metrics = crate::support::metrics_at(&admin).await;
    assert_eq!(
        metric(
            &metrics,
            "tripgate_upstream_requests_total{route=\"/api/v1/\",status_class=\"2xx\"}"
        ),
        3.0,
        "the profile and the two cookie requests"
    );
    assert_eq!(
        metric(
            &metrics,
            "tripgate_upstream_requests_total{route=\"/upload\",status_class=\"2xx\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "tripgate_upstream_requests_total{route=\"other\",status_class=\"5xx\"}"
        ),
        2.0,
        "the upstream's 500 and the 504"
    );
    assert_eq!(
        metric(&metrics, "tripgate_upstream_errors_total{kind=\"timeout\"}"),
        1.0
    );
    assert_eq!(
        metric(&metrics, "tripgate_upstream_errors_total{kind=\"reset\"}"),
        1.0,
        "the answer that broke off"
    );
    assert!(
        !metrics.contains("route=\"unmatched\""),
        "pass-through in tripgate_http_*"
    );
    assert!(!metrics.contains("/api/v1/profile"), "a raw path as a label");

    // What is not a request for a path is not forwarded (nor counted as the upstream's
    // failure): CONNECT is 405, `OPTIONS *` is 400.
    for (request, status) in [
        (
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            "405",
        ),
        ("OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", "400"),
    ] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(api.trim_start_matches("http://"))
            .await
            .unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 512];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before the head: {}", String::from_utf8_lossy(&head));
            head.extend_from_slice(&chunk[..n]);
        }
        let head = String::from_utf8_lossy(&head).to_lowercase();
        assert_eq!(&head[9..12], status, "{request}");
        if status == "405" {
            assert!(head.contains("\r\nallow: get, "), "a 405 names what is allowed: {head}");
        }
    }

    let metrics = crate::support::metrics_at(&admin).await;
    assert_eq!(
        metric(&metrics, "tripgate_upstream_errors_total{kind=\"connect\"}"),
        0.0,
        "a refused target counted as the upstream's failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websockets_tunnel_and_a_thousand_requests_are_answered() {
    let db = TestDb::new(Backend::Sqlite).await;
    // upstream.timeout_ms as shipped (30 s), not the 500 ms the timeout tests use: a
    // thousand requests at once on a loaded two-core machine can wait longer than 500 ms
    // for their answers, and a 504 then is the gateway doing its job, not this test's failure.
    let gw = in_front_of_with(&db, upstream().await, |config| {
        config.upstream.timeout_ms = tripgate::config::Config::default().upstream.timeout_ms;
    })
    .await;

    let ws_url = format!("{}/ws", gw.api.replacen("http://", "ws://", 1));
    let (mut socket, res) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    assert_eq!(res.status(), 101);
    for i in 0..5 {
        socket
            .send(tokio_tungstenite::tungstenite::Message::text(format!("ping {i}")))
            .await
            .unwrap();
        let echoed = socket.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), format!("ping {i}"));
    }
    socket
        .send(tokio_tungstenite::tungstenite::Message::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap().into_data().as_ref(), [1u8, 2, 3]);
    socket.close(None).await.unwrap();

    let http = reqwest::Client::builder().pool_max_idle_per_host(1000).build().unwrap();
    let answers = futures_util::future::join_all((0..1000).map(|i| {
        let (http, api) = (http.clone(), gw.api.clone());
        async move {
            let res = http.get(format!("{api}/api/v1/list/{i}")).send().await.unwrap();
            (
                res.status().as_u16(),
                res.json::<Value>().await.unwrap()["path"].clone(),
            )
        }
    }))
    .await;
    for (i, (status, path)) in answers.into_iter().enumerate() {
        assert_eq!((status, path), (200, json!(format!("/api/v1/list/{i}"))));
    }
    gw.shutdown().await;
}

/// `timeout_ms` bounds the wait for the answer once the request is sent, not the upload: a
/// slow upload that keeps moving goes through however long it takes; one that stops for
/// `idle_timeout_ms` is cut with a 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_upload_goes_through_and_a_stalled_one_is_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = in_front_of(&db, upstream().await, 1_000).await;
    let addr = gw.api.trim_start_matches("http://").to_owned();
    // POSTs `total` bytes to /upload, `sent` of them in 64 KiB chunks 150 ms apart; the
    // whole answer.
    let upload = |total: usize, sent: usize| {
        let addr = addr.clone();
        async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "POST /upload HTTP/1.1\r\nhost: tripgate\r\ncontent-length: {total}\r\nconnection: close\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            for _ in 0..sent / 65_536 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                if stream.write_all(&[1u8; 65_536]).await.is_err() {
                    break; // answered and closed early: the answer says why
                }
            }
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer).await;
            answer
        }
    };

    // 512 KiB over ~1.2 s, more than timeout_ms (500 ms), never idle for 1 s.
    let started = Instant::now();
    let answer = upload(8 * 65_536, 8 * 65_536).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(started.elapsed() > Duration::from_millis(1_000), "the upload was slow");
    assert!(answer.ends_with(&(8 * 65_536).to_string()), "{answer}");

    // 64 KiB of 512, then nothing: cut after idle_timeout_ms, 504 in the app's envelope.
    let answer = upload(8 * 65_536, 65_536).await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("gateway_timeout_504"), "{answer}");
    gw.shutdown().await;

    // An upstream that takes the connection but never reads: once the socket buffers are
    // full the upload stops moving, and is cut after idle_timeout_ms too (not left hanging).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    let gw = in_front_of(&db, silent_addr, 1_000).await;
    let started = Instant::now();
    let res = reqwest::Client::new()
        .post(format!("{}/upload", gw.api))
        .body(vec![1u8; 64 * 1024 * 1024])
        .timeout(Duration::from_secs(15))
        .send()
        .await;
    // The gateway may answer before it has read the whole body and close the connection
    // (then the client sees its send fail), or read it all and answer.
    if let Ok(res) = res {
        assert_eq!(res.status(), 504);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["response_code"], "gateway_timeout_504");
    }
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    gw.shutdown().await;
}

/// Tripgate's own routes stay its own in front of the backend; its demo routes are off, so
/// the backend's versions answer; an unreachable upstream is 502 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn own_routes_stay_demo_routes_pass_and_a_dead_upstream_is_502() {
    let db = TestDb::new(Backend::Sqlite).await;
    let up = upstream().await;
    let dir = TempDir::new();
    let mut config = crate::support::config(&db.url, dir.path(), &Options::default());
    upstream_options(&mut config, up);
    let gw = Gateway::start_with(config.clone(), dir).await;
    let w = World::new(&gw.store).await;
    let (d, t) = (w.driver().await, w.trip(&[]).await);
    let (status, body, cohort) = gw.accept(&d, &t).await;
    assert_eq!((status, cohort.as_str()), (200, "legacy"), "{body}");
    let customer = gw.token(&w.customer, Role::Customer);
    let res = gw
        .http
        .post(format!("{}/api/customer/ride/create", gw.api))
        .bearer_auth(customer)
        .json(&json!({"any": "thing"}))
        .send()
        .await
        .unwrap();
    let seen: Value = res.json().await.unwrap();
    assert_eq!(
        seen["path"], "/api/customer/ride/create",
        "the backend's route answered"
    );
    let (status, _) = gw.admin_get("/admin/checks").await;
    assert_eq!(status, 404, "demo admin routes are off in front of a backend");
    // Spellings of a driver route that the backend would take for it (escaped, a trailing
    // or doubled slash) are tripgate's: forwarded, they would reach the backend's accept
    // and pass by the rollout, the rate limit and the fence.
    let token = gw.token(&d, Role::Driver);
    for path in [
        "/api/driver/ride/trip-action/",
        "/api/driver/ride/trip%2Daction",
        "//api/driver//trip/request-action///?from=app",
        "/api%2Fdriver%2Fride%2Ftrip-action",
    ] {
        let body = json!({"trip_request_id": w.trip(&[]).await, "action": "rejected"});
        let (status, body, cohort) = gw
            .post_raw(path, Some(&token), "application/json", body.to_string().into_bytes())
            .await;
        assert_eq!(
            (status, cohort.as_str(), body["response_code"].as_str()),
            (200, "legacy", Some("default_update_200")),
            "{path}: {body}"
        );
    }
    // Another path, or one that does not decode, is the backend's.
    for path in ["/api/driver/ride/trip-actions", "/api/driver/ride/trip-action%FF/"] {
        let (_, body, cohort) = gw
            .post_raw(path, Some(&token), "application/json", b"{}".to_vec())
            .await;
        assert_eq!((cohort.as_str(), body["path"].as_str()), ("", Some(path)), "{body}");
    }
    gw.shutdown().await;

    // Nothing listens on the upstream port: 502 at once.
    let dir = TempDir::new();
    let mut config = crate::support::config(&db.url, dir.path(), &Options::default());
    config.upstream.url = format!("http://127.0.0.1:{}", free_port());
    let gw = Gateway::start_with(config, dir).await;
    let started = Instant::now();
    let res = gw.http.get(format!("{}/api/v1/anything", gw.api)).send().await.unwrap();
    assert_eq!(res.status(), 502);
    assert!(started.elapsed() < Duration::from_millis(500));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["response_code"], "bad_gateway_502");
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "tripgate_upstream_errors_total{kind=\"connect\"}"),
        1.0
    );
    // The answer to HEAD has no body, over HTTP/2 too (a DATA frame on a HEAD stream is a
    // protocol error to the client).
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let res = h2.head(format!("{}/api/v1/anything", gw.api)).send().await.unwrap();
    assert_eq!(
        (res.version(), res.status()),
        (reqwest::Version::HTTP_2, StatusCode::BAD_GATEWAY)
    );
    assert!(res.bytes().await.unwrap().is_empty());
    gw.shutdown().await;
}

/// An upstream that closes every other connection after reading its request, without an
/// answer (a keep-alive connection it closed as the request arrived): a GET is sent again
/// and answered; a POST is not sent twice (502).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_safe_request_is_sent_again_when_its_connection_fails() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        let mut n = 0usize;
        while let Ok((mut conn, _)) = listener.accept().await {
            n += 1;
            let answer = n.is_multiple_of(2);
            let count = count.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => seen.extend_from_slice(&buf[..k]),
                    }
                }
                if answer {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = in_front_of(&db, addr, 60_000).await;
    let res = gw.http.get(format!("{}/api/v1/page", gw.api)).send().await.unwrap();
    assert_eq!(res.status(), 200, "a GET is sent again");
    assert_eq!(res.text().await.unwrap(), "ok");
    let res = gw
        .http
        .post(format!("{}/api/v1/order", gw.api))
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502, "a POST is not sent twice");
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);
    gw.shutdown().await;
}

/// A key pair made by openssl: (private PEM, public PEM file).
fn key_pair(dir: &std::path::Path, name: &str, ec: bool) -> (Vec<u8>, std::path::PathBuf) {
    let private = format!("{name}.pem");
    let public = format!("{name}.pub");
    if ec {
        openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                &private,
            ],
        );
    } else {
        openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                &private,
            ],
        );
    }
    openssl(dir, &["pkey", "-in", &private, "-pubout", "-out", &public]);
    (std::fs::read(dir.join(&private)).unwrap(), dir.join(public))
}

fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// The RSA key `name.pem`'s public JWK with `kid`.
fn rsa_jwk(dir: &std::path::Path, name: &str, kid: &str) -> Value {
    let modulus = openssl(dir, &["rsa", "-in", &format!("{name}.pem"), "-noout", "-modulus"]);
    let hex = modulus.trim().trim_start_matches("Modulus=");
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": b64url(&bytes), "e": "AQAB"})
}

fn backend_token(alg: jsonwebtoken::Algorithm, key: &[u8], kid: Option<&str>, claims: Value) -> String {
    let key = match alg {
        jsonwebtoken::Algorithm::ES256 => jsonwebtoken::EncodingKey::from_ec_pem(key).unwrap(),
        _ => jsonwebtoken::EncodingKey::from_rsa_pem(key).unwrap(),
    };
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

/// The real apps send the backend's RS256 / ES256 tokens (Passport-style, the role in a
/// claim of its own): accepted against a PEM public key or a JWKS (refetched on an unknown
/// `kid`); another key, another algorithm, a missing role or an unknown `kid` are 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_backends_own_tokens_are_accepted() {
    let db = TestDb::new(Backend::Sqlite).await;
    let keys = TempDir::new();
    let (rsa, rsa_pub) = key_pair(keys.path(), "rsa", false);
    let (other, _) = key_pair(keys.path(), "other", false);
    let (ec, ec_pub) = key_pair(keys.path(), "ec", true);
    let exp = tripgate::auth::now_s() + 600;

    // 1. A PEM public key (RSA), the role in `user_type`.
    let dir = TempDir::new();
    let mut config = crate::support::config(&db.url, dir.path(), &Options::default());
    config.auth.public_key_file = rsa_pub.display().to_string();
    config.auth.role_claim = "user_type".into();
    let gw = Gateway::start_with(config, dir).await;
    let w = World::new(&gw.store).await;
    let d = w.driver().await;
    let try_reject = |token: String| reject_with(&gw, &w, token);
    let claims = json!({"sub": d, "user_type": "driver", "exp": exp});
    let rs = jsonwebtoken::Algorithm::RS256;
    assert_eq!(try_reject(backend_token(rs, &rsa, None, claims.clone())).await, 200);
    let with_aud = json!({"sub": d, "user_type": "driver", "exp": exp, "aud": "passport-client-1"});
    assert_eq!(
        try_reject(backend_token(rs, &rsa, None, with_aud)).await,
        200,
        "Passport's aud is accepted when auth.audience is not set"
    );
    assert_eq!(
        try_reject(backend_token(rs, &other, None, claims.clone())).await,
        401,
        "another key"
    );
    assert_eq!(
        try_reject(backend_token(
            rs,
            &rsa,
            None,
            json!({"sub": d, "role": "driver", "exp": exp})
        ))
        .await,
        401,
        "the role is in user_type"
    );
    assert_eq!(
        try_reject(backend_token(jsonwebtoken::Algorithm::ES256, &ec, None, claims.clone())).await,
        401,
        "another algorithm than the key's"
    );
    assert_eq!(
        try_reject(gw.token(&d, Role::Driver)).await,
        200,
        "tripgate's own HS256 still works"
    );
    gw.shutdown().await;

    // 2. An EC (P-256) public key.
    let dir = TempDir::new();
    let mut config = crate::support::config(&db.url, dir.path(), &Options::default());
    config.auth.public_key_file = ec_pub.display().to_string();
    let gw = Gateway::start_with(config, dir).await;
    let claims = json!({"sub": d, "role": "driver", "exp": exp});
    let trip = w.trip(&[]).await;
    let token = backend_token(jsonwebtoken::Algorithm::ES256, &ec, None, claims.clone());
    let (status, body, _) = gw
        .post_raw(
            "/api/driver/trip/request-action",
            Some(&token),
            "application/json",
            json!({"trip_request_id": trip, "action": "rejected"})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    gw.shutdown().await;

    // 3. A JWKS: known kid, a new kid after rotation (fetched again), an unknown kid.
    let jwks = std::sync::Arc::new(std::sync::RwLock::new(
        json!({"keys": [rsa_jwk(keys.path(), "rsa", "k1")]}),
    ));
    let served = jwks.clone();
    // How long the endpoint takes to answer, ms.
    let jwks_delay = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let delay = jwks_delay.clone();
    let app = Router::new().route(
        "/jwks",
        get(move || {
            let (served, delay) = (served.clone(), delay.clone());
            async move {
                let ms = delay.load(std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                axum::Json(served.read().unwrap().clone())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let dir = TempDir::new();
    let mut config = crate::support::config(&db.url, dir.path(), &Options::default());
    config.auth.jwks_url = format!("http://{jwks_addr}/jwks");
    let gw = Gateway::start_with(config, dir).await;
    let try_reject = |token: String| reject_with(&gw, &w, token);
    assert_eq!(
        try_reject(backend_token(rs, &rsa, Some("k1"), claims.clone())).await,
        200
    );
    // Rotated in beside keys this gateway cannot use (another key type, another curve):
    // those are skipped, not the whole set.
    {
        let mut set = jwks.write().unwrap();
        let list = set["keys"].as_array_mut().unwrap();
        list.push(json!({"kty": "foo", "kid": "odd"}));
        list.push(json!({"kty": "EC", "crv": "secp256k1", "kid": "k256", "x": "AA", "y": "AA"}));
        list.push(rsa_jwk(keys.path(), "other", "k2"));
    }
    // (An unknown kid fetches the set again at most every second.)
    tokio::time::sleep(tripgate::auth::BackendKeys::REFETCH).await;
    assert_eq!(
        try_reject(backend_token(rs, &other, Some("k2"), claims.clone())).await,
        200,
        "a rotated-in key is fetched"
    );
    assert_eq!(
        try_reject(backend_token(rs, &rsa, Some("k9"), claims.clone())).await,
        401
    );
    assert_eq!(
        try_reject(backend_token(rs, &other, Some("k1"), claims.clone())).await,
        401,
        "kid k1 is not this key"
    );
    // While a made-up kid's fetch waits on a slow endpoint, a known key does not wait with it.
    jwks_delay.store(2_500, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(tripgate::auth::BackendKeys::REFETCH).await;
    let stranger = tokio::spawn(reject_with_owned(
        gw.http.clone(),
        gw.api.clone(),
        w.trip(&[]).await,
        backend_token(rs, &rsa, Some("made-up"), claims.clone()),
    ));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    assert_eq!(try_reject(backend_token(rs, &rsa, Some("k1"), claims)).await, 200);
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1_500),
        "a known key waited {:?} for another kid's fetch",
        started.elapsed()
    );
    assert_eq!(stranger.await.unwrap(), 401);
    gw.shutdown().await;

    // 4. `auth.audience` and `auth.issuer` set: a token must carry both, and match.
    let dir = TempDir::new();
    let mut config = crate::support::config(&db.url, dir.path(), &Options::default());
    config.auth.public_key_file = rsa_pub.display().to_string();
    config.auth.audience = "client-7".into();
    config.auth.issuer = "https://backend".into();
    let gw = Gateway::start_with(config, dir).await;
    let try_reject = |token: String| reject_with(&gw, &w, token);
    let full = json!({"sub": d, "role": "driver", "exp": exp, "aud": "client-7", "iss": "https://backend"});
    assert_eq!(try_reject(backend_token(rs, &rsa, None, full.clone())).await, 200);
    for (drop, set) in [("aud", None), ("iss", None), ("aud", Some("client-8"))] {
        let mut claims = full.clone();
        match set {
            None => {
                claims.as_object_mut().unwrap().remove(drop);
            }
            Some(value) => claims[drop] = json!(value),
        }
        assert_eq!(
            try_reject(backend_token(rs, &rsa, None, claims)).await,
            401,
            "{drop} missing or wrong"
        );
    }
    gw.shutdown().await;

    // 5. A key file that cannot verify the tokens is refused at start: a private key
    //    (Passport's oauth-private.key for the public one), an EC key of another curve.
    openssl(
        keys.path(),
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
            "-out",
            "p384.pem",
        ],
    );
    openssl(keys.path(), &["pkey", "-in", "p384.pem", "-pubout", "-out", "p384.pub"]);
    for (file, says) in [("rsa.pem", "a private key"), ("p384.pub", "P-256")] {
        let auth = tripgate::config::AuthConfig {
            public_key_file: keys.path().join(file).display().to_string(),
            ..Default::default()
        };
        let err = tripgate::auth::BackendKeys::from_config(&auth).unwrap_err();
        assert_eq!(err.0, "auth.public_key_file");
        assert!(err.1.contains(says), "{file}: {}", err.1);
    }
}

/// The status of a reject of `trip` sent with `token` (owned: for a spawned task).
async fn reject_with_owned(http: reqwest::Client, api: String, trip: String, token: String) -> u16 {
    http.post(format!("{api}/api/driver/trip/request-action"))
        .bearer_auth(token)
        .json(&json!({"trip_request_id": trip, "action": "rejected"}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The status of a reject of a new trip sent with `token`.
async fn reject_with(gw: &Gateway, w: &World, token: String) -> u16 {
    reject_with_owned(gw.http.clone(), gw.api.clone(), w.trip(&[]).await, token).await
}

/// A backend that hangs while the apps give up first (the driver app at 7 s, `timeout_ms`
/// 30 s): each request whose client hung up is counted when it does — 499, as nginx logs
/// it, with the time it waited — instead of vanishing with the client. And a client's own
/// upload that breaks off (a malformed chunked body) is a 400 of the client's, not a reset
/// of the upstream's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_up_client_and_a_broken_upload_are_counted_as_what_they_are() {
    let db = TestDb::new(Backend::Sqlite).await;
    let up = upstream().await;
    let gw = in_front_of_with(&db, up, |config| config.upstream.timeout_ms = 30_000).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    assert!(impatient.get(format!("{}/slow", gw.api)).send().await.is_err());
    crate::support::eventually(
        Duration::from_secs(5),
        "the hung-up request counted as a 499",
        || async {
            let metrics = gw.metrics().await;
            metrics
                .lines()
                .any(|l| l == "tripgate_upstream_requests_total{route=\"other\",status_class=\"4xx\"} 1")
                .then_some(())
        },
    )
    .await;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = gw.api.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    conn.write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&answer[..n]);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let metrics = gw.metrics().await;
    assert!(
        !metrics.contains("tripgate_upstream_errors_total{kind=\"reset\"} 1"),
        "counted as the upstream's reset"
    );
    gw.shutdown().await;
}
