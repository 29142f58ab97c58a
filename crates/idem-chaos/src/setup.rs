//! What a run creates and removes (its tables, queues and Redis keys) and the
//! controller's own connections to the services.

use idem_outbox::Outbox;
use sqlx::PgPool;

use crate::common::{self, BoxError, Names};

pub(crate) struct Admin {
    pub(crate) pg: PgPool,
    pub(crate) amqp: Option<lapin::Connection>,
    pub(crate) redis: Option<redis::aio::ConnectionManager>,
    pub(crate) name: String,
}

impl Admin {
    pub(crate) async fn channel(&mut self) -> Result<lapin::Channel, BoxError> {
        if let Some(conn) = &self.amqp {
            if conn.status().connected() {
                if let Ok(ch) = conn.create_channel().await {
                    return Ok(ch);
                }
            }
        }
        let conn = common::rabbit(&self.name).await?;
        let ch = conn.create_channel().await?;
        self.amqp = Some(conn);
        Ok(ch)
    }

    pub(crate) async fn count(&self, sql: &str) -> Result<i64, BoxError> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pg).await?)
    }
}

/// Messages (ready + unacked) in the run's work and retry queues, by `rabbitmqctl`.
pub(crate) async fn undrained(names: &Names, dlq: &str) -> Result<u64, BoxError> {
    let out = crate::faults::rabbitmqctl(&["-q", "list_queues", "name", "messages"]).await?;
    let queue = names.queue();
    let retry = format!("{queue}.retry.");
    let mut total = 0;
    for line in out.lines() {
        let Some((name, messages)) = line.split_once('\t') else {
            continue;
        };
        let name = name.trim();
        if name != dlq && (name == queue || name.starts_with(&retry)) {
            total += messages.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Ok(total)
}

pub(crate) async fn create_tables(
    pg: &PgPool,
    names: &Names,
    outbox: bool,
) -> Result<(), BoxError> {
    let t = |k: &str| names.table(k);
    for sql in [
        format!("CREATE TABLE {} (msg_id TEXT PRIMARY KEY, poison BOOLEAN NOT NULL)", t("published")),
        format!(
            "CREATE TABLE {} (msg_id TEXT PRIMARY KEY, worker TEXT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
            t("effects")
        ),
        format!(
            "CREATE TABLE {} (msg_id TEXT NOT NULL, worker TEXT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
            t("invocations")
        ),
        format!(
            "CREATE TABLE {} (msg_id TEXT NOT NULL, worker TEXT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
            t("dupes")
        ),
    ] {
        sqlx::query(&sql).execute(pg).await?;
    }
    let inbox = idem_sql::PgInbox::new(pg.clone()).try_table(&t("inbox"))?;
    inbox.ensure_schema().await?;
    if outbox {
        Outbox::new(&t("outbox"))?.ensure_schema(pg).await?;
    }
    Ok(())
}

pub(crate) async fn cleanup(admin: &mut Admin, names: &Names) -> Result<(), BoxError> {
    for kind in [
        "published",
        "effects",
        "invocations",
        "dupes",
        "inbox",
        "outbox",
        "followups",
    ] {
        sqlx::query(&format!("DROP TABLE IF EXISTS {}", names.table(kind)))
            .execute(&admin.pg)
            .await?;
    }
    // The inbox's start counters (crash counting).
    sqlx::query(&format!(
        "DROP TABLE IF EXISTS {}_starts",
        names.table("inbox")
    ))
    .execute(&admin.pg)
    .await?;
    let ch = admin.channel().await?;
    common::topology(&names.queue()).delete_on(&ch).await?;
    if let Some(cluster) = common::cluster() {
        crate::cluster::delete_redis_keys(cluster, &names.redis_prefix()).await?;
    }
    if let Some(conn) = admin.redis.as_mut() {
        idem_testkit::tools::unlink_matching(conn, &format!("{}:*", names.redis_prefix())).await?;
    }
    Ok(())
}
