//! Shared fixtures: a unique topology per test and dead-lettered messages published
//! straight into `Q.dlq` with the headers the transport writes.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use idem_amqp::DelayTiers;
use idem_amqp::{Publisher, Topology};
use idem_core::dedup::{Claim, ClaimRequest, Completion, DedupStore, OwnerToken, ScopedKey};
use idem_core::{ErrorKind, Failure, HeaderValue, Message};
use idem_testkit::Service;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection};

pub fn url() -> String {
    Service::RabbitMq.url()
}

pub async fn connect() -> Connection {
    let url = url();
    Service::RabbitMq.expect_connected(&url, idem_amqp::connect(&url, "idem-cli-test").await)
}

/// Runs the `idem` binary of this build with `args`, the local broker as `AMQP_URL`
/// and a terminal 200 characters wide (`COLUMNS`), so tables keep their long cells.
pub fn idem(args: &[&str]) -> Output {
    idem_at(&url(), 200, args)
}

/// Runs the `idem` binary with `args`, `url` as `AMQP_URL` and a terminal `columns`
/// characters wide.
pub fn idem_at(url: &str, columns: u16, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .env("AMQP_URL", url)
        .env("COLUMNS", columns.to_string())
        .output()
        .expect("run the idem binary")
}

/// Output bytes as text (invalid UTF-8 replaced), for assertions and messages.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts that `out` exited with `code` (its stderr in the message) and parses its
/// stdout as JSON.
pub fn exit_json(out: &Output, code: i32) -> serde_json::Value {
    assert_eq!(out.status.code(), Some(code), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Asserts that `out` exited with `code` (its output in the message) and returns its
/// stdout as text.
pub fn exit_text(out: &Output, code: i32) -> String {
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{stdout}{}",
        text(&out.stderr)
    );
    stdout
}

/// [`exit_text`], also asserting that the output starts with `head`.
pub fn exit_starting(out: &Output, code: i32, head: &str) -> String {
    let said = exit_text(out, code);
    assert!(said.starts_with(head), "{said}");
    said
}

/// Asserts that `said` contains each of `parts`.
pub fn assert_says(said: &str, parts: &[&str]) {
    for part in parts {
        assert!(said.contains(part), "no {part:?} in {said}");
    }
}

/// The string `field` of every element of the JSON array `v`.
pub fn fields<'a>(v: &'a serde_json::Value, field: &str) -> Vec<&'a str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e[field].as_str().unwrap())
        .collect()
}

/// Polls `check` every 25 ms until it holds; panics with `what` after 30 s.
pub async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Ready messages of `queue`, as `idem_cli::broker::probe` reads them; panics if the
/// queue does not exist.
pub async fn depth(conn: &Connection, queue: &str) -> u32 {
    idem_cli::broker::probe(conn, queue)
        .await
        .unwrap()
        .expect("queue exists")
        .messages
}

/// Records `key` as done in `store` as a consumer would: claims it with
/// `fingerprint`, then completes it as `completion`, kept for `retention`. Returns
/// the owner token, for a release at the end of the test.
pub async fn record_done(
    store: &impl DedupStore,
    key: &ScopedKey,
    fingerprint: Option<&str>,
    completion: Completion,
    retention: Duration,
) -> OwnerToken {
    let fingerprint = fingerprint.map(str::to_owned);
    let req = ClaimRequest::new(key.clone(), OwnerToken::generate(), fingerprint);
    let terms = idem_core::dedup::Terms::new(Duration::from_secs(30), retention);
    let claim = store.claim(&req, terms).await.unwrap();
    assert_eq!(claim, Claim::Acquired);
    assert!(store.complete(&req.held, completion, terms).await.unwrap());
    req.held.owner
}

