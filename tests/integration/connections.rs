//! Connection hygiene and hostile input: slow-loris, the connection cap, HTTP/1.1 and
//! HTTP/2, 10,000 concurrent keep-alive connections, arbitrary request bodies.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tripgate::auth::Role;

use crate::support::{Backend, Gateway, Options, Process, TempDir, TestDb, World, free_port};

fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

/// Sends one keep-alive request and reads one whole response; returns the status line.
async fn request(stream: &mut TcpStream, path: &str) -> String {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: tripgate\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return text.lines().next().unwrap().to_owned();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_loris_is_cut_and_the_cap_refuses_cleanly() {
    let db = TestDb::new(Backend::Sqlite).await;
    let dir = TempDir::new();
    let mut config = crate::support::config(&db.url, dir.path(), &Options::default());
    config.server.header_read_timeout_ms = 300;
    config.server.max_connections = 4;
    let gw = Gateway::start_with(config, dir).await;
    let api = addr(&gw.api);

    // Slow-loris: half a request, then silence — or no request at all, or half an HTTP/2
    // preface (each holds one of the few connection slots until then). The server hangs up.
    let openings: [&[u8]; 3] = [
        b"POST /api/driver/trip/request-action HTTP/1.1\r\nhost: x\r\n",
        b"",
        b"PRI * HTTP/2.0\r\n",
    ];
    for opening in openings {
        let mut slow = TcpStream::connect(&api).await.unwrap();
        slow.write_all(opening).await.unwrap();
        let started = Instant::now();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "a client that sent {opening:?} still connected after 5 s");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "cut after {:?}",
            started.elapsed()
        );
    }

    // On tripgate's own routes the body too: headers, then part of the body and silence, is
    // 408 once `header_read_timeout_ms` is up (on the API and the admin listener), whatever
    // length it declared.
    let w = World::new(&gw.store).await;
    let driver = gw.token(&w.driver().await, Role::Driver);
    let admin = gw.token("ops", Role::Admin);
    let stalled = [
        (
            api.clone(),
            "POST /api/driver/trip/request-action",
            driver.clone(),
            200u64,
            "408",
        ),
        (addr(&gw.admin), "PUT /admin/flags/trip_accept_v2", admin, 200, "408"),
        (
            api.clone(),
            "POST /api/driver/trip/request-action",
            driver,
            99_999_999_999,
            "408",
        ),
    ];
    for (to, line, token, declared, status) in stalled {
        let mut slow = TcpStream::connect(&to).await.unwrap();
        let head = format!(
            "{line} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
             content-type: application/json\r\ncontent-length: {declared}\r\n\r\n{{\"trip_request_id\":"
        );
        slow.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(read.is_ok(), "{line} with a stalled body still unanswered after 5 s");
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")) && answer.contains("default_400"),
            "{line}: {answer}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "answered after {:?}",
            started.elapsed()
        );
    }

    // The cap: 4 idle keep-alive connections are served; a 5th gets a clean 503.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(&api).await.unwrap();
        assert_eq!(request(&mut c, "/api/unknown").await, "HTTP/1.1 404 Not Found");
        held.push(c);
    }
    let mut extra = TcpStream::connect(&api).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), extra.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("service_unavailable_503"));
    // The held connections still work (keep-alive); closing one frees a slot.
    assert_eq!(request(&mut held[0], "/api/unknown").await, "HTTP/1.1 404 Not Found");
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = TcpStream::connect(&api).await.unwrap();
    assert_eq!(request(&mut again, "/api/unknown").await, "HTTP/1.1 404 Not Found");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http1_keep_alive_and_http2_are_both_served() {
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(&db, Options::default()).await;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let res = h2.get(format!("{}/healthz", gw.admin)).send().await.unwrap();
    assert_eq!((res.status().as_u16(), res.version()), (200, reqwest::Version::HTTP_2));
    let w = World::new(&gw.store).await;
    let d = w.driver().await;
    let t = w.trip(&[]).await;
    let res = h2
        .post(format!("{}/api/driver/trip/request-action", gw.api))
        .bearer_auth(gw.token(&d, Role::Driver))
        .json(&serde_json::json!({"trip_request_id": t, "action": "accepted"}))
        .send()
        .await
        .unwrap();
    assert_eq!((res.status().as_u16(), res.version()), (200, reqwest::Version::HTTP_2));
    // HTTP/1.1: several requests on one connection.
    let mut c = TcpStream::connect(addr(&gw.admin)).await.unwrap();
    for _ in 0..3 {
        assert_eq!(request(&mut c, "/healthz").await, "HTTP/1.1 200 OK");
    }
    gw.shutdown().await;
}

