//! Set-up shared by the AMQP transport's tests.
#![allow(dead_code)] // each test binary uses its own part of it

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_amqp::DelayTiers;
use idem_core::{HandlerError, State};
use idem_testkit::Service;
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel, Connection};

/// `AMQP_URL`, or the local broker.
pub(crate) fn url() -> String {
    idem_amqp::amqp_url_from_env()
}

/// A connection named `name` to the test broker and a channel on it, or a panic
/// saying the broker is not reachable.
pub(crate) async fn broker(name: &str) -> (Connection, Channel) {
    let url = url();
    let conn = Service::RabbitMq.expect_connected(&url, idem_amqp::connect(&url, name).await);
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// `idem-test-<prefix>-<32 hex digits>`: a queue name no other run uses.
pub(crate) fn unique(prefix: &str) -> String {
    format!("idem-test-{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// One delay tier of 1 s.
pub(crate) fn short_tiers() -> DelayTiers {
    DelayTiers::new([Duration::from_secs(1)]).unwrap()
}

/// A handler that fails (transient) on the first call it counts in `calls` and
/// succeeds on every later one.
pub(crate) async fn fails_once(State(calls): State<Arc<AtomicUsize>>) -> Result<(), HandlerError> {
    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
        Err(HandlerError::transient(std::io::Error::other("once")))
    } else {
        Ok(())
    }
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after `limit`.
pub(crate) async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the async `cond` every 50 ms until it holds; panics naming `what` after
/// `limit`.
pub(crate) async fn wait_until_async<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> F,
) {
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Header `name` of a delivery's properties, if it is there.
pub(crate) fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref().and_then(|h| h.inner().get(name))
}

/// Header `name` of a delivery's properties as text, if it is there as a long string.
pub(crate) fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    header(props, name)
        .and_then(|v| v.as_long_string())
        .map(|s| s.to_string())
}