/// `idem dlq replay QUEUE --all --json` with `dedup` (the options naming the dedup
/// store), as a dry run if `dry`: asserts exit 0 and that the report counts exactly
/// the messages `duplicates` as ones the consumer will ack as duplicates; returns the
/// JSON report.
pub fn replay_report(
    queue: &str,
    dedup: &[&str],
    dry: bool,
    duplicates: &[&str],
) -> serde_json::Value {
    let mut args = vec!["dlq", "replay", queue, "--all", "--json"];
    args.extend_from_slice(dedup);
    if dry {
        args.push("--dry-run");
    }
    let out = idem(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["duplicates"], duplicates.len(), "{v}");
    for id in duplicates {
        assert!(
            outcome(&v, id).ends_with("will be acked as a duplicate"),
            "{id}: {v}"
        );
    }
    v
}

/// The `outcome` line of message `id` in a `dlq replay --json` report.
pub fn outcome(report: &serde_json::Value, id: &str) -> String {
    report["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["message_id"] == id)
        .unwrap()["outcome"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Runs `idem dlq replay QUEUE --all` in this process against the local broker and
/// returns what it printed.
pub async fn replay_all(queue: &str) -> String {
    use clap::Parser as _;
    let url = url();
    let args = ["idem", "--url", &url, "dlq", "replay", queue, "--all"];
    let cli = idem_cli::cli::Cli::try_parse_from(args).unwrap();
    let mut out = Vec::new();
    idem_cli::run(cli, &mut out).await.unwrap();
    text(&out)
}

/// Every ready message of `queue`, got one by one on `ch` (acked by the broker when
/// `no_ack`, else held until acked), in order.
pub async fn get_all(ch: &lapin::Channel, queue: &str, no_ack: bool) -> Vec<BasicGetMessage> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack })
        .await
        .unwrap()
    {
        out.push(m);
    }
    out
}

/// `s` as an AMQP long string (a header or queue argument value).
pub fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes()))
}

/// Declares the durable queue `name` on `ch` with the queue arguments `args`.
pub async fn declare_durable(ch: &lapin::Channel, name: &str, args: &[(&str, AMQPValue)]) {
    let mut table = FieldTable::default();
    for (k, v) in args {
        table.insert((*k).into(), v.clone());
    }
    ch.queue_declare(name.into(), QueueDeclareOptions::durable(), table)
        .await
        .unwrap();
}

/// One failed message to put into the DLQ.
pub struct Dead<'a> {
    pub id: &'a str,
    pub error: &'a str,
    pub kind: ErrorKind,
    pub attempts: u32,
    /// Seconds after a fixed base time, for first/last failure times.
    pub at: u64,
}

pub fn dead(id: &str, error: &str, kind: ErrorKind) -> Dead<'static> {
    // Leak: test-only convenience for 'static fixtures.
    Dead {
        id: Box::leak(id.to_owned().into_boxed_str()),
        error: Box::leak(error.to_owned().into_boxed_str()),
        kind,
        attempts: 3,
        at: 0,
    }
}

pub struct Fixture {
    pub conn: Connection,
    pub queue: String,
    pub topology: Topology,
    publisher: Publisher,
}

pub const BASE: u64 = 1_700_000_000;

impl Fixture {
    pub async fn new(name: &str) -> Fixture {
        let conn = connect().await;
        let queue = format!("idem-cli-test-{name}-{}", uuid::Uuid::new_v4().simple());
        let topology =
            Topology::new(queue.as_str()).tiers(DelayTiers::new([Duration::from_secs(1)]).unwrap());
        let ch = conn.create_channel().await.unwrap();
        topology.declare_on(&ch).await.unwrap();
        let publisher = Publisher::builder(url())
            .connection_name("idem-cli-test-publisher")
            .connect()
            .await
            .unwrap();
        Fixture {
            conn,
            queue,
            topology,
            publisher,
        }
    }

    pub fn dlq(&self) -> String {
        self.topology.dlq()
    }

    /// Publishes a dead-lettered message (as the worker would) into `Q.dlq`.
    pub async fn bury(&self, d: &Dead<'_>) {
        let mut msg = Message::new(format!("body of {}", d.id))
            .with_message_id(d.id)
            .with_header("x-tenant", "acme");
        msg.delivery.queue = self.queue.clone();
        msg.delivery.routing_key = self.queue.clone();
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(BASE + s);
        let mut failure = Failure::new(d.kind, d.error, d.attempts, t(d.at + 10));
        failure.first_failed_at = t(d.at);
        failure.key = Some(format!("key-{}", d.id));
        failure.error_type = Some("billing::LedgerLocked".to_owned());
        failure.immediate_retries = 2;
        let extra = failure.dead_letter_headers(&msg, "test-consumer");
        msg.headers.extend(extra);
        self.publish_raw("", &self.dlq(), msg).await;
    }

