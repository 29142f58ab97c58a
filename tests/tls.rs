//! TLS acceptance tests: idem over `amqps://`, `rediss://` and PostgreSQL
//! `sslmode=verify-full`, against the TLS listeners of `.ci/tls` (a throwaway CA, a
//! server certificate for the DNS name "localhost" only, client certificates required
//! on every listener). The listeners are started by the first test that needs them
//! (`bash .ci/tls up`, idempotent); `bash .ci/tls down` removes them.
//!
//! For each service: a consumer with dedup processes messages end to end over TLS; a
//! different CA (and the system roots alone) is refused as an unknown CA; a wrong host
//! name (127.0.0.1 instead of localhost) is refused; a missing client certificate is
//! refused.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use idem_amqp::{Error as AmqpError, Publisher, Topology, Worker};
use idem_core::backoff::Jitter;
use idem_core::{
    Backoff, Consumer, DelayTiers, HandlerError, Message, Stats, TlsConfig, TlsFailure,
};
use idem_redis::RedisStore;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sqlx::{ConnectOptions, Connection};
use tokio::sync::oneshot;

const AMQPS: &str = "amqps://guest:guest@localhost:5681/%2f";
const AMQPS_BY_IP: &str = "amqps://guest:guest@127.0.0.1:5681/%2f";
const REDISS: &str = "rediss://localhost:6390";
const REDISS_BY_IP: &str = "rediss://127.0.0.1:6390";
const PG: &str = "postgres://postgres@localhost:5442/postgres?sslmode=verify-full";
const PG_BY_IP: &str = "postgres://postgres@127.0.0.1:5442/postgres?sslmode=verify-full";

fn tls_dir() -> PathBuf {
    std::env::var_os("IDEM_TLS_DIR").map_or_else(|| PathBuf::from("/tmp/idem-tls"), PathBuf::from)
}

fn cert(name: &str) -> PathBuf {
    tls_dir().join("certs").join(name)
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    )
    .is_ok()
}

