//! The test kit of the idem workspace, in the spirit of `tower-test` and `sqlx-test`:
//! a `publish = false` crate that the tests of every idem crate use as a
//! dev-dependency, so production crates compile none of it.
//!
//! - [`Service`]: the four services the integration tests talk to, their URLs (an
//!   environment variable overrides each default) and one failure message when a
//!   service cannot be reached: which service, where, why, and that the README says
//!   how to run the services. Start commands are machine-specific, so they are never
//!   part of the message.
//! - `rabbitmq()`, `redis()`, `postgres()`, `mariadb()` (features `amqp`, `redis`,
//!   `postgres`, `mysql`): connect or fail with that message; `delete_redis_keys()`
//!   and `drop_pg_table()` clean a test's Redis keys and tables up.
//! - [`backoff`]: a retry budget without jitter.
//! - [`unique`]: a fresh name for queues, keys, tables and prefixes, so tests that run
//!   at the same time never share state.
//! - [`fault_proxy`]: a TCP proxy that cuts a service off (refused or reset
//!   connections) for outage tests.
//! - [`conformance`]: the behavioural suite every dedup store must pass (published in
//!   idem-core behind its `conformance` feature; re-exported here).
//! - [`broker`]: what the local RabbitMQ node reports (queue counts, open
//!   connections, a queue settled after a stop), read with `rabbitmqctl`; with feature `amqp`, queue declares over
//!   a channel (`declare_queue`, `inspect_queue`, `ready_count`).
//! - `spans` (feature `otel`): exports spans to memory, to assert trace context.
//! - [`logs`]: captures what is logged, for tests that assert a warning.
//! - [`probe`]: counts what test handlers applied, with a gate that holds them in
//!   flight, for the tests that stop a process mid-run.
//! - [`http`]: a bare `GET` for the tests of the metrics and readiness listeners.
//! - [`lease_batch`]: a batch handler over a lease store, end to end, counting the
//!   store calls of the batch.
//! - [`cluster`]: starts the RabbitMQ and Redis test clusters of `.ci/cluster` on first use.
//!
//! ```no_run
//! use idem_testkit::Service;
//!
//! # async fn demo() {
//! let url = Service::Redis.url(); // REDIS_URL, or redis://127.0.0.1:6379
//! let queue = idem_testkit::unique("orders"); // idem_t<12 hex digits>_orders
//! # let _ = (url, queue);
//! # }
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]
// Doctests deny warnings, except the unused code their hidden set-up lines leave.
#![doc(test(attr(deny(warnings), allow(dead_code, unused_variables))))]
// A test kit fails by panicking: its callers are tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod broker;
pub mod cluster;
/// The dedup store conformance suite, published in idem-core (feature
/// `conformance`); re-exported here for the workspace's own tests.
pub use idem_core::conformance;
pub mod fault_proxy;
pub mod graceful;
pub mod http;
pub mod lease_batch;
pub mod logs;
pub mod probe;
pub mod recovery;
mod service;
#[cfg(feature = "otel")]
pub mod spans;
pub mod tools;

#[cfg(feature = "redis")]
pub use service::delete_redis_keys;
#[cfg(feature = "mysql")]
pub use service::mariadb;
#[cfg(feature = "amqp")]
pub use service::rabbitmq;
#[cfg(feature = "redis")]
pub use service::redis;
pub use service::Service;
#[cfg(feature = "postgres")]
pub use service::{drop_pg_table, postgres};

/// A retry budget without jitter, so a test knows when each retry comes: `attempts`
/// attempts in all, the first retry after `first`, each later one after twice the
/// previous delay.
pub fn backoff(first: std::time::Duration, attempts: u32) -> idem_core::Backoff {
    idem_core::Backoff::exponential(first)
        .jitter(idem_core::Jitter::None)
        .max_attempts(attempts)
}

/// A name no other test run uses: `idem_t` and 12 random hex digits, then `_` and
/// `tag` (e.g. `idem_t3f9c0a1b2d4e_orders`).
///
/// It is a valid SQL identifier, queue name and Redis key prefix as long as `tag` is
/// made of ASCII letters, digits and `_`. Tests that create something with it delete
/// it again at the end.
pub fn unique(tag: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("idem_t{}_{tag}", &id[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_keep_their_tag() {
        let (a, b) = (unique("orders"), unique("orders"));
        assert_ne!(a, b);
        assert!(a.starts_with("idem_t") && a.ends_with("_orders"), "{a}");
        assert_eq!(a.len(), "idem_t".len() + 12 + "_orders".len());
        assert!(
            a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{a}"
        );
    }
}
