//! Exchanges, bindings and fan-out against the real RabbitMQ (issue 24, part 2): one
//! publish to an exchange reaches each consuming service once; a retry copy and an
//! `idem dlq replay` go back to the failing service's own queue only; topic routing
//! keys; `idem topology declare/show` with exchanges and bindings.
//!
//! Needs the local RabbitMQ (see the README section "Running the tests"). Every name
//! is unique per run; each test deletes its queues and exchanges, also when it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{depth, idem, replay_all, text, wait_for};
use futures_util::FutureExt;
use idem_amqp::{Exchange, Publisher, Topology, Worker};
use idem_core::{Consumer, HandlerError, MemoryStore, Message, Stats, WorkerHandle};
use lapin::options::BasicAckOptions;
use lapin::Connection;

/// Deletes the topologies' queues and the exchanges (best effort: runs after a
/// failed test too).
async fn cleanup(topologies: &[Topology], exchanges: &[Exchange]) {
    let conn = common::connect().await;
    for t in topologies {
        if let Ok(ch) = conn.create_channel().await {
            let _ = t.delete_on(&ch).await;
        }
    }
    for x in exchanges {
        if let Ok(ch) = conn.create_channel().await {
            let _ = x.delete_on(&ch).await;
        }
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// Runs `body` with a new connection and publisher, closes them, runs `cleanup`,
/// then re-raises a failure of `body`.
async fn cleaned_up(
    topologies: &[Topology],
    exchanges: &[Exchange],
    body: impl AsyncFnOnce(&Connection, &Publisher),
) {
    let conn = common::connect().await;
    let publisher = Publisher::connect(&common::url()).await.unwrap();
    let result = AssertUnwindSafe(body(&conn, &publisher))
        .catch_unwind()
        .await;
    publisher.close().await;
    let _ = conn.close(200, "bye".into()).await;
    cleanup(topologies, exchanges).await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// [`cleaned_up`] with `services`, each bound to `exchange`, declared first (as
/// `idem topology declare` does).
async fn declared(
    services: [&Topology; 2],
    exchange: &Exchange,
    body: impl AsyncFnOnce(&Connection, &Publisher),
) {
    let topologies = services.map(Topology::clone);
    cleaned_up(
        &topologies,
        std::slice::from_ref(exchange),
        async |conn: &Connection, publisher: &Publisher| {
            for t in services {
                idem_cli::topology::declare(conn, t).await.unwrap();
            }
            body(conn, publisher).await;
        },
    )
    .await;
}

/// The topology of queue `{run}_{name}`, declaring `exchange` and bound to it with
/// each routing key of `keys`.
fn bound(run: &str, name: &str, exchange: &Exchange, keys: &[&str]) -> Topology {
    let t = Topology::new(format!("{run}_{name}")).exchange(exchange.clone());
    keys.iter().fold(t, |t, key| t.bind(exchange.name(), *key))
}

/// Handler calls per message id: `(id, attempt, succeeded)`.
type Calls = Arc<Mutex<Vec<(String, u32, bool)>>>;

fn calls_of(calls: &Calls, id: &str) -> Vec<(u32, bool)> {
    calls
        .lock()
        .unwrap()
        .iter()
        .filter(|(i, _, _)| i == id)
        .map(|(_, a, ok)| (*a, *ok))
        .collect()
}

fn applied(calls: &Calls, id: &str) -> usize {
    calls_of(calls, id).iter().filter(|(_, ok)| *ok).count()
}

/// A consumer recording its calls; `fail` says, for a message id and attempt, whether
/// the call fails and how.
fn recording_consumer(
    name: &str,
    calls: &Calls,
    fail: fn(&str, u32, usize) -> Option<HandlerError>,
) -> Consumer {
    let c = calls.clone();
    Consumer::builder(name)
        .store(MemoryStore::new())
        .backoff(idem_testkit::backoff(Duration::from_secs(1), 3))
        .handler(move |msg: Message| {
            let c = c.clone();
            async move {
                let id = msg.properties.message_id.clone().unwrap_or_default();
                let attempt = msg.delivery.attempt;
                let mut calls = c.lock().unwrap();
                let earlier = calls.iter().filter(|(i, _, _)| *i == id).count();
                let result = fail(&id, attempt, earlier);
                calls.push((id, attempt, result.is_none()));
                match result {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            }
        })
        .unwrap()
}

/// `billing`: `m1` fails transiently on its first attempt, `m2` fails permanently
/// on its first call (it is dead-lettered) and succeeds when replayed.
fn billing_fails(id: &str, attempt: u32, earlier: usize) -> Option<HandlerError> {
    match (id, attempt, earlier) {
        ("m1", 1, _) => Some(HandlerError::transient(std::io::Error::other(
            "ledger locked",
        ))),
        ("m2", _, 0) => Some(HandlerError::permanent(std::io::Error::other(
            "card declined",
        ))),
        _ => None,
    }
}

fn never_fails(_: &str, _: u32, _: usize) -> Option<HandlerError> {
    None
}

/// Spawns a worker (prefetch 5) on `topology` with a [`recording_consumer`].
fn spawn_worker(
    topology: &Topology,
    name: &str,
    calls: &Calls,
    fail: fn(&str, u32, usize) -> Option<HandlerError>,
) -> WorkerHandle<Result<Stats, idem_amqp::Error>> {
    let consumer = recording_consumer(name, calls, fail);
    Worker::builder(common::url(), topology.clone(), consumer)
        .prefetch(5)
        .build()
        .unwrap()
        .spawn()
}

#[tokio::test]
async fn one_publish_reaches_each_service_once_and_retries_and_replays_stay_in_their_queue() {
    let run = idem_testkit::unique("fanout");
    let tiers = idem_cli::topology::parse_tiers("1s").unwrap();
    let orders = Exchange::fanout(format!("{run}_orders"));
    let service = |name: &str| bound(&run, name, &orders, &[""]).tiers(tiers.clone());
    let (billing, audit) = (service("billing"), service("audit"));
    declared(
        [&billing, &audit],
        &orders,
        async |conn: &Connection, publisher: &Publisher| {
            let (billing_calls, audit_calls) = (Calls::default(), Calls::default());
            let billing_worker = spawn_worker(&billing, "billing", &billing_calls, billing_fails);
            let audit_worker = spawn_worker(&audit, "audit", &audit_calls, never_fails);

            // One publish to the exchange: billing fails once, retries through its own
            // delay queue, and applies it; audit applies it once.
            let mut m1 = Message::new(r#"{"order":1}"#).with_message_id("m1");
            publisher.publish(orders.name(), "", &mut m1).await.unwrap();
            wait_for("billing applies m1 after its retry", async || {
                applied(&billing_calls, "m1") == 1
            })
            .await;
            wait_for("audit applies m1", async || {
                applied(&audit_calls, "m1") == 1
            })
            .await;
            assert_eq!(calls_of(&billing_calls, "m1"), [(1, false), (2, true)]);

            // A second publish: billing dead-letters it, audit applies it.
            let mut m2 = Message::new(r#"{"order":2}"#).with_message_id("m2");
            publisher.publish(orders.name(), "", &mut m2).await.unwrap();
            wait_for("billing dead-letters m2", async || {
                depth(conn, &billing.dlq()).await == 1
            })
            .await;
            wait_for("audit applies m2", async || {
                applied(&audit_calls, "m2") == 1
            })
            .await;

            // Audit stops. It saw each message exactly once: no retry copy of billing's
            // reached it (it would have been confirmed into audit's queue before billing
            // applied m1), and nothing waits in its queues.
            let audit_stats = audit_worker.shutdown_and_join().await.unwrap();
            assert_eq!(
                (audit_stats.processed, audit_stats.duplicates),
                (2, 0),
                "{audit_stats:?}"
            );
            assert_eq!(audit_calls.lock().unwrap().len(), 2);
            for q in audit.queue_names() {
                assert_eq!(depth(conn, &q).await, 0, "{q}");
            }

            // The operator replays billing's dead letter with the CLI: it goes back to
            // billing's queue only.
            let out = replay_all(billing.queue()).await;
            assert!(out.contains("1 of 1"), "{out}");
            // The copy was confirmed before the command returned: had it gone to the
            // exchange, audit's queue (no consumer now) would hold it.
            assert_eq!(depth(conn, audit.queue()).await, 0);
            wait_for("billing applies the replayed m2", async || {
                applied(&billing_calls, "m2") == 1
            })
            .await;
            let billing_stats = billing_worker.shutdown_and_join().await.unwrap();
            assert_eq!(
                (
                    billing_stats.processed,
                    billing_stats.retries,
                    billing_stats.dead_lettered,
                    billing_stats.duplicates
                ),
                (2, 1, 1, 0),
                "{billing_stats:?}"
            );
            for q in billing
                .queue_names()
                .iter()
                .chain(audit.queue_names().iter())
            {
                assert_eq!(depth(conn, q).await, 0, "{q}");
            }
            assert_eq!(audit_calls.lock().unwrap().len(), 2, "audit untouched");
        },
    )
    .await;
}

/// Takes every ready message of `queue`, returning their message ids in order.
async fn drain_ids(ch: &lapin::Channel, queue: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for m in common::get_all(ch, queue, false).await {
        ids.push(
            m.properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
        );
        m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    ids
}

#[tokio::test]
async fn topic_bindings_route_by_routing_key_and_an_unrouted_publish_is_returned() {
    let run = idem_testkit::unique("topic");
    let events = Exchange::topic(format!("{run}_events"));
    let billing = bound(&run, "billing", &events, &["order.*"]);
    let audit = bound(&run, "audit", &events, &["order.#", "invoice.*"]);
    declared(
        [&billing, &audit],
        &events,
        async |conn: &Connection, publisher: &Publisher| {
            for (id, key) in [
                ("created", "order.created"),
                ("created-eu", "order.created.eu"),
                ("paid", "invoice.paid"),
            ] {
                let mut m = Message::new("{}").with_message_id(id);
                publisher.publish(events.name(), key, &mut m).await.unwrap();
            }
            // Bound by no one: the mandatory publish comes back, nothing is lost silently.
            let mut m = Message::new("{}").with_message_id("failed");
            let err = publisher
                .publish(events.name(), "payment.failed", &mut m)
                .await
                .unwrap_err();
            assert!(
                matches!(err, idem_amqp::Error::Returned { code: 312, .. }),
                "{err}"
            );

            let ch = conn.create_channel().await.unwrap();
            let mut got = HashMap::new();
            for t in [&billing, &audit] {
                got.insert(t.queue().to_owned(), drain_ids(&ch, t.queue()).await);
            }
            assert_eq!(got[billing.queue()], ["created"]);
            assert_eq!(got[audit.queue()], ["created", "created-eu", "paid"]);
        },
    )
    .await;
}

#[tokio::test]
async fn topology_declare_and_show_with_exchanges_and_bindings() {
    let run = idem_testkit::unique("topo");
    let q = format!("{run}_billing");
    let x = format!("{run}_orders");
    let absent = format!("{run}_absent");
    let topology = Topology::new(q.as_str())
        .tiers(idem_cli::topology::parse_tiers("1s").unwrap())
        .exchange(Exchange::topic(x.as_str()))
        .bind(x.as_str(), "order.*");
    cleaned_up(
        std::slice::from_ref(&topology),
        &[Exchange::topic(x.as_str())],
        async |conn: &Connection, publisher: &Publisher| {
            let exchange_arg = format!("{x}=topic");
            let bind_arg = format!("{x}=order.*");
            let routing = ["--exchange", &exchange_arg, "--bind", &bind_arg];
            let declare: Vec<&str> = ["topology", "declare", &q, "--tiers", "1s"]
                .into_iter()
                .chain(routing)
                .collect();
            let out = idem(&declare);
            assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
            let said = text(&out.stdout);
            assert!(
                said.contains(&format!("declared exchange {x:?} (topic)"))
                    && said.contains(&format!(
                        "bound {q:?} to exchange {x:?} with routing key \"order.*\""
                    )),
                "{said}"
            );

            // The binding is real: a publish with a matching key reaches the queue.
            let mut m = Message::new("{}").with_message_id("o1");
            publisher
                .publish(&x, "order.created", &mut m)
                .await
                .unwrap();
            assert_eq!(depth(conn, &q).await, 1);

            let show: Vec<&str> = ["topology", "show", &q, "--tiers", "1s"]
                .into_iter()
                .chain(routing)
                .collect();
            let out = idem(&[show.as_slice(), &["--json"]].concat());
            assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let rows: Vec<(&str, &str, &serde_json::Value)> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r["name"].as_str().unwrap(),
                        r["role"].as_str().unwrap(),
                        &r["exists"],
                    )
                })
                .collect();
            let yes = serde_json::Value::Bool(true);
            let unknown = serde_json::Value::Null;
            assert_eq!(
                rows,
                [
                    (q.as_str(), "work", &yes),
                    (format!("{q}.dlq").as_str(), "dead-letter", &yes),
                    (format!("{q}.retry.1s").as_str(), "retry 1s", &yes),
                    (x.as_str(), "exchange topic", &yes),
                    (x.as_str(), "binding", &unknown),
                ]
            );
            assert_eq!(v[0]["messages"], 1);
            assert_eq!(v[4]["routing_key"], "order.*");

            // The table, with an exchange that does not exist: marked, exit 1.
            let absent_arg = format!("{absent}=fanout");
            let out = idem(&[show.as_slice(), &["--exchange", &absent_arg]].concat());
            assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
            let table = text(&out.stdout);
            let line = |needle: &str| {
                table
                    .lines()
                    .find(|l| l.contains(needle))
                    .unwrap_or_else(|| panic!("no {needle:?} in {table}"))
                    .to_owned()
            };
            assert!(line("exchange topic").contains("ok"), "{table}");
            assert!(line(&absent).contains("MISSING"), "{table}");
            assert!(
                line("binding, key \"order.*\"").contains("unchecked"),
                "{table}"
            );
            assert!(text(&out.stderr).contains(&absent), "{}", text(&out.stderr));

            // Declaring the exchange with another type is refused (exit 4), as is a
            // binding to an exchange that does not exist; neither creates anything.
            let other_type = format!("{x}=fanout");
            let out = idem(&[
                "topology",
                "declare",
                &q,
                "--tiers",
                "1s",
                "--exchange",
                &other_type,
            ]);
            assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
            assert!(
                text(&out.stderr).contains("exists with another type"),
                "{}",
                text(&out.stderr)
            );
            let to_absent = format!("{absent}=k");
            let out = idem(&[
                "topology", "declare", &q, "--tiers", "1s", "--bind", &to_absent,
            ]);
            assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
            assert!(
                text(&out.stderr).contains("the exchange does not exist"),
                "{}",
                text(&out.stderr)
            );
            assert!(!idem_cli::broker::exchange_exists(conn, &absent)
                .await
                .unwrap());
        },
    )
    .await;
}

#[tokio::test]
async fn a_worker_declares_its_exchange_and_binding_and_refuses_a_binding_to_no_exchange() {
    let run = idem_testkit::unique("wdecl");
    let orders = Exchange::fanout(format!("{run}_orders"));
    let tiers = idem_cli::topology::parse_tiers("1s").unwrap();
    let billing = bound(&run, "billing", &orders, &[""]).tiers(tiers.clone());
    let absent = format!("{run}_absent");
    let orphan = Topology::new(format!("{run}_orphan"))
        .tiers(tiers)
        .bind(absent.as_str(), "");
    let topologies = [billing.clone(), orphan.clone()];
    cleaned_up(
        &topologies,
        std::slice::from_ref(&orders),
        async |conn: &Connection, publisher: &Publisher| {
            let calls = Calls::default();
            let worker = spawn_worker(&billing, "billing", &calls, never_fails);
            // Nothing declared by the test: the publish is returned until the worker has
            // declared the exchange and bound its queue, then it is routed.
            wait_for("the worker declares the exchange", async || {
                idem_cli::broker::exchange_exists(conn, orders.name())
                    .await
                    .unwrap()
            })
            .await;
            let mut m = Message::new("{}").with_message_id("w1");
            wait_for(
                "a publish to the exchange is routed",
                async || match publisher.publish(orders.name(), "", &mut m).await {
                    Ok(()) => true,
                    Err(idem_amqp::Error::Returned { .. }) => false,
                    Err(e) => panic!("{e}"),
                },
            )
            .await;
            wait_for("the worker applies it", async || applied(&calls, "w1") == 1).await;
            let stats = worker.shutdown_and_join().await.unwrap();
            assert_eq!((stats.processed, stats.duplicates), (1, 0), "{stats:?}");

            // A binding to an exchange nobody declared: the worker does not start.
            let worker = spawn_worker(&orphan, "orphan", &calls, never_fails);
            let err = worker.join().await.unwrap_err();
            assert!(
                matches!(&err, idem_amqp::Error::Topology(t) if t.contains(&absent)),
                "{err}"
            );
            assert!(!idem_cli::broker::exchange_exists(conn, &absent)
                .await
                .unwrap());
        },
    )
    .await;
}
