//! The harness itself: what a test leaves behind when it fails.

use sqlx::Connection;

use crate::support::{Backend, TestDb, postgres_url};

async fn pg_database_exists(server: &str, name: &str) -> bool {
    let mut conn = sqlx::PgConnection::connect(server).await.unwrap();
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// A test that panics half-way (an assertion failed) leaves no database behind: the
/// `TestDb` guard drops its Postgres database, and removes its SQLite file, while the
/// panic unwinds — not a call at the test's end, which a failed test never reaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_database_is_dropped_when_its_test_panics() {
    let server = postgres_url();
    let mut backends = vec![Backend::Sqlite];
    if server.is_some() {
        backends.push(Backend::Postgres);
    }
    for backend in backends {
        let (tx, rx) = std::sync::mpsc::channel();
        let test_server = server.clone();
        // A test of its own (a task: its panic is caught and reported to the join handle).
        let failing_test = tokio::spawn(async move {
            let db = TestDb::new(backend).await;
            let _store = db.store().await;
            match (db.pg_name(), &test_server) {
                (Some(name), Some(server)) => {
                    assert!(pg_database_exists(server, name).await, "{name} created");
                    tx.send(name.to_owned()).unwrap();
                }
                _ => {
                    let file = db.url.trim_start_matches("sqlite://").to_owned();
                    assert!(std::path::Path::new(&file).exists(), "{file} created");
                    tx.send(file).unwrap();
                }
            }
            panic!("deliberate failure of a test ({backend:?}): its database must still be dropped");
        });
        let failure = failing_test.await.expect_err("the inner test fails");
        assert!(failure.is_panic());
        let left = rx.recv().unwrap();
        match (backend, &server) {
            (Backend::Postgres, Some(server)) => assert!(
                !pg_database_exists(server, &left).await,
                "Postgres database {left} left behind by a failed test"
            ),
            _ => assert!(
                !std::path::Path::new(&left).parent().unwrap().exists(),
                "SQLite file {left} (and its temp dir) left behind by a failed test"
            ),
        }
    }
}
