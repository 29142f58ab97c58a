//! Broker helpers: connecting with a timeout, probing queues without side effects.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};

use crate::error::CliError;

/// How long [`connect`] waits for each broker URL before trying the next one (or
/// giving up).
pub const CONNECT_TIMEOUT: Duration = idem_amqp::Endpoints::ATTEMPT_TIMEOUT;

/// Connects to RabbitMQ as connection `idem-cli`. `url` is one AMQP URL or a
/// comma-separated list (the first that answers is used, see
/// [`idem_amqp::endpoints`]). An unreachable broker is [`CliError::Unreachable`]; the
/// error never contains a password.
pub async fn connect(url: &str) -> Result<Connection, CliError> {
    connect_tls(url, &idem_core::TlsConfig::default()).await
}

/// [`connect`] with TLS settings for `amqps://` URLs. A refused certificate is
/// [`CliError::Tls`].
pub async fn connect_tls(url: &str, tls: &idem_core::TlsConfig) -> Result<Connection, CliError> {
    connect_as(url, DEFAULT_CONNECTION_NAME, tls).await
}

/// The connection name of the CLI's broker connections unless `--connection-name`
/// gives one.
pub const DEFAULT_CONNECTION_NAME: &str = "idem-cli";

/// [`connect_tls`] with the connection name `name` (shown by the broker).
pub async fn connect_as(
    url: &str,
    name: &str,
    tls: &idem_core::TlsConfig,
) -> Result<Connection, CliError> {
    Ok(idem_amqp::connect_tls(url, name, tls).await?)
}

/// Where and as whom a command connects: the broker URL(s) (`--url`), the connection
/// name and the TLS settings.
#[derive(Clone, Copy)]
pub(crate) struct Target<'a> {
    pub(crate) url: &'a str,
    pub(crate) name: &'a str,
    pub(crate) tls: &'a idem_core::TlsConfig,
}

impl std::fmt::Debug for Target<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &idem_core::redact::redact_url(self.url))
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Target<'_> {
    /// [`connect_as`] this target.
    pub(crate) async fn connect(&self) -> Result<Connection, CliError> {
        connect_as(self.url, self.name, self.tls).await
    }

    /// Connects, runs `f` on the connection, then closes it whatever `f` returned.
    pub(crate) async fn with_connection<T>(
        &self,
        f: impl AsyncFnOnce(&Connection) -> Result<T, CliError>,
    ) -> Result<T, CliError> {
        let conn = self.connect().await?;
        let result = f(&conn).await;
        let _ = conn.close(200, "bye".into()).await;
        result
    }
}

/// A queue name as an AMQP short string.
pub(crate) fn queue_name(name: &str) -> Result<ShortString, CliError> {
    ShortString::try_new(name).map_err(|_| {
        CliError::Usage(format!(
            "queue name too long for AMQP (max 255 bytes): {name:?}"
        ))
    })
}

/// Depth and consumers of an existing queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueCounts {
    /// Ready messages (not counting unacknowledged ones).
    pub messages: u32,
    /// Consumers.
    pub consumers: u32,
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if *p.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}

/// Passive declare of `queue` on `channel`: `Ok(None)` if it does not exist (the broker
/// then closes `channel`, so use a channel of its own).
pub(crate) async fn passive_declare(
    channel: &Channel,
    queue: &str,
) -> Result<Option<QueueCounts>, CliError> {
    let name = queue_name(queue)?;
    let options = QueueDeclareOptions::default().passive();
    match channel
        .queue_declare(name, options, FieldTable::default())
        .await
    {
        Ok(q) => Ok(Some(QueueCounts {
            messages: q.message_count(),
            consumers: q.consumer_count(),
        })),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(CliError::amqp("queue.declare (passive)")(e)),
    }
}

/// Probes `queue` on a throwaway channel: `None` if it does not exist.
pub async fn probe(conn: &Connection, queue: &str) -> Result<Option<QueueCounts>, CliError> {
    let channel = open_channel(conn).await?;
    let found = passive_declare(&channel, queue).await?;
    if found.is_some() {
        close_channel(&channel).await;
    }
    Ok(found)
}

/// Whether `exchange` exists (passive declare on a throwaway channel; nothing is
/// created).
pub async fn exchange_exists(conn: &Connection, exchange: &str) -> Result<bool, CliError> {
    let channel = open_channel(conn).await?;
    let name = ShortString::try_new(exchange).map_err(|_| {
        CliError::Usage(format!(
            "exchange name too long for AMQP (max 255 bytes): {exchange:?}"
        ))
    })?;
    let options = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    match channel
        .exchange_declare(
            name,
            lapin::ExchangeKind::Direct,
            options,
            FieldTable::default(),
        )
        .await
    {
        Ok(()) => {
            close_channel(&channel).await;
            Ok(true)
        }
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(CliError::amqp("exchange.declare (passive)")(e)),
    }
}

pub(crate) async fn open_channel(conn: &Connection) -> Result<Channel, CliError> {
    conn.create_channel()
        .await
        .map_err(CliError::amqp("channel.open"))
}

/// Closes a channel; RabbitMQ requeues its unacknowledged messages in their original
/// order (ahead of later messages).
pub(crate) async fn close_channel(channel: &Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "bye".into()).await;
    }
}