/// Starts the TLS listeners once per test binary (the script is idempotent and
/// serialises concurrent callers with a lock).
fn services() {
    static UP: OnceLock<Result<(), String>> = OnceLock::new();
    let result = UP.get_or_init(|| {
        let ready =
            [5681, 6390, 6391, 5442].into_iter().all(port_open) && cert("expired.pem").exists();
        if ready {
            return Ok(());
        }
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.ci/tls");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg("up")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`bash .ci/tls up` failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = result {
        panic!("the TLS test listeners are not up: {e}\nStart them with `bash .ci/tls up` (README, section TLS); the default services must run too (`bash .ci/services`).");
    }
}

/// The test CA and a client certificate it signed: what a correctly set up client has.
fn good() -> TlsConfig {
    services();
    TlsConfig::new()
        .with_ca_file(cert("ca.pem"))
        .unwrap()
        .with_client_identity(cert("client.pem"), cert("client.key"))
        .unwrap()
}

/// The right client certificate, but trusting an unrelated CA.
fn other_ca() -> TlsConfig {
    services();
    TlsConfig::new()
        .with_ca_file(cert("other-ca.pem"))
        .unwrap()
        .with_client_identity(cert("client.pem"), cert("client.key"))
        .unwrap()
}

/// The system roots only (the default), with the client certificate.
fn system_roots() -> TlsConfig {
    services();
    TlsConfig::new()
        .with_client_identity(cert("client.pem"), cert("client.key"))
        .unwrap()
}

/// The right CA, no client certificate.
fn no_client_cert() -> TlsConfig {
    services();
    TlsConfig::new().with_ca_file(cert("ca.pem")).unwrap()
}

fn unique(prefix: &str) -> String {
    format!("idem-tls-{prefix}-{}", uuid::Uuid::new_v4().simple())
}

type Effects = Arc<Mutex<HashMap<String, u32>>>;

/// A consumer on `store` that counts its effects per message id.
fn counting_consumer(name: &str, store: impl idem_core::DedupStore) -> (Consumer, Effects) {
    let effects = Effects::default();
    let e = effects.clone();
    // A copy that arrives while the first is in flight is retried (lease busy): keep
    // that retry short.
    let consumer = Consumer::builder(name)
        .store(store)
        .backoff(
            Backoff::exponential(Duration::from_secs(1))
                .jitter(Jitter::None)
                .max_attempts(10),
        )
        .handler(move |msg: Message| {
            let e = e.clone();
            async move {
                let id = msg.properties.message_id.clone().unwrap_or_default();
                *e.lock().unwrap().entry(id).or_default() += 1;
                Ok::<(), HandlerError>(())
            }
        })
        .unwrap();
    (consumer, effects)
}

/// Runs a worker over amqps:// with `consumer`, publishes 20 messages over amqps://
/// each twice (a publisher retry), and checks: 20 effects, each once, 20 duplicates.
async fn amqps_round_trip(consumer: Consumer, effects: Effects) {
    let tls = good();
    let topo = Topology::new(unique("q")).tiers(DelayTiers::new([Duration::from_secs(1)]).unwrap());
    let worker = Worker::builder(AMQPS, topo.clone(), consumer.clone())
        .tls(tls.clone())
        .prefetch(10)
        .build()
        .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async move {
        let _ = stopped.await;
    }));

    let admin = idem_amqp::connect_tls(AMQPS, "idem-tls-test-admin", &tls)
        .await
        .unwrap();
    let mut ch = admin.create_channel().await.unwrap();
    let start = Instant::now();
    loop {
        let declared = ch
            .queue_declare(
                topo.queue().into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await;
        if matches!(&declared, Ok(q) if q.consumer_count() == 1) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the worker did not start consuming over TLS: {declared:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A failed passive declare (queue not declared yet) closes the channel.
        if declared.is_err() {
            ch = admin.create_channel().await.unwrap();
        }
    }

    let publisher = Publisher::builder(AMQPS)
        .connection_name("idem-tls-test")
        .tls(tls.clone())
        .connect()
        .await
        .unwrap();
    let msgs = || (0..20).map(|i| Message::new("x").with_message_id(format!("m{i}")));
    let mut all: Vec<Message> = msgs().chain(msgs()).collect();
    publisher
        .publish_batch("", topo.queue(), &mut all)
        .await
        .unwrap();
    publisher.close().await;

    let settled = |s: Stats| s.processed + s.duplicates;
    let start = Instant::now();
    while settled(consumer.stats()) != 40 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for 40 deliveries to settle: {}",
            consumer.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    let stats = running.await.unwrap().unwrap();
    assert_eq!(stats.processed, 20, "{stats}");
    assert_eq!(stats.duplicates, 20, "{stats}");
    let effects = effects.lock().unwrap().clone();
    assert_eq!(effects.len(), 20);
    assert!(effects.values().all(|n| *n == 1), "{effects:?}");

    let ch = admin.create_channel().await.unwrap();
    topo.delete_on(&ch).await.unwrap();
    let _ = admin.close(200, "bye".into()).await;
}

async fn delete_redis_keys(prefix: &str) {
    let client = redis::Client::build_with_tls(
        REDISS,
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: std::fs::read(cert("client.pem")).unwrap(),
                client_key: std::fs::read(cert("client.key")).unwrap(),
            }),
            root_cert: Some(std::fs::read(cert("ca.pem")).unwrap()),
        },
    )
    .unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// RabbitMQ and Redis over TLS: a worker on amqps:// with a Redis dedup store on
/// rediss://, both verified against the generated CA with a client certificate.
#[tokio::test]
async fn amqps_worker_with_rediss_dedup_processes_each_message_once() {
    let prefix = unique("redis");
    let store = RedisStore::builder(REDISS)
        .tls(good())
        .prefix(prefix.clone())
        .connect()
        .await
        .unwrap();
    let (consumer, effects) = counting_consumer("tls-redis", store);
    amqps_round_trip(consumer, effects).await;
    delete_redis_keys(&prefix).await;
}

