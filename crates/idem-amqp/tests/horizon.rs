//! `WorkerBuilder::build` checks the dedup retention against the retry horizon in
//! broker time: each backoff delay waits in the delay tier it is rounded to. No broker
//! needed (building a worker does not connect).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use idem_amqp::{DelayTiers, Error, Topology, Worker};
use idem_core::backoff::Jitter;
use idem_core::{Backoff, Consumer, DedupLayer, MemoryStore};

const MIN: Duration = Duration::from_secs(60);

fn consumer(backoff: Backoff, retention: Duration) -> Consumer {
    Consumer::builder("horizon")
        .dedup(DedupLayer::new(MemoryStore::new()).retention(retention))
        .backoff(backoff)
        .handler(|| async {})
        .expect("the raw horizon fits the retention")
}

fn twenty_minutes_twice() -> Backoff {
    Backoff::exponential(20 * MIN)
        .cap(20 * MIN)
        .jitter(Jitter::None)
        .max_attempts(2)
}

fn build(topology: Topology, consumer: Consumer) -> Result<Worker, Error> {
    Worker::builder("amqp://guest:guest@127.0.0.1:5672/%2f", topology, consumer).build()
}

#[test]
fn retention_shorter_than_the_tier_a_retry_waits_in_is_refused() {
    // 20 min rounds to the 30 min tier of the default tiers (1s, 5s, 30s, 2m, 10m, 30m):
    // the retry arrives 30 min after the failure, after a 21 min retention.
    let c = consumer(twenty_minutes_twice(), 21 * MIN);
    let err = build(Topology::new("orders"), c).unwrap_err();
    match &err {
        Error::RetentionTooShortForTiers { retention, horizon } => {
            assert_eq!((*retention, *horizon), (21 * MIN, 30 * MIN));
        }
        other => panic!("expected RetentionTooShortForTiers, got {other:?}"),
    }
    assert!(err.to_string().contains("broker time"), "{err}");

    // A retention covering the tier is accepted.
    let c = consumer(twenty_minutes_twice(), 31 * MIN);
    build(Topology::new("orders"), c).unwrap();

    // With a 20 min tier, 21 min is enough.
    let tiers = DelayTiers::new([MIN, 20 * MIN]).unwrap();
    let c = consumer(twenty_minutes_twice(), 21 * MIN);
    build(Topology::new("orders").tiers(tiers), c).unwrap();
}

#[test]
fn every_retry_counts_in_its_tier() {
    // 4 attempts, 7 min apart: 3 retries of 7 min each (21 min raw), each waiting in the
    // 10 min tier: 30 min in the broker.
    let backoff = Backoff::exponential(7 * MIN)
        .cap(7 * MIN)
        .jitter(Jitter::Equal)
        .max_attempts(4);
    assert_eq!(backoff.horizon(), 21 * MIN);
    let c = consumer(backoff.clone(), 25 * MIN);
    let err = build(Topology::new("orders"), c).unwrap_err();
    assert!(
        matches!(
            err,
            Error::RetentionTooShortForTiers { horizon, .. } if horizon == 30 * MIN
        ),
        "{err}"
    );
    // A total budget bounds it: the last retry starts within 12 min and waits one tier.
    let budgeted = backoff.total_budget(12 * MIN);
    let c = consumer(budgeted, 25 * MIN);
    build(Topology::new("orders"), c).unwrap();
}
