//! The broker's `consumer_timeout` is the transport's limit: `WorkerBuilder::build`
//! refuses a handler timeout that does not fit inside it (and a dedup lease, by the same check), and accepts
//! a long handler timeout when the broker is configured for it. No broker needed
//! (building a worker does not connect). The core consumer has no such limit: see
//! idem-core `tests/handler_timeout.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use idem_amqp::{Error, Topology, Worker, WorkerBuilder};
use idem_core::{ConfigError, Consumer};

const MIN: Duration = Duration::from_secs(60);

fn builder(consumer: Consumer) -> WorkerBuilder {
    Worker::builder(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        Topology::new("orders"),
        consumer,
    )
}

fn with_handler_timeout(timeout: Duration) -> Consumer {
    Consumer::builder("broker-timeout")
        .handler_timeout(timeout)
        .handler(|| async {})
        .expect("the core accepts any handler timeout")
}

#[test]
fn a_handler_timeout_beyond_the_broker_consumer_timeout_is_refused() {
    // The default broker limit is RabbitMQ's default, 30 min.
    let err = builder(with_handler_timeout(60 * MIN)).build().unwrap_err();
    match &err {
        Error::Config(ConfigError::TimeoutTooLong {
            what,
            value,
            broker,
        }) => {
            assert_eq!(*what, "handler timeout");
            assert_eq!((*value, *broker), (60 * MIN, 30 * MIN));
        }
        other => panic!("expected TimeoutTooLong, got {other:?}"),
    }
    assert!(err.to_string().contains("consumer_timeout"), "{err}");

    // A 40 min handler on a broker configured with a 2 h consumer_timeout is fine...
    builder(with_handler_timeout(40 * MIN))
        .broker_consumer_timeout(120 * MIN)
        .build()
        .unwrap();
    // ...and refused on the default 30 min one.
    assert!(builder(with_handler_timeout(40 * MIN)).build().is_err());
}
