//! The Grafana dashboard (`docs/grafana/idem.json`) and the alert rules
//! (`docs/prometheus/idem-rules.yml`) query only metrics that idem exports. A worker
//! with its Prometheus endpoint and an outbox relay run messages through every outcome
//! (processed, retry, dead letter, duplicate); then `/metrics` is scraped, every PromQL
//! expression of the dashboard and of the rules is parsed (promql-parser), and each
//! metric name it selects must be in the scrape.
//!
//! Its own test binary: the worker installs the process-global metrics recorder.
//! Needs RabbitMQ (`AMQP_URL`) and PostgreSQL (`DATABASE_URL`); see the README section
//! "Set-up: two commands".

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use idem_amqp::{DelayTiers, Publisher, Topology, Worker};
use idem_core::backoff::Jitter;
use idem_core::{Backoff, Consumer, HandlerError, MemoryStore, Message};
use idem_outbox::{Outbox, OutboxMessage, Relay};
use idem_testkit::Service;
use promql_parser::parser::{self, Expr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DASHBOARD: &str = include_str!("../docs/grafana/idem.json");
const RULES: &str = include_str!("../docs/prometheus/idem-rules.yml");

/// The `expr` of every alert rule (the file keeps each on one line).
fn rule_exprs() -> Vec<String> {
    let exprs: Vec<String> = RULES
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| e.trim().to_owned())
        .collect();
    let alerts = RULES
        .lines()
        .filter(|l| l.trim().starts_with("- alert:"))
        .count();
    assert_eq!(exprs.len(), alerts, "one single-line expr per alert rule");
    exprs
}

/// Every `expr` (panel targets) and variable query of the dashboard.
fn queries(dashboard: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(
                target["expr"]
                    .as_str()
                    .expect("a target without expr")
                    .to_owned(),
            );
        }
    }
    out
}

/// Grafana's variables replaced by values a Prometheus server would see.
fn as_promql(expr: &str) -> String {
    let out = expr
        .replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$consumer", ".*");
    assert!(!out.contains('$'), "unknown Grafana variable in {expr}");
    out
}

