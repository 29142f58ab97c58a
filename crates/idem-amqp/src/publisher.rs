//! Publishing with publisher confirms: the one publish path of idem (the outbox relay
//! and the `idem dlq replay` command publish through [`Publisher`] too).
//!
//! Every publish is `mandatory` and waits for the broker's confirm: it returns `Ok` only
//! once the broker has taken responsibility for the message. A message that no queue
//! receives comes back as [`Error::Returned`]; a negative confirm is [`Error::Nacked`].
//! A missing `message_id` is set to a UUIDv7 in the caller's [`Message`] before the
//! first try, so re-publishing after an error reuses it and consumers dedup the copy.
//! Headers are encoded by [`crate::headers`] (one rule for every publisher of idem).
//!
//! A publish names an exchange and a routing key: `publish("", "charges", ..)` goes to
//! queue `charges` through the default exchange; `publish("orders", "order.created",
//! ..)` goes to every queue bound to exchange `orders` with a matching key (declared
//! with [`Topology::exchange`](crate::Topology::exchange) and
//! [`Topology::bind`](crate::Topology::bind); see [`crate::topology::exchange`]). A
//! publish that no binding matches is [`Error::Returned`], never silently dropped.
//!
//! A [`Publisher`] is built with [`Publisher::builder`]:
//!
//! ```no_run
//! # async fn demo() -> Result<(), idem_amqp::Error> {
//! use idem_amqp::Publisher;
//! let publisher = Publisher::builder("amqp://guest:guest@mq1:5672/%2f,amqp://guest:guest@mq2:5672/%2f")
//!     .connection_name("billing-api")
//!     .connect() // or .build(): connect on the first publish
//!     .await?;
//! # Ok(()) }
//! ```

use idem_core::Message;
use idem_core::TlsConfig;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use tokio::sync::Mutex;

use crate::convert::properties_for;
use crate::endpoints::Endpoints;
use crate::error::Error;
use crate::topology::short;

/// Opens a connection named `name` (visible in the management UI and
/// `rabbitmqctl list_connections name`) to the first URL of `urls` (one URL or a
/// comma-separated list) that answers (see [`crate::endpoints`]). Errors never contain
/// a password. An `amqps://` URL is verified against the system roots; use
/// [`connect_tls`](crate::connect_tls) for a private CA or a client certificate.
pub async fn connect(urls: &str, name: &str) -> Result<Connection, Error> {
    crate::tls::connect_tls(urls, name, &TlsConfig::default()).await
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

/// One message of [`Publisher::publish_each`], with its own destination.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// The exchange (`""` is the default exchange).
    pub exchange: String,
    /// The routing key (with the default exchange: the queue name).
    pub routing_key: String,
    /// The message; a missing `message_id` is set here before the first try.
    pub message: Message,
}

impl Outgoing {
    /// `message` for `exchange` and `routing_key`.
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        message: Message,
    ) -> Self {
        Outgoing {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            message,
        }
    }
}

/// One message of [`Publisher::publish_raw_each`]: body and AMQP properties published
/// as given.
#[derive(Clone, Debug)]
pub struct RawOutgoing<'a> {
    /// The exchange (`""` is the default exchange).
    pub exchange: &'a str,
    /// The routing key.
    pub routing_key: &'a str,
    /// The body.
    pub body: &'a [u8],
    /// The AMQP properties, headers included, as they go on the wire.
    pub properties: BasicProperties,
}

/// Configures a [`Publisher`]. See [`Publisher::builder`].
#[derive(Debug)]
pub struct PublisherBuilder {
    endpoints: Endpoints,
    connection_name: String,
    tls: TlsConfig,
    max_in_flight: usize,
}

impl PublisherBuilder {
    /// Default of [`max_in_flight`](Self::max_in_flight): 1000 messages.
    pub const DEFAULT_MAX_IN_FLIGHT: usize = 1000;

