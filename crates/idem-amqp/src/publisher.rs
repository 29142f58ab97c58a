//! Publishing with publisher confirms.
//!
//! Every publish is `mandatory` and waits for the broker's confirm: it returns `Ok` only
//! once the broker has taken responsibility for the message. A message that no queue
//! receives comes back as [`Error::Returned`]; a negative confirm is [`Error::Nacked`].
//! A missing `message_id` is set to a UUIDv7 in the caller's [`Message`] before the
//! first try, so re-publishing after an error reuses it and consumers dedup the copy.

use idem_core::Message;
use idem_core::TlsConfig;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use tokio::sync::Mutex;

use crate::convert::properties_for;
use crate::error::Error;
use crate::tls::connect_tls;
use crate::topology::short;
use crate::url::redact_url;

/// Opens a connection named `name` (visible in the management UI and
/// `rabbitmqctl list_connections name`). Errors never contain the password.
/// An `amqps://` URL is verified against the system roots; use
/// [`connect_tls`] for a private CA or a client certificate.
pub async fn connect(url: &str, name: &str) -> Result<Connection, Error> {
    connect_tls(url, name, &TlsConfig::default()).await
}

/// Publishes one message on a confirm-mode channel and waits for the confirm.
pub(crate) async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), Error> {
    let confirm = start_publish(channel, exchange, routing_key, body, props).await?;
    finish(confirm, exchange, routing_key).await
}

async fn start_publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<PublisherConfirm, Error> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    channel
        .basic_publish(short(exchange)?, short(routing_key)?, options, body, props)
        .await
        .map_err(Error::amqp("basic.publish"))
}

async fn finish(confirm: PublisherConfirm, exchange: &str, routing_key: &str) -> Result<(), Error> {
    match confirm.await.map_err(Error::amqp("publisher confirm"))? {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(Error::Returned {
            code: returned.reply_code,
            text: returned.reply_text.to_string(),
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        }),
        Confirmation::Nack(_) => Err(Error::Nacked {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        }),
    }
}

/// A confirm-mode channel on its own connection, reopened on the next publish after
/// the connection is lost.
pub struct Publisher {
    url: String,
    name: String,
    tls: TlsConfig,
    link: Mutex<Option<(Connection, Channel)>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("url", &redact_url(&self.url))
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// Connects to `url` (fails fast if the broker is unreachable).
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::connect_named(url, "idem-publisher").await
    }

    /// Connects with a connection name.
    pub async fn connect_named(url: &str, name: &str) -> Result<Self, Error> {
        Self::connect_with_tls(url, name, TlsConfig::default()).await
    }

    /// Connects with a connection name and TLS settings for an `amqps://` URL (see
    /// [`crate::tls`]); reconnections reuse them.
    pub async fn connect_with_tls(url: &str, name: &str, tls: TlsConfig) -> Result<Self, Error> {
        let publisher = Publisher {
            url: url.to_owned(),
            name: name.to_owned(),
            tls,
            link: Mutex::new(None),
        };
        publisher.channel().await?;
        Ok(publisher)
    }

    async fn channel(&self) -> Result<Channel, Error> {
        let mut link = self.link.lock().await;
        if let Some((conn, ch)) = link.as_ref() {
            if conn.status().connected() && ch.status().connected() {
                return Ok(ch.clone());
            }
            tracing::warn!(url = %redact_url(&self.url), "publisher connection lost; reconnecting");
        }
        let conn = connect_tls(&self.url, &self.name, &self.tls).await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(Error::amqp("channel.open"))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(Error::amqp("confirm.select"))?;
        *link = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// Publishes `msg` (persistent, mandatory) and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        msg: &mut Message,
    ) -> Result<(), Error> {
        let props = properties_for(msg)?;
        let ch = self.channel().await?;
        publish_confirmed(&ch, exchange, routing_key, &msg.body, props).await
    }

    /// Publishes every message, then waits for all confirms: much faster than one
    /// [`publish`](Self::publish) at a time. Fails with [`Error::Batch`] if any message
    /// was not confirmed; publishing the same slice again is then safe (ids are kept).
    pub async fn publish_batch(
        &self,
        exchange: &str,
        routing_key: &str,
        msgs: &mut [Message],
    ) -> Result<(), Error> {
        let ch = self.channel().await?;
        let mut pending = Vec::with_capacity(msgs.len());
        for msg in msgs.iter_mut() {
            let props = properties_for(msg)?;
            pending.push(start_publish(&ch, exchange, routing_key, &msg.body, props).await);
        }
        let total = pending.len();
        let mut failed = 0;
        let mut first = None;
        for started in pending {
            let result = match started {
                Ok(confirm) => finish(confirm, exchange, routing_key).await,
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                failed += 1;
                first.get_or_insert(e);
            }
        }
        match first {
            None => Ok(()),
            Some(first) => Err(Error::Batch {
                failed,
                total,
                first: Box::new(first),
            }),
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        if let Some((conn, _)) = self.link.into_inner() {
            let _ = conn.close(200, "bye".into()).await;
        }
    }
}