/// The metric names an expression selects.
fn selected(expr: &Expr, names: &mut BTreeSet<String>) {
    match expr {
        Expr::VectorSelector(vs) => {
            let name = vs.name.clone().or_else(|| {
                vs.matchers
                    .matchers
                    .iter()
                    .find(|m| m.name == "__name__")
                    .map(|m| m.value.clone())
            });
            names.insert(name.expect("a selector without a metric name"));
        }
        Expr::MatrixSelector(ms) => selected(&Expr::VectorSelector(ms.vs.clone()), names),
        Expr::Aggregate(a) => {
            selected(&a.expr, names);
            if let Some(p) = &a.param {
                selected(p, names);
            }
        }
        Expr::Unary(u) => selected(&u.expr, names),
        Expr::Binary(b) => {
            selected(&b.lhs, names);
            selected(&b.rhs, names);
        }
        Expr::Paren(p) => selected(&p.expr, names),
        Expr::Subquery(s) => selected(&s.expr, names),
        Expr::Call(c) => c.args.args.iter().for_each(|a| selected(a, names)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// The metric names of a Prometheus text exposition.
fn exported(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[test]
fn every_alert_rule_parses_and_selects_idem_metrics() {
    let all = rule_exprs();
    assert!(all.len() >= 5, "{all:?}");
    for expr in &all {
        let ast = parser::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
        let mut names = BTreeSet::new();
        selected(&ast, &mut names);
        assert!(!names.is_empty(), "{expr} selects no metric");
        assert!(names.iter().all(|n| n.starts_with("idem_")), "{names:?}");
    }
}

#[test]
fn every_dashboard_query_parses_and_selects_idem_metrics() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).unwrap();
    let all = queries(&dashboard);
    assert!(all.len() >= 10, "{all:?}");
    for expr in &all {
        let ast = parser::parse(&as_promql(expr)).unwrap_or_else(|e| panic!("{expr}: {e}"));
        let mut names = BTreeSet::new();
        selected(&ast, &mut names);
        assert!(!names.is_empty(), "{expr} selects no metric");
        assert!(names.iter().all(|n| n.starts_with("idem_")), "{names:?}");
    }
}

/// Body `flaky` fails (transient) once; `doomed` always (dead-lettered after its
/// retry); `poison` is permanent; anything else succeeds.
fn consumer() -> Consumer {
    let flaky_failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    Consumer::builder("dashboard-test")
        .store(MemoryStore::new())
        .backoff(
            Backoff::exponential(Duration::from_secs(1))
                .jitter(Jitter::None)
                .max_attempts(2),
        )
        .handler(move |msg: Message| {
            let first_flaky = &msg.body[..] == b"flaky"
                && !flaky_failed.swap(true, std::sync::atomic::Ordering::SeqCst);
            async move {
                let db_down = || HandlerError::transient(std::io::Error::other("db down"));
                match &msg.body[..] {
                    b"doomed" => Err(db_down()),
                    b"flaky" if first_flaky => Err(db_down()),
                    b"poison" => Err(HandlerError::permanent(std::io::Error::other("bad"))),
                    _ => Ok(()),
                }
            }
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported_by_a_worker_and_a_relay() {
    let amqp_url = idem_amqp::amqp_url_from_env();
    let conn = Service::RabbitMq.expect_connected(
        &amqp_url,
        idem_amqp::connect(&amqp_url, "idem-test-dashboard").await,
    );
    let ch = conn.create_channel().await.unwrap();
    let pg_url = Service::PostgreSql.url();
    let pool = Service::PostgreSql.expect_connected(
        &pg_url,
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&pg_url)
            .await,
    );

    let queue = idem_testkit::unique("dashboard");
    let topo =
        Topology::new(queue.clone()).tiers(DelayTiers::new([Duration::from_secs(1)]).unwrap());
    topo.declare_on(&ch).await.unwrap();
    let outbox = Outbox::new(&idem_testkit::unique("dashboard")).unwrap();
    outbox.ensure_schema(&pool).await.unwrap();

    let addr = {
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        probe.local_addr().unwrap()
    };
    let consumer = consumer();
    let worker = Worker::builder(amqp_url.as_str(), topo.clone(), consumer.clone())
        .prometheus(addr)
        .build()
        .unwrap()
        .spawn();
    let relay = Relay::builder(pool.clone(), outbox.clone(), amqp_url.as_str())
        .poll_interval(Duration::from_millis(200))
        .build();
    let (stop_relay, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay_task = tokio::spawn(async move {
        relay
            .run(async {
                let _ = stopped.await;
            })
            .await
    });

    // Every outcome, through the outbox.
    let ok = OutboxMessage::new("", queue.clone(), b"ok".to_vec());
    let ok_id = ok.id();
    let mut tx = pool.begin().await.unwrap();
    for msg in [
        ok,
        OutboxMessage::new("", queue.clone(), b"flaky".to_vec()),
        OutboxMessage::new("", queue.clone(), b"doomed".to_vec()),
        OutboxMessage::new("", queue.clone(), b"poison".to_vec()),
    ] {
        outbox.enqueue(&mut tx, msg).await.unwrap();
    }
    tx.commit().await.unwrap();

    let wait_for = |what: &'static str, done: fn(idem_core::Stats) -> bool| {
        let consumer = consumer.clone();
        async move {
            let started = Instant::now();
            while !done(consumer.stats()) {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "{what} not seen in 30 s: {}",
                    consumer.stats()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for("ok, flaky, doomed, poison settled", |s| {
        s.processed == 2 && s.dead_lettered == 2 && s.retries == 2
    })
    .await;
    // A duplicate of the row already handled.
    let publisher = Publisher::connect(&amqp_url).await.unwrap();
    let mut dup = Message::new("ok").with_message_id(ok_id.to_string());
    publisher.publish("", &queue, &mut dup).await.unwrap();
    wait_for("the duplicate", |s| s.duplicates == 1).await;

    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).unwrap();
    let mut wanted = BTreeSet::new();
    for expr in queries(&dashboard) {
        selected(&parser::parse(&as_promql(&expr)).unwrap(), &mut wanted);
    }
    let mut in_rules = BTreeSet::new();
    for expr in rule_exprs() {
        selected(&parser::parse(&expr).unwrap(), &mut in_rules);
    }
    wanted.extend(in_rules.iter().cloned());
    let variable = dashboard["templating"]["list"][1]["definition"]
        .as_str()
        .unwrap();
    let name = variable
        .strip_prefix("label_values(")
        .and_then(|rest| rest.split(',').next())
        .unwrap();
    wanted.insert(name.trim().to_owned());

    // The relay reports its gauges after each round: give it a moment to have one.
    let started = Instant::now();
    let (text, missing) = loop {
        let text = scrape(addr).await;
        let have = exported(&text);
        let missing: Vec<String> = wanted.difference(&have).cloned().collect();
        if missing.is_empty() || started.elapsed() > Duration::from_secs(10) {
            break (text, missing);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let _ = stop_relay.send(());
    let relayed = relay_task.await.unwrap().unwrap();
    let stats = worker.shutdown_and_join().await.unwrap();
    topo.delete_on(&ch).await.unwrap();
    sqlx::query(&format!("DROP TABLE IF EXISTS {}", outbox.table_name()))
        .execute(&pool)
        .await
        .unwrap();
    publisher.close().await;
    let _ = conn.close(200, "bye".into()).await;

    assert!(
        missing.is_empty(),
        "the dashboard or the alert rules query metrics that are not exported: {missing:?}\n{text}"
    );
    assert_eq!(relayed.published, 4);
    assert_eq!(
        (
            stats.processed,
            stats.duplicates,
            stats.retries,
            stats.dead_lettered
        ),
        (2, 1, 2, 2)
    );
    // The names the dashboard is about, so that trimming the JSON cannot pass silently.
    for name in [
        "idem_processed_total",
        "idem_duplicates_total",
        "idem_retries_total",
        "idem_dead_lettered_total",
        "idem_handler_duration_seconds",
        "idem_store_duration_seconds",
        "idem_outbox_oldest_pending_seconds",
        "idem_outbox_pending",
        "idem_outbox_published_total",
        "idem_consumer_paused",
    ] {
        assert!(wanted.contains(name), "the dashboard lost {name}");
    }
    // The names the alert rules are about.
    for name in [
        "idem_dlq_messages",
        "idem_dlq_oldest_age_seconds",
        "idem_consumer_paused",
        "idem_outbox_oldest_pending_seconds",
        "idem_crash_loop_dead_lettered_total",
        "idem_consumer_ready",
    ] {
        assert!(in_rules.contains(name), "the alert rules lost {name}");
    }
}
