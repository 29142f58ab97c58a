//! Set-up shared by the outbox's tests: the services' URLs and connections, and a
//! fixture with a unique outbox table and queue that it removes again.
#![allow(dead_code)] // each test binary uses its own part of it

use std::time::Duration;

use idem_outbox::{Outbox, OutboxMessage};
use idem_testkit::Service;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeleteOptions};
use lapin::{Channel, Connection, ConnectionProperties};
use sqlx::PgPool;

/// `AMQP_URL`, or the local broker.
pub(crate) fn amqp_url() -> String {
    Service::RabbitMq.url()
}

/// A pool of 8 on the test PostgreSQL (`DATABASE_URL`), or a panic saying it is not
/// reachable.
pub(crate) async fn pg() -> PgPool {
    let url = Service::PostgreSql.url();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url)
        .await;
    Service::PostgreSql.expect_connected(&url, pool)
}

/// A connection to the test broker and a channel on it.
pub(crate) async fn rabbit() -> (Connection, Channel) {
    let url = amqp_url();
    let conn = Service::RabbitMq.expect_connected(
        &url,
        Connection::connect(&url, ConnectionProperties::default()).await,
    );
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// A connection named `name` (so `rabbitmqctl` can find it), a channel on it and a
/// fresh queue named after `tag`, declared.
pub(crate) async fn named_queue(name: &str, tag: &str) -> (Connection, Channel, String) {
    let url = amqp_url();
    let conn = Service::RabbitMq.expect_connected(&url, idem_amqp::connect(&url, name).await);
    let ch = conn.create_channel().await.unwrap();
    let queue = idem_testkit::unique(tag);
    idem_testkit::broker::declare_queue(&ch, &queue).await;
    (conn, ch, queue)
}

/// Enqueues `msg` into `outbox` in a transaction of its own and commits; the row's
/// message id.
pub(crate) async fn enqueue(pool: &PgPool, outbox: &Outbox, msg: OutboxMessage) -> uuid::Uuid {
    let mut tx = pool.begin().await.unwrap();
    let id = outbox.enqueue(&mut tx, msg).await.unwrap();
    tx.commit().await.unwrap();
    id
}

/// A unique outbox table and queue; `cleanup` removes both.
pub(crate) struct Fixture {
    /// A pool on the test PostgreSQL.
    pub(crate) pool: PgPool,
    /// The outbox, its table created.
    pub(crate) outbox: Outbox,
    /// 12 hex digits naming this fixture's table and queue.
    pub(crate) id: String,
    /// The queue the tests' messages go to, declared.
    pub(crate) queue: String,
    /// A channel on the test broker.
    pub(crate) ch: Channel,
    _conn: Connection,
}

impl Fixture {
    /// Table `idem_outbox_<tag><id>`, queue `idem-test-outbox-<tag>-<id>`.
    pub(crate) async fn new(tag: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let pool = pg().await;
        let outbox = Outbox::new(&format!("idem_outbox_{tag}{id}")).unwrap();
        outbox.ensure_schema(&pool).await.unwrap();
        let (conn, ch) = rabbit().await;
        let queue = format!("idem-test-outbox-{tag}-{id}");
        idem_testkit::broker::declare_queue(&ch, &queue).await;
        Fixture {
            pool,
            outbox,
            id,
            queue,
            ch,
            _conn: conn,
        }
    }

    /// Enqueues `msg` in a transaction of its own and commits.
    pub(crate) async fn enqueue(&self, msg: OutboxMessage) -> uuid::Uuid {
        enqueue(&self.pool, &self.outbox, msg).await
    }

    /// The queue's messages, in order, acked: waits up to 10 s for `expected` of them
    /// (a confirmed publish may take a moment to become visible to another connection's
    /// `basic.get`), then takes whatever else is there, so extra copies still show.
    pub(crate) async fn take(&self, expected: usize) -> Vec<lapin::message::Delivery> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        loop {
            let got = self
                .ch
                .basic_get(self.queue.as_str().into(), BasicGetOptions::default())
                .await
                .unwrap();
            match got {
                Some(m) => {
                    m.ack(BasicAckOptions::default()).await.unwrap();
                    out.push(m.delivery);
                }
                None if out.len() >= expected || tokio::time::Instant::now() > deadline => {
                    return out
                }
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Deletes the queue, the outbox table and `extra_tables`.
    pub(crate) async fn cleanup(self, extra_tables: &[String]) {
        self.ch
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        let mut tables = vec![self.outbox.table_name().to_owned()];
        tables.extend_from_slice(extra_tables);
        for t in tables {
            sqlx::query(&format!("DROP TABLE IF EXISTS {t}"))
                .execute(&self.pool)
                .await
                .unwrap();
        }
    }
}

/// A delivery's message id ("" when it has none).
pub(crate) fn message_id(d: &lapin::message::Delivery) -> String {
    d.properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default()
}