    /// Connection name shown by the broker (default `idem-publisher`).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// TLS settings for `amqps://` URLs (see [`crate::tls`]); reconnections reuse
    /// them. Default: verified against the system roots.
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = tls;
        self
    }

    /// Most messages of one [`Publisher::publish_batch`] published and not yet
    /// confirmed (default [`DEFAULT_MAX_IN_FLIGHT`](Self::DEFAULT_MAX_IN_FLIGHT); 0 counts as
    /// 1). A larger batch
    /// goes out in windows of this size: each window is published whole, then its
    /// confirms are awaited, then the next window starts. This bounds what the broker
    /// and the client buffer for one call (at most this many messages) at the cost of
    /// one confirm round trip per window.
    pub fn max_in_flight(mut self, messages: usize) -> Self {
        self.max_in_flight = messages.max(1);
        self
    }

    /// The publisher, connecting on its first publish (a broker that is down now is
    /// not an error yet; each publish then fails until it is back).
    pub fn build(self) -> Publisher {
        Publisher {
            endpoints: self.endpoints,
            name: self.connection_name,
            tls: self.tls,
            link: Mutex::new(None),
            borrowed: false,
            max_in_flight: self.max_in_flight,
        }
    }

    /// The publisher, connected now: fails fast if no endpoint answers.
    pub async fn connect(self) -> Result<Publisher, Error> {
        let publisher = self.build();
        publisher.channel().await?;
        Ok(publisher)
    }
}

/// A confirm-mode channel on its own connection, reopened on the next publish after
/// the connection is lost (from the next endpoint, see [`crate::endpoints`]).
pub struct Publisher {
    endpoints: Endpoints,
    name: String,
    tls: TlsConfig,
    link: Mutex<Option<(Option<Connection>, Channel)>>,
    /// Publishing on a channel of the caller's connection: never reconnects.
    borrowed: bool,
    /// Window of [`Publisher::publish_batch`].
    max_in_flight: usize,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("endpoints", &self.endpoints)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher for `endpoints` (one URL, a comma-separated list or an
    /// [`Endpoints`] value), to configure and then [`connect`](PublisherBuilder::connect)
    /// or [`build`](PublisherBuilder::build).
    pub fn builder(endpoints: impl Into<Endpoints>) -> PublisherBuilder {
        PublisherBuilder {
            endpoints: endpoints.into(),
            connection_name: "idem-publisher".to_owned(),
            tls: TlsConfig::default(),
            max_in_flight: PublisherBuilder::DEFAULT_MAX_IN_FLIGHT,
        }
    }

    /// Shorthand for `Publisher::builder(urls).connect()` (one URL or a
    /// comma-separated list): default name and TLS settings, fails fast if no URL
    /// answers.
    pub async fn connect(urls: &str) -> Result<Self, Error> {
        Self::builder(urls).connect().await
    }

    /// A publisher on `channel`, a channel of a connection the caller already holds
    /// (the `idem` CLI publishes its replays next to its reads this way). The channel
    /// is put in confirm mode. Such a publisher never reconnects: once the channel is
    /// closed, every publish fails with [`Error::Connect`].
    pub async fn on_channel(channel: Channel) -> Result<Self, Error> {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(Error::amqp("confirm.select"))?;
        Ok(Publisher {
            endpoints: Endpoints::parse(""),
            name: String::new(),
            tls: TlsConfig::default(),
            link: Mutex::new(Some((None, channel))),
            borrowed: true,
            max_in_flight: PublisherBuilder::DEFAULT_MAX_IN_FLIGHT,
        })
    }

    async fn channel(&self) -> Result<Channel, Error> {
        let mut link = self.link.lock().await;
        if let Some((conn, ch)) = link.as_ref() {
            if conn.as_ref().is_none_or(|c| c.status().connected()) && ch.status().connected() {
                return Ok(ch.clone());
            }
            if !self.borrowed {
                tracing::warn!(endpoints = %self.endpoints, "publisher connection lost; reconnecting");
            }
        }
        if self.borrowed {
            return Err(Error::Connect {
                url: "(the caller's connection)".to_owned(),
                detail: "the publisher's channel is closed".to_owned(),
            });
        }
        *link = None;
        let (conn, url) = self
            .endpoints
            .connect_indexed(&self.name, &self.tls)
            .await?;
        let opened = async {
            let ch = conn
                .create_channel()
                .await
                .map_err(Error::amqp("channel.open"))?;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(Error::amqp("confirm.select"))?;
            Ok::<_, Error>(ch)
        }
        .await;
        match opened {
            Ok(ch) => {
                tracing::debug!(%url, connection = %self.name, "publisher channel open");
                *link = Some((Some(conn), ch.clone()));
                Ok(ch)
            }
            Err(e) => {
                let _ = conn.close(200, "setup failed".into()).await;
                Err(e)
            }
        }
    }

    /// Forgets a connection that failed, so the next publish opens a new one (from
    /// the next endpoint).
    async fn drop_link(&self) {
        if self.borrowed {
            return;
        }
        if let Some((Some(conn), _)) = self.link.lock().await.take() {
            if conn.status().connected() {
                let _ = conn.close(200, "publish failed".into()).await;
            }
        }
    }

    /// Publishes `msg` (persistent, mandatory) and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        msg: &mut Message,
    ) -> Result<(), Error> {
        let mut results = self
            .publish_routed(std::iter::once((exchange, routing_key, msg)))
            .await?;
        results.pop().unwrap_or(Ok(()))
    }

