//! The ops console in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
//! driven through WebDriver with fantoccini): a wrong token shows the error; log in; see the
//! percent; change it with a reason and see it in `GET /admin/flags` and in the audit table;
//! the charts draw while traffic flows; explain a driver; a state-changing call without the
//! CSRF token is refused. Screenshots go to `target/console-*.png` for review.

use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tripgate::auth::Role;

use crate::support::{Backend, Gateway, Options, TestDb, World, free_port, program_installed};

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: std::process::Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser() -> Option<(Driver, Client)> {
    if !program_installed("chromedriver", "chromium-driver") {
        return None;
    }
    let port = free_port();
    let child = std::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let driver = Driver { child, port };
    let status = format!("http://127.0.0.1:{}/status", driver.port);
    crate::support::eventually(Duration::from_secs(20), "chromedriver up", || {
        let status = status.clone();
        async move { (reqwest::get(status).await.ok()?.status() == 200).then_some(()) }
    })
    .await;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,1600"]}),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a WebDriver session");
    Some((driver, client))
}

async fn text_of(c: &Client, testid: &str) -> String {
    match c.find(Locator::Css(&format!("[data-testid='{testid}']"))).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Waits until the element `testid` shows `check`-passing text.
async fn wait_text(c: &Client, testid: &str, check: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    loop {
        let text = text_of(c, testid).await;
        if check(&text) {
            return text;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{testid} never showed what was expected (last: {text:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn click(c: &Client, testid: &str) {
    c.find(Locator::Css(&format!("[data-testid='{testid}']")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn fill(c: &Client, css: &str, text: &str) {
    let e = c.find(Locator::Css(css)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(text).await.unwrap();
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("console-{name}.png")), png);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_in_a_real_browser() {
    let Some((_driver, c)) = browser().await else {
        return;
    };
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: 10.0,
            ..Options::default()
        },
    )
    .await;
    let w = World::new(&gw.store).await;
    c.goto(&format!("{}/", gw.admin)).await.unwrap();

    // A wrong token shows the error.
    fill(&c, "input[name='token']", "not-a-token").await;
    click(&c, "login-submit").await;
    let error = wait_text(&c, "login-error", |t| !t.is_empty()).await;
    assert!(error.contains("not a valid admin token"), "{error}");
    screenshot(&c, "login-error").await;

    // Log in; the percent in force.
    fill(&c, "input[name='token']", &gw.token("alice", Role::Admin)).await;
    click(&c, "login-submit").await;
    wait_text(&c, "flag-percent-trip_accept_v2", |t| t == "10").await;

    // Change it with a reason: in force, in GET /admin/flags, in the audit table.
    fill(&c, "[data-testid='percent-input-trip_accept_v2']", "25").await;
    click(&c, "percent-apply-trip_accept_v2").await;
    fill(&c, "[data-testid='reason']", "console canary").await;
    click(&c, "confirm").await;
    wait_text(&c, "flag-percent-trip_accept_v2", |t| t == "25").await;
    let (_, flags) = gw.admin_get("/admin/flags").await;
    let f = &flags["flags"]["trip_accept_v2"];
    assert_eq!(
        (f["percent"].as_f64(), f["source"].as_str()),
        (Some(25.0), Some("override"))
    );
    assert_eq!(
        (
            f["override"]["actor"].as_str(),
            f["override"]["source"].as_str(),
            f["override"]["reason"].as_str()
        ),
        (Some("alice"), Some("console"), Some("console canary"))
    );
    let audit = wait_text(&c, "audit-table", |t| t.contains("console canary")).await;
    assert!(audit.contains("alice") && audit.contains("console"), "{audit}");

    // No percent typed is no change (not 0 %, every driver on legacy); a refused value
    // shows the API's reason. Nothing changes either way.
    fill(&c, "[data-testid='percent-input-trip_accept_v2']", "").await;
    click(&c, "percent-apply-trip_accept_v2").await;
    let error = wait_text(&c, "flags-error", |t| !t.is_empty()).await;
    assert!(error.contains("Enter the new percent"), "{error}");
    let confirm_hidden = c
        .execute("return document.getElementById('confirm-box').hidden", vec![])
        .await
        .unwrap();
    assert_eq!(confirm_hidden, json!(true), "nothing to confirm");
    fill(&c, "[data-testid='percent-input-trip_accept_v2']", "150").await;
    click(&c, "percent-apply-trip_accept_v2").await;
    fill(&c, "[data-testid='reason']", "too far").await;
    click(&c, "confirm").await;
    let error = wait_text(&c, "flags-error", |t| t.contains("150")).await;
    assert!(error.contains("150 is not in 0..=100"), "{error}");
    let (_, flags) = gw.admin_get("/admin/flags").await;
    assert_eq!(flags["flags"]["trip_accept_v2"]["percent"], 25.0, "nothing changed");

    // The charts draw while traffic flows: drivers of both cohorts at 25 %, load until both
    // cohorts' lines have points (not for a fixed time: a busy CI machine is slower).
    let mut drivers = Vec::new();
    let (mut atomic, mut legacy) = (0, 0);
    while atomic < 5 || legacy < 5 {
        let d = w.driver().await;
        if tripgate::flags::bucketing::bucket("trip_accept_v2", &d) < 2500 {
            atomic += 1;
        } else {
            legacy += 1;
        }
        drivers.push(d);
    }
    let trip = w.trip(&[]).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (http, api, stop) = (gw.http.clone(), gw.api.clone(), stop.clone());
        let tokens: Vec<String> = drivers.iter().map(|d| gw.token(d, Role::Driver)).collect();
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = http
                    .post(format!("{api}/api/driver/trip/request-action"))
                    .bearer_auth(&tokens[i % tokens.len()])
                    .json(&json!({"trip_request_id": trip, "action": "rejected"}))
                    .send()
                    .await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let started = Instant::now();
    loop {
        let drawn = c
            .execute(
                "return ['chart-latency', 'chart-errors'].map(id => \
                 [...document.querySelectorAll(`[data-testid='${id}'] path`)].filter(p => (p.getAttribute('d') || '').includes('L')).length)",
                vec![],
            )
            .await
            .unwrap();
        let counts: Vec<u64> = drawn.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        if counts.iter().all(|n| *n >= 2) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(45),
            "charts never drew both cohorts: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_text(&c, "stats-rps-legacy", |t| t.parse::<f64>().is_ok_and(|r| r > 0.0)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = load.await;
    screenshot(&c, "charts").await;
    // Live figures: once the traffic stopped, no cohort shows the rate it had before.
    for cohort in ["legacy", "atomic_async"] {
        wait_text(&c, &format!("stats-rps-{cohort}"), |t| t == "0.0").await;
    }

    // Explain a driver.
    let d = &drivers[0];
    fill(&c, "[data-testid='explain-driver']", d).await;
    click(&c, "explain-submit").await;
    let expected = tripgate::flags::bucketing::bucket("trip_accept_v2", d);
    let explained = wait_text(&c, "explain-result", |t| t.contains("bucket")).await;
    assert!(explained.contains(&format!("bucket {expected}")), "{explained}");

    // A state-changing call with the session cookie but without the CSRF token: refused.
    let refused: Value = c
        .execute_async(
            "const done = arguments[arguments.length - 1]; \
             fetch('/admin/flags/trip_accept_v2', {method: 'PUT', credentials: 'same-origin', \
               headers: {'Content-Type': 'application/json'}, body: JSON.stringify({percent: 90})}) \
             .then(r => r.json().then(b => done([r.status, b.response_code])));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(refused, json!([403, "auth_csrf_403"]));
    let (_, flags) = gw.admin_get("/admin/flags").await;
    assert_eq!(flags["flags"]["trip_accept_v2"]["percent"], 25.0, "nothing changed");
    // The page (and its assets) carry a strict CSP.
    let res = reqwest::get(format!("{}/", gw.admin)).await.unwrap();
    let csp = res.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    screenshot(&c, "final").await;
    c.close().await.unwrap();
    gw.shutdown().await;
}

/// The session cookie without a browser: its flags, `Secure` behind HTTPS, logout, a bearer
/// token needing no CSRF token, and a session that is never taken for a bearer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_cookies_and_csrf() {
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: 10.0,
            ..Options::default()
        },
    )
    .await;
    let token = gw.token("bob", Role::Admin);
    let login = |proto: Option<&'static str>, token: String| {
        let mut req = gw
            .http
            .post(format!("{}/admin/login", gw.admin))
            .json(&json!({"token": token}));
        if let Some(p) = proto {
            req = req.header("x-forwarded-proto", p);
        }
        async move { req.send().await.unwrap() }
    };
    let res = login(Some("https"), token.clone()).await;
    assert_eq!(res.status(), 200);
    let cookie = res.headers()["set-cookie"].to_str().unwrap().to_owned();
    // A blank driver id has no cohort to explain.
    let blank = gw
        .http
        .get(format!("{}/admin/explain/trip_accept_v2/%20", gw.admin))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(blank.status(), 400);
    for part in [
        "tg_session=",
        "HttpOnly",
        "SameSite=Strict",
        "Secure",
        "Max-Age=",
        "Path=/",
    ] {
        assert!(cookie.contains(part), "{part} missing: {cookie}");
    }
    let body: Value = res.json().await.unwrap();
    let csrf = body["csrf"].as_str().unwrap().to_owned();
    let res = login(None, token.clone()).await;
    assert!(
        !res.headers()["set-cookie"].to_str().unwrap().contains("Secure"),
        "plain HTTP"
    );
    let refused = login(None, gw.token("d1", Role::Driver)).await;
    assert_eq!(refused.status(), 401, "a driver token");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        (&body["response_code"], &body["data"], &body["errors"]),
        (&json!("auth_login_401"), &Value::Null, &json!([])),
        "the envelope: {body}"
    );
    // An admin token naming nobody (the audit's actor would be ""): refused, here and on
    // the API.
    let nobody = gw.token("", Role::Admin);
    assert_eq!(login(None, nobody.clone()).await.status(), 401, "an empty subject");
    let res = gw
        .http
        .put(format!("{}/admin/flags/trip_accept_v2", gw.admin))
        .bearer_auth(&nobody)
        .json(&json!({"percent": 21}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401, "an empty subject on the API");
    // A body over the limit is that, not a bad token. (A client of its own: the gateway
    // closes that connection, which the shared pool might otherwise hand out again.)
    let res = reqwest::Client::new()
        .post(format!("{}/admin/login", gw.admin))
        .json(&json!({"token": "x".repeat(3 << 20)}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);

    let session = cookie.split(';').next().unwrap().to_owned();
    let put = |csrf: Option<String>| {
        let mut req = gw
            .http
            .put(format!("{}/admin/flags/trip_accept_v2", gw.admin))
            .header("cookie", session.clone())
            .json(&json!({"percent": 5}));
        if let Some(t) = csrf {
            req = req.header("x-csrf-token", t);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(put(None).await, 403);
    assert_eq!(put(Some("forged".into())).await, 403);
    assert_eq!(put(Some(csrf.clone())).await, 200);
    let (_, audit) = gw.admin_get("/admin/audit").await;
    assert_eq!(audit["entries"][0]["source"], "console");
    assert_eq!(audit["entries"][0]["actor"], "bob");
    // The session's JWT is not a bearer token.
    let jwt = session.trim_start_matches("tg_session=");
    let res = gw
        .http
        .get(format!("{}/admin/flags", gw.admin))
        .bearer_auth(jwt)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    // Logout needs the CSRF token and clears the cookie.
    let logout = |csrf: Option<String>| {
        let mut req = gw
            .http
            .post(format!("{}/admin/logout", gw.admin))
            .header("cookie", session.clone());
        if let Some(t) = csrf {
            req = req.header("x-csrf-token", t);
        }
        async move { req.send().await.unwrap() }
    };
    assert_eq!(logout(None).await.status(), 403);
    let res = logout(Some(csrf.clone())).await;
    assert_eq!(res.status(), 204);
    assert!(res.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    // A copy of the cookie kept from before the logout is refused from then on: reads,
    // changes (with its CSRF token) and the session itself.
    let before = gw.admin_get("/admin/flags").await.1["flags"]["trip_accept_v2"]["percent"].clone();
    let replayed = |req: reqwest::RequestBuilder| {
        let req = req
            .header("cookie", session.clone())
            .header("x-csrf-token", csrf.clone());
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(replayed(gw.http.get(format!("{}/admin/session", gw.admin))).await, 401);
    assert_eq!(replayed(gw.http.get(format!("{}/admin/flags", gw.admin))).await, 401);
    let change = gw
        .http
        .put(format!("{}/admin/flags/trip_accept_v2", gw.admin))
        .json(&serde_json::json!({"percent": 31, "reason": "after logout"}));
    assert_eq!(replayed(change).await, 401);
    assert_eq!(
        gw.admin_get("/admin/flags").await.1["flags"]["trip_accept_v2"]["percent"],
        before
    );
    gw.shutdown().await;
}

/// What the console could not do, it says: figures that stopped refreshing (the database
/// failing) are marked out of date, a logout that failed leaves you logged in and says so
/// — and what others change (another admin, the guard) shows without a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_says_what_it_could_not_do_and_follows_others() {
    let Some((_driver, c)) = browser().await else {
        return;
    };
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: 10.0,
            ..Options::default()
        },
    )
    .await;
    c.goto(&format!("{}/", gw.admin)).await.unwrap();
    fill(&c, "input[name='token']", &gw.token("alice", Role::Admin)).await;
    click(&c, "login-submit").await;
    wait_text(&c, "flag-percent-trip_accept_v2", |t| t == "10").await;

    // Another admin changes the percent through the API: the page follows.
    let res = gw
        .http
        .put(format!("{}/admin/flags/trip_accept_v2", gw.admin))
        .bearer_auth(gw.token("bob", Role::Admin))
        .json(&json!({"percent": 40, "reason": "elsewhere"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    wait_text(&c, "flag-percent-trip_accept_v2", |t| t == "40").await;
    wait_text(&c, "audit-table", |t| t.contains("elsewhere")).await;

    // The live figures cannot be read: said, and unsaid once they can again.
    crate::support::execute_sql(&db, "ALTER TABLE guard_samples RENAME TO guard_samples_away").await;
    let said = wait_text(&c, "live-error", |t| !t.is_empty()).await;
    assert!(said.contains("Not refreshed since"), "{said}");
    crate::support::execute_sql(&db, "ALTER TABLE guard_samples_away RENAME TO guard_samples").await;
    wait_text(&c, "live-error", str::is_empty).await;

    // A logout the server refused (here a stale CSRF token: 403) keeps the session, and
    // the page says so instead of showing the login form.
    c.execute("csrf = 'stale';", vec![]).await.unwrap();
    click(&c, "logout").await;
    let said = wait_text(&c, "session-error", |t| !t.is_empty()).await;
    assert!(said.contains("Logging out failed") && said.contains("403"), "{said}");
    let session: Value = c
        .execute_async(
            "const done = arguments[arguments.length - 1]; \
             fetch('/admin/session', {credentials: 'same-origin'}).then(r => done(r.status));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(session, json!(200), "still logged in, as the page says");
    // A real logout then shows the login form.
    c.refresh().await.unwrap();
    wait_text(&c, "flag-percent-trip_accept_v2", |t| t == "40").await;
    click(&c, "logout").await;
    wait_text(&c, "login-submit", |t| t == "Log in").await;
    assert_eq!(text_of(&c, "session-error").await, "");
    c.close().await.unwrap();
    gw.shutdown().await;
}