/// An HTTP/2 client that makes a request, then idles and never answers a PING (the
/// GOAWAY's, which hyper waits for before it closes): its connection is closed all the
/// same, `header_read_timeout_ms` after the GOAWAY — else such clients would hold
/// `max_connections` slots for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_http2_client_that_ignores_pings_is_closed() {
    let db = TestDb::new(Backend::Sqlite).await;
    let dir = TempDir::new();
    let mut config = crate::support::config(&db.url, dir.path(), &Options::default());
    config.server.idle_timeout_ms = 300;
    config.server.header_read_timeout_ms = 500;
    let gw = Gateway::start_with(config, dir).await;
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    };
    // GET /healthz, HPACK without Huffman: :method GET, :scheme http (static entries), then
    // :path and :authority as literals with indexed names.
    let mut headers = vec![0x82, 0x86, 0x04, 8];
    headers.extend(b"/healthz");
    headers.extend([0x01, 1, b'x']);
    let mut c = TcpStream::connect(addr(&gw.admin)).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(4, 0, 0, &[])); // SETTINGS
    hello.extend(frame(1, 0x5, 1, &headers)); // HEADERS, END_STREAM | END_HEADERS
    c.write_all(&hello).await.unwrap();

    let (mut answered, mut goaway, mut pings) = (false, None, 0);
    let started = Instant::now();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = c.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            while buf.len() >= 9 {
                let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                if buf.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (buf[3], buf[4]);
                match kind {
                    1 => answered = true,
                    // The server's SETTINGS: acknowledged (a client that follows the
                    // protocol in everything but PINGs).
                    4 if flags & 1 == 0 => c.write_all(&frame(4, 1, 0, &[])).await.unwrap(),
                    6 if flags & 1 == 0 => pings += 1,
                    7 => goaway = Some(started.elapsed()),
                    _ => {}
                }
                buf.drain(..9 + len);
            }
        }
    })
    .await;
    assert!(answered, "the request was answered");
    assert!(goaway.is_some(), "told to go away once idle");
    assert!(pings >= 1, "the server sent a PING it waited for");
    assert!(closed.is_ok(), "still connected after 5 s (GOAWAY at {goaway:?})");
    gw.shutdown().await;
}

/// 10,000 concurrent keep-alive connections to a `tripgate serve` process, each answered,
/// all still usable afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_keep_alive_connections() {
    // Both processes need ~10k descriptors; raise the soft limit to the hard one (the
    // child inherits it).
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    assert!(soft >= 10_500, "file descriptor limit {soft} < 10,500");
    let db = TestDb::new(Backend::Sqlite).await;
    let dir = TempDir::new();
    let mut config = crate::support::config(&db.url, dir.path(), &Options::default());
    let admin_port = free_port();
    config.server.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config.server.admin_listen = format!("127.0.0.1:{admin_port}").parse().unwrap();
    // All 10,000 are opened before the first request goes out, which takes longer than a
    // client is given to send its first request on a busy machine.
    config.server.header_read_timeout_ms = 120_000;
    let _serve = Process::spawn("serve", &config, dir.path());
    let target = format!("127.0.0.1:{admin_port}");
    crate::support::eventually(Duration::from_secs(20), "serve up", || {
        let target = target.clone();
        async move { TcpStream::connect(target).await.ok().map(|_| ()) }
    })
    .await;
    let started = Instant::now();
    let mut conns = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        conns.push(TcpStream::connect(&target).await.unwrap());
    }
    // Every connection gets an answer while all are open…
    let results = futures_util::future::join_all(conns.iter_mut().map(|c| request(c, "/healthz"))).await;
    assert!(results.iter().all(|s| s == "HTTP/1.1 200 OK"));
    // …and is kept alive for the next request.
    let again = futures_util::future::join_all(conns.iter_mut().step_by(100).map(|c| request(c, "/healthz"))).await;
    assert!(again.iter().all(|s| s == "HTTP/1.1 200 OK"));
    assert!(started.elapsed() < Duration::from_secs(120));
}