    /// Publishes every message to one destination with publisher confirms, pipelined:
    /// up to [`max_in_flight`](PublisherBuilder::max_in_flight) messages are
    /// published back to back, then their confirms are awaited together, window after
    /// window, in order on one channel. Much faster than one
    /// [`publish`](Self::publish) at a time (one confirm round trip per window, not
    /// per message).
    ///
    /// Returns `Ok(())` once every message is confirmed. Otherwise it returns the
    /// **first failure** (in slice order) inside [`Error::Batch`], with how many
    /// messages were not confirmed; [`publish_each`](Self::publish_each) gives one
    /// result per message instead. A message the broker refused
    /// ([`Error::Returned`], [`Error::Nacked`]) or that could not be encoded
    /// ([`Error::NameTooLong`]) does not stop the batch. A channel or connection
    /// failure ([`Error::Amqp`], e.g. a publish to an exchange that does not exist,
    /// which makes the broker close the channel) does: the later windows are not
    /// sent and count as failed, and the next call reconnects. Publishing the same
    /// slice again is safe: every message got its `message_id` before its first try,
    /// so consumers dedup the copies.
    ///
    /// The outer error is returned as is (not in [`Error::Batch`]) when no channel
    /// could be opened for the first window: nothing was sent.
    ///
    /// ```no_run
    /// # async fn demo(publisher: &idem_amqp::Publisher) -> Result<(), idem_amqp::Error> {
    /// use idem_core::Message;
    /// let mut msgs: Vec<Message> = (0..10_000)
    ///     .map(|i| Message::new(format!("{{\"n\":{i}}}")))
    ///     .collect();
    /// publisher.publish_batch("", "orders", &mut msgs).await?;
    /// # Ok(()) }
    /// ```
    pub async fn publish_batch(
        &self,
        exchange: &str,
        routing_key: &str,
        msgs: &mut [Message],
    ) -> Result<(), Error> {
        let total = msgs.len();
        let mut failed = 0;
        let mut first = None;
        let mut sent = 0;
        for window in msgs.chunks_mut(self.max_in_flight.max(1)) {
            let size = window.len();
            let results = match self
                .publish_routed(window.iter_mut().map(|m| (exchange, routing_key, m)))
                .await
            {
                Ok(results) => results,
                Err(e) if sent == 0 => return Err(e),
                Err(e) => {
                    first.get_or_insert(e);
                    failed += total - sent;
                    break;
                }
            };
            sent += size;
            let mut transport_failed = false;
            for result in results {
                if let Err(e) = result {
                    transport_failed |= matches!(e, Error::Amqp { .. });
                    failed += 1;
                    first.get_or_insert(e);
                }
            }
            if transport_failed {
                // The channel is gone: the rest was not sent.
                failed += total - sent;
                break;
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

    /// Publishes every message of `batch`, in order, on one channel (so the broker
    /// receives them in that order), each to its own destination, then waits for all
    /// confirms together. Returns one result per message, in the same order:
    ///
    /// - `Ok(())`: confirmed;
    /// - [`Error::Returned`] / [`Error::Nacked`]: the broker refused that message;
    /// - [`Error::NameTooLong`]: it could not be encoded (a name over 255 bytes, see
    ///   [`crate::headers`]) and was not sent;
    /// - [`Error::Amqp`]: the channel or connection failed; the message may or may not
    ///   have reached the broker (publish it again: same `message_id`). The next call
    ///   reconnects, from the next endpoint.
    ///
    /// The outer `Err` means no channel could be opened: nothing was sent.
    pub async fn publish_each(
        &self,
        batch: &mut [Outgoing],
    ) -> Result<Vec<Result<(), Error>>, Error> {
        self.publish_routed(
            batch
                .iter_mut()
                .map(|o| (o.exchange.as_str(), o.routing_key.as_str(), &mut o.message)),
        )
        .await
    }

    /// Like [`publish_each`](Self::publish_each), for messages whose AMQP properties
    /// are given as they are (headers of any AMQP type included), not built from an
    /// idem [`Message`]: moving a message between queues unchanged, as `idem dlq
    /// replay` does ([`crate::replay`] says which headers change).
    pub async fn publish_raw_each(
        &self,
        batch: &[RawOutgoing<'_>],
    ) -> Result<Vec<Result<(), Error>>, Error> {
        let ch = self.channel().await?;
        let mut pending = Vec::with_capacity(batch.len());
        for m in batch {
            let started =
                start_publish(&ch, m.exchange, m.routing_key, m.body, m.properties.clone()).await;
            pending.push((started, m.exchange, m.routing_key));
        }
        Ok(self.settle(pending).await)
    }

    /// The one publish path: publish all, then await all confirms.
    async fn publish_routed<'a>(
        &self,
        items: impl Iterator<Item = (&'a str, &'a str, &'a mut Message)>,
    ) -> Result<Vec<Result<(), Error>>, Error> {
        let ch = self.channel().await?;
        let mut pending = Vec::with_capacity(items.size_hint().0);
        for (exchange, routing_key, msg) in items {
            // The caller's trace context, unless the message has one (feature `otel`).
            #[cfg(feature = "otel")]
            idem_core::otel::inject_current(&mut msg.headers);
            let started = match properties_for(msg) {
                Ok(props) => start_publish(&ch, exchange, routing_key, &msg.body, props).await,
                Err(e) => Err(e),
            };
            pending.push((started, exchange, routing_key));
        }
        Ok(self.settle(pending).await)
    }

    /// Awaits the confirms of `pending`, in order; forgets the connection if it failed.
    async fn settle(
        &self,
        pending: Vec<(Result<PublisherConfirm, Error>, &str, &str)>,
    ) -> Vec<Result<(), Error>> {
        let mut results = Vec::with_capacity(pending.len());
        let mut transport_failed = false;
        for (started, exchange, routing_key) in pending {
            let result = match started {
                Ok(confirm) => finish(confirm, exchange, routing_key).await,
                Err(e) => Err(e),
            };
            transport_failed |= matches!(result, Err(Error::Amqp { .. }));
            results.push(result);
        }
        if transport_failed {
            self.drop_link().await;
        }
        results
    }

    /// Closes the connection (or, for [`on_channel`](Self::on_channel), the channel).
    pub async fn close(self) {
        match self.link.into_inner() {
            Some((Some(conn), _)) => {
                let _ = conn.close(200, "bye".into()).await;
            }
            Some((None, ch)) if ch.status().connected() => {
                let _ = ch.close(200, "bye".into()).await;
            }
            _ => {}
        }
    }
}