/// RabbitMQ and PostgreSQL over TLS: a worker on amqps:// with a PostgreSQL dedup
/// store whose pool connects with sslmode=verify-full and a client certificate.
#[tokio::test]
async fn amqps_worker_with_postgres_tls_dedup_processes_each_message_once() {
    let options = idem_sql::tls::pg_connect_options(PG, &good()).unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    let ssl: bool = sqlx::query_scalar("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl, "the pool's connection is not encrypted");
    let table = format!("idem_tls_{}", uuid::Uuid::new_v4().simple());
    let store = idem_sql::PgStore::with_table_name(pool.clone(), &table).unwrap();
    store.ensure_schema().await.unwrap();
    let (consumer, effects) = counting_consumer("tls-pg", store);
    amqps_round_trip(consumer, effects).await;
    sqlx::query(&format!("drop table {table}"))
        .execute(&pool)
        .await
        .unwrap();
}

async fn amqps_error(url: &str, tls: &TlsConfig) -> AmqpError {
    match idem_amqp::connect_tls(url, "idem-tls-refused", tls).await {
        Ok(_) => panic!("connected to {url} with {tls:?}, expected a refusal"),
        Err(e) => {
            eprintln!("amqps {url}: {e}");
            e
        }
    }
}

fn assert_tls(err: &AmqpError, want: TlsFailure) {
    match err {
        AmqpError::Tls { failure, .. } => assert_eq!(*failure, want, "{err}"),
        other => panic!("expected a TLS error ({want}), got: {other}"),
    }
    assert!(!err.to_string().contains("guest:guest"), "{err}");
}

#[tokio::test]
async fn amqps_refuses_unknown_ca_wrong_host_and_missing_client_cert() {
    // The control: the same connection with the right settings works.
    let conn = idem_amqp::connect_tls(AMQPS, "idem-tls-ok", &good())
        .await
        .unwrap();
    conn.close(200, "bye".into()).await.unwrap();

    assert_tls(
        &amqps_error(AMQPS, &other_ca()).await,
        TlsFailure::UnknownCa,
    );
    assert_tls(
        &amqps_error(AMQPS, &system_roots()).await,
        TlsFailure::UnknownCa,
    );
    assert_tls(
        &amqps_error(AMQPS_BY_IP, &good()).await,
        TlsFailure::WrongHostName,
    );
    // TLS 1.3: the client finishes its handshake before the server checks the client
    // certificate; the server's alert may be lost to the reset that follows it.
    let err = amqps_error(AMQPS, &no_client_cert()).await;
    match &err {
        AmqpError::Tls { failure, .. } => assert!(
            matches!(
                failure,
                TlsFailure::ClientCertificateRefused | TlsFailure::ClosedDuringHandshake
            ),
            "{err}"
        ),
        other => panic!("expected a TLS error, got: {other}"),
    }
}

async fn rediss_error(url: &str, tls: TlsConfig) -> String {
    let result = RedisStore::builder(url)
        .tls(tls)
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await;
    match result {
        Ok(_) => panic!("connected to {url}, expected a refusal"),
        Err(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("rediss {url}: {text}");
            text
        }
    }
}

#[tokio::test]
async fn rediss_refuses_unknown_ca_wrong_host_and_missing_client_cert() {
    let prefix = unique("redis-ok");
    let store = RedisStore::builder(REDISS)
        .tls(good())
        .prefix(prefix)
        .connect()
        .await
        .unwrap();
    drop(store);

    let e = rediss_error(REDISS, other_ca()).await;
    assert_eq!(TlsFailure::classify(&e), Some(TlsFailure::UnknownCa), "{e}");
    assert!(e.contains("TLS handshake with Redis failed"), "{e}");
    let e = rediss_error(REDISS, system_roots()).await;
    assert_eq!(TlsFailure::classify(&e), Some(TlsFailure::UnknownCa), "{e}");
    let e = rediss_error(REDISS_BY_IP, good()).await;
    assert_eq!(
        TlsFailure::classify(&e),
        Some(TlsFailure::WrongHostName),
        "{e}"
    );
    // TLS 1.3: the server's alert, or the reset that may overtake it; both are
    // reported as a TLS failure naming the client certificate.
    let e = rediss_error(REDISS, no_client_cert()).await;
    assert!(e.contains("TLS handshake with Redis failed"), "{e}");
    assert!(e.contains("client certificate refused"), "{e}");
    // Verification cannot be turned off for Redis.
    let e = rediss_error(REDISS, good().danger_accept_invalid_certs()).await;
    assert!(e.contains("without certificate verification"), "{e}");
}

/// A server certificate that has expired is refused, and said to be expired.
#[tokio::test]
async fn rediss_refuses_an_expired_certificate() {
    services();
    let tls = TlsConfig::new().with_ca_file(cert("ca.pem")).unwrap();
    let e = rediss_error("rediss://localhost:6391", tls).await;
    assert_eq!(TlsFailure::classify(&e), Some(TlsFailure::Expired), "{e}");
    assert!(e.contains("certificate expired or not yet valid"), "{e}");
}

async fn pg_error(url: &str, tls: &TlsConfig) -> String {
    let options = idem_sql::tls::pg_connect_options(url, tls).unwrap();
    match options.connect().await {
        Ok(_) => panic!("connected to {url}, expected a refusal"),
        Err(e) => {
            eprintln!("postgres {url}: {e}");
            e.to_string()
        }
    }
}

#[tokio::test]
async fn postgres_tls_refuses_unknown_ca_wrong_host_and_missing_client_cert() {
    let options = idem_sql::tls::pg_connect_options(PG, &good()).unwrap();
    let mut conn = sqlx::PgConnection::connect_with(&options).await.unwrap();
    conn.ping().await.unwrap();
    conn.close().await.unwrap();

    let e = pg_error(PG, &other_ca()).await;
    assert_eq!(TlsFailure::classify(&e), Some(TlsFailure::UnknownCa), "{e}");
    let e = pg_error(PG, &system_roots()).await;
    assert_eq!(TlsFailure::classify(&e), Some(TlsFailure::UnknownCa), "{e}");
    let e = pg_error(PG_BY_IP, &good()).await;
    assert_eq!(
        TlsFailure::classify(&e),
        Some(TlsFailure::WrongHostName),
        "{e}"
    );
    let e = pg_error(PG, &no_client_cert()).await;
    assert_eq!(
        TlsFailure::classify(&e),
        Some(TlsFailure::ClientCertificateRefused),
        "{e}"
    );
}

/// `sslmode=require` with plain sqlx encrypts without checking the certificate; idem's
/// connect options verify it (as verify-full).
#[tokio::test]
async fn postgres_sslmode_require_is_verified() {
    services();
    let url = format!(
        "postgres://postgres@localhost:5442/postgres?sslmode=require&sslcert={}&sslkey={}",
        cert("client.pem").display(),
        cert("client.key").display()
    );
    // Plain sqlx: connects although nothing vouches for the server.
    let unverified = sqlx::PgConnection::connect(&url).await.unwrap();
    unverified.close().await.unwrap();
    // idem: the server's certificate must chain to a trusted CA.
    let e = pg_error(&url, &TlsConfig::default()).await;
    assert_eq!(TlsFailure::classify(&e), Some(TlsFailure::UnknownCa), "{e}");
    let url_with_ca = format!("{url}&sslrootcert={}", cert("ca.pem").display());
    let options = idem_sql::tls::pg_connect_options(&url_with_ca, &TlsConfig::default()).unwrap();
    let conn = sqlx::PgConnection::connect_with(&options).await.unwrap();
    conn.close().await.unwrap();
}

/// The outbox relay reads a PostgreSQL outbox over TLS and publishes to RabbitMQ over
/// amqps://; with a CA that does not vouch for the broker it publishes nothing and says
/// why.
#[tokio::test]
async fn outbox_relay_publishes_over_amqps_from_postgres_tls() {
    let tls = good();
    let options = idem_sql::tls::pg_connect_options(PG, &tls).unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .connect_with(options)
        .await
        .unwrap();
    let table = format!("idem_tls_outbox_{}", uuid::Uuid::new_v4().simple());
    let outbox = idem_outbox::Outbox::new(&table).unwrap();
    outbox.ensure_schema(&pool).await.unwrap();

    let admin = idem_amqp::connect_tls(AMQPS, "idem-tls-test-admin", &tls)
        .await
        .unwrap();
    let ch = admin.create_channel().await.unwrap();
    let queue = unique("outbox");
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let mut tx = pool.begin().await.unwrap();
    for i in 0..3 {
        let msg = idem_outbox::OutboxMessage::new("", queue.as_str(), format!("m{i}"));
        outbox.enqueue(&mut tx, msg).await.unwrap();
    }
    tx.commit().await.unwrap();
    let relay = idem_outbox::Relay::builder(pool.clone(), outbox, AMQPS)
        .tls(tls.clone())
        .build();
    let stats = relay.drain().await.unwrap();
    assert_eq!(stats.published, 3);
    let depth = ch
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count();
    assert_eq!(depth, 3);

    // The wrong CA: nothing is published, the error names the TLS cause.
    let outbox = idem_outbox::Outbox::new(&table).unwrap();
    let mut tx = pool.begin().await.unwrap();
    let msg = idem_outbox::OutboxMessage::new("", queue.as_str(), "m3");
    outbox.enqueue(&mut tx, msg).await.unwrap();
    tx.commit().await.unwrap();
    let relay = idem_outbox::Relay::builder(pool.clone(), outbox, AMQPS)
        .tls(other_ca())
        .build();
    let err = relay.drain().await.unwrap_err().to_string();
    assert!(err.contains("unknown CA"), "{err}");
    assert!(!err.contains("guest:guest"), "{err}");

    ch.queue_delete(queue.as_str().into(), Default::default())
        .await
        .unwrap();
    let _ = admin.close(200, "bye".into()).await;
    sqlx::query(&format!("drop table {table}"))
        .execute(&pool)
        .await
        .unwrap();
}