/// Request bodies that must be refused without a write: arbitrary bytes and JSON, and —
/// so that a write is possible at all — bodies naming the real `trip` with an action that
/// is almost right, a right action with the trip's id almost right, and well-formed
/// requests for trips that do not exist (past the parser, to the cohorts and the database).
fn arbitrary_body(trip: String) -> impl Strategy<Value = Vec<u8>> {
    let near_actions = prop_oneof![
        Just(json!("Accepted")),
        Just(json!("accepted ")),
        Just(json!("accept")),
        Just(json!("rejected\u{0}")),
        Just(json!("")),
        Just(json!(1)),
        Just(json!(["accepted"])),
        Just(json!({"action": "accepted"})),
        ".{0,12}".prop_map(|s| json!(s)),
    ];
    let real = trip.clone();
    let near_ids = (0..trip.len(), any::<char>(), 0..4usize).prop_map(move |(at, c, how)| {
        let mut id: Vec<char> = real.chars().collect();
        match how {
            // A character that is no hex digit, dash or brace in its place.
            0 => {
                id[at] = if c.is_ascii_hexdigit() || c == '-' || c == '{' || c == '}' {
                    'g'
                } else {
                    c
                }
            }
            1 => {
                id.remove(at);
            }
            2 => id.insert(at, 'a'),
            _ => id.push('0'),
        }
        json!(id.into_iter().collect::<String>())
    });
    let action = prop_oneof![Just("accepted"), Just("rejected")];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600),
        ".{0,300}".prop_map(String::into_bytes),
        (any::<Option<String>>(), any::<Option<String>>(), any::<bool>()).prop_map(|(id, action, extra)| {
            let mut v = json!({"trip_request_id": id, "action": action});
            if extra {
                v["more"] = json!([1, {"x": null}]);
            }
            v.to_string().into_bytes()
        }),
        near_actions.prop_map(move |a| json!({"trip_request_id": trip, "action": a}).to_string().into_bytes()),
        (near_ids, action.clone())
            .prop_map(|(id, a)| json!({"trip_request_id": id, "action": a}).to_string().into_bytes()),
        (any::<u128>(), action).prop_map(|(n, a)| {
            json!({"trip_request_id": uuid::Uuid::from_u128(n).to_string(), "action": a})
                .to_string()
                .into_bytes()
        }),
    ]
}

/// Arbitrary bytes as a request body never produce a 5xx or a write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn arbitrary_bodies_never_5xx_or_write() {
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: 50.0,
            rate_limit_per_driver: 100_000,
            ..Options::default()
        },
    )
    .await;
    let w = World::new(&gw.store).await;
    let drivers = [w.driver().await, w.driver().await];
    let trip = w.trip(&[]).await;
    let tokens: Vec<String> = drivers.iter().map(|d| gw.token(d, Role::Driver)).collect();
    // Draw the bodies from the strategy (deterministic seed), then send each for real.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = arbitrary_body(trip.clone());
    let bodies: Vec<Vec<u8>> = (0..300)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect();
    let mut statuses = std::collections::BTreeSet::new();
    for (i, body) in bodies.into_iter().enumerate() {
        let token = &tokens[i % 2];
        let (status, _, _) = gw
            .post_raw(
                "/api/driver/trip/request-action",
                Some(token),
                "application/json",
                body.clone(),
            )
            .await;
        assert!(status < 500, "{status} for {:?}", String::from_utf8_lossy(&body));
        statuses.insert(status);
    }
    // Some got past the parser: the trips that do not exist.
    assert!(statuses.contains(&404) && statuses.contains(&400), "{statuses:?}");
    let snapshot = gw.store.trip_snapshot(&trip).await.unwrap().unwrap();
    assert_eq!((snapshot.driver_id, snapshot.status.as_str()), (None, "pending"));
    let full = gw.store.trip_with_relations(&trip).await.unwrap().unwrap();
    assert_eq!(full["rejected_drivers"], serde_json::json!([]));
    assert!(gw.store.list_jobs(None).await.unwrap().is_empty());
    gw.shutdown().await;
}
