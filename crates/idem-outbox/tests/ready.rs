//! A relay's readiness source: not ready while its oldest pending row is older than
//! the threshold it was given, ready again once nothing old is pending.
//!
//! Needs PostgreSQL (`DATABASE_URL`, see README, `bash .ci/services`). The relay is
//! pointed at a broker address where nothing listens, so its rows stay pending.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

mod common;

use std::time::{Duration, Instant};

use idem_amqp::readiness::Readiness;
use idem_outbox::{Outbox, OutboxMessage, Relay};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_ready_until_its_oldest_pending_row_passes_the_threshold() {
    let pool = idem_testkit::postgres(
        sqlx::postgres::PgPoolOptions::new().max_connections(4),
        "idem-outbox-ready-test",
    )
    .await;
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let outbox = Outbox::new(&format!("idem_outbox_r{id}")).unwrap();
    outbox.ensure_schema(&pool).await.unwrap();
    let registry = Readiness::new();
    let relay = Relay::builder(
        pool.clone(),
        outbox.clone(),
        "amqp://guest:guest@127.0.0.1:1/%2f",
    )
    .poll_interval(Duration::from_millis(50))
    .readiness(&registry, Duration::from_secs(1))
    .build();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        relay
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    let wait = |ready: bool, limit: Duration| {
        let registry = registry.clone();
        async move {
            let start = Instant::now();
            loop {
                let report = registry.report();
                if report.is_ready() == ready && !report.sources.is_empty() {
                    return report;
                }
                assert!(
                    start.elapsed() < limit,
                    "ready={ready} not reached: {report:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let report = wait(true, Duration::from_secs(5)).await;
    assert_eq!(report.sources[0].name, outbox.table_name());

    // The row's age counts from its transaction's start.
    let enqueued = Instant::now();
    let row = OutboxMessage::new("", "nowhere", b"x".to_vec());
    common::enqueue(&pool, &outbox, row).await;
    let report = wait(false, Duration::from_secs(10)).await;
    assert!(
        enqueued.elapsed() >= Duration::from_secs(1),
        "not ready too early"
    );
    assert!(
        report.to_json().contains("oldest pending outbox row"),
        "{}",
        report.to_json()
    );

    // The row leaves the outbox (as if another relay published it): ready again.
    sqlx::query(&format!("DELETE FROM {}", outbox.table_name()))
        .execute(&pool)
        .await
        .unwrap();
    wait(true, Duration::from_secs(30)).await;

    let _ = stop.send(());
    running.await.unwrap().unwrap();
    idem_testkit::drop_pg_table(&pool, outbox.table_name()).await;
    assert!(
        registry.report().sources.is_empty(),
        "the source left with the relay"
    );
}