    /// Publishes into `Q.dlq` a message `id` whose `x-idem-original-queue` does not
    /// exist: a replay of it is returned by the broker.
    pub async fn bury_unroutable(&self, id: &str) {
        let mut msg = Message::new(format!("body of {id}")).with_message_id(id);
        msg.headers.insert(
            idem_core::outcome::headers::ORIGINAL_QUEUE.into(),
            format!("idem-cli-test-nowhere-{}", uuid::Uuid::new_v4().simple()).into(),
        );
        self.publish_raw("", &self.dlq(), msg).await;
    }

    pub async fn publish_raw(&self, exchange: &str, routing_key: &str, mut msg: Message) {
        self.publisher
            .publish(exchange, routing_key, &mut msg)
            .await
            .unwrap();
    }

    pub async fn bury_all(&self, list: &[Dead<'_>]) {
        for d in list {
            self.bury(d).await;
        }
    }

    /// Buries one message per id of `ids`, each failed with `error` of `kind`.
    pub async fn bury_each(&self, ids: &[&str], error: &str, kind: ErrorKind) {
        for id in ids {
            self.bury(&dead(id, error, kind)).await;
        }
    }

    /// Ready messages of `queue` (passive declare).
    pub async fn depth(&self, queue: &str) -> u32 {
        let ch = self.conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = ch.close(200, "bye".into()).await;
        q.message_count()
    }

    /// Waits until `queue` holds exactly `expected` ready messages (requeues on channel
    /// close are asynchronous), then reads and removes them all, in order.
    pub async fn drain(&self, queue: &str, expected: u32) -> Vec<Message> {
        let what = format!("{queue} holds {expected} ready messages");
        wait_for(&what, async || self.depth(queue).await == expected).await;
        let ch = self.conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        for m in get_all(&ch, queue, false).await {
            out.push(idem_amqp::convert::message_from_delivery(
                &m.delivery,
                queue,
            ));
            m.delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        let _ = ch.close(200, "bye".into()).await;
        assert_eq!(out.len(), expected as usize, "{queue}: {out:?}");
        out
    }

    pub async fn cleanup(self) {
        let ch = self.conn.create_channel().await.unwrap();
        self.topology.delete_on(&ch).await.unwrap();
        self.publisher.close().await;
        let _ = self.conn.close(200, "bye".into()).await;
    }
}

/// `props` of message `what` without the headers the broker adds to each delivery
/// (`x-delivery-count`, `x-acquired-count`), after asserting that no earlier read
/// was counted as a delivery (`x-delivery-count` absent or 0).
pub fn unspent(props: &BasicProperties, what: &str) -> BasicProperties {
    let mut t = props.headers().clone().unwrap_or_default().inner().clone();
    let count = t.remove("x-delivery-count");
    assert!(
        matches!(count, None | Some(AMQPValue::LongLongInt(0))),
        "{what}: a read spent a delivery: x-delivery-count {count:?}"
    );
    t.remove("x-acquired-count");
    props.clone().with_headers(FieldTable::from(t))
}

pub fn ids(msgs: &[Message]) -> Vec<String> {
    msgs.iter()
        .map(|m| m.properties.message_id.clone().unwrap_or_default())
        .collect()
}

/// The message of `msgs` whose message id is `id`.
pub fn by_id<'a>(msgs: &'a [Message], id: &str) -> &'a Message {
    msgs.iter()
        .find(|m| m.properties.message_id.as_deref() == Some(id))
        .unwrap_or_else(|| panic!("no message {id}"))
}

pub fn header<'a>(m: &'a Message, name: &str) -> Option<&'a HeaderValue> {
    m.headers.get(name)
}
