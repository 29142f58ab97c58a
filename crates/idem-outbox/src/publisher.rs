//! The relay's connection to RabbitMQ: one confirm-mode channel, reopened after any
//! failure.

use idem_core::redact::redact_url;
use idem_core::{HeaderValue, Headers, TlsConfig, TlsFailure};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use crate::error::OutboxError;

/// A row as the relay publishes it.
pub(crate) struct Row {
    pub(crate) id: i64,
    pub(crate) message_id: String,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) headers: Headers,
    pub(crate) content_type: Option<String>,
    pub(crate) body: Vec<u8>,
    pub(crate) ordering_key: Option<String>,
}

pub(crate) struct Publisher {
    url: String,
    tls: TlsConfig,
    conn: Option<(Connection, Channel)>,
}

fn broker_err(url: &str, what: &str, e: impl std::fmt::Display) -> OutboxError {
    // lapin errors do not include the URL, but make sure ours never does unredacted.
    OutboxError::Broker(format!("{what} ({}): {e}", redact_url(url)))
}

fn short(s: &str) -> Result<ShortString, String> {
    ShortString::try_new(s.to_owned())
        .map_err(|_| format!("{} bytes is over the AMQP short string limit", s.len()))
}

fn field_table(headers: &Headers) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in headers {
        let Ok(name) = ShortString::try_new(k.clone()) else {
            continue;
        };
        let value = match v {
            HeaderValue::String(s) => {
                AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
            }
            HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
            HeaderValue::Bool(b) => AMQPValue::Boolean(*b),
            HeaderValue::Bytes(b) => AMQPValue::LongString(LongString::from(b.clone())),
        };
        t.insert(name, value);
    }
    t
}

fn is_amqps(url: &str) -> bool {
    url.trim_start()
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("amqps://"))
}

/// Connects with `tls` for an `amqps://` URL; a TLS failure is named in the error.
async fn connect(
    url: &str,
    props: ConnectionProperties,
    tls: &TlsConfig,
) -> Result<Connection, OutboxError> {
    let tls_url = is_amqps(url);
    if tls_url && tls.accepts_invalid_certs() {
        return Err(broker_err(
            url,
            "connect",
            "certificate verification cannot be turned off for the broker; give its CA file instead",
        ));
    }
    let result = open(url, props, tls, tls_url).await;
    result.map_err(|e| {
        let text = idem_core::redact::redact_in(&e, url);
        match TlsFailure::classify_tls_connect(&text).filter(|_| tls_url) {
            Some(failure) => broker_err(
                url,
                "TLS handshake",
                format!("{failure} ({text}); {}", failure.hint()),
            ),
            None => broker_err(url, "connect", text),
        }
    })
}

#[cfg(feature = "tls")]
async fn open(
    url: &str,
    props: ConnectionProperties,
    tls: &TlsConfig,
    tls_url: bool,
) -> Result<Connection, String> {
    if !tls_url || tls.is_default() {
        return Connection::connect(url, props)
            .await
            .map_err(|e| e.to_string());
    }
    let config = lapin::tcp::OwnedTLSConfig {
        identity: tls
            .client_identity_pem()
            .map(|(cert, key)| lapin::tcp::OwnedIdentity::PKCS8 {
                pem: cert.to_vec(),
                key: key.to_vec(),
            }),
        cert_chain: tls
            .ca_pem()
            .map(|pem| String::from_utf8_lossy(pem).into_owned()),
    };
    let runtime = lapin::runtime::default_runtime().map_err(|e| e.to_string())?;
    Connection::connect_with_config(url, props, config, runtime)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "tls"))]
async fn open(
    url: &str,
    props: ConnectionProperties,
    _tls: &TlsConfig,
    tls_url: bool,
) -> Result<Connection, String> {
    if tls_url {
        return Err("this build of idem-outbox has no TLS support (enable its `tls` feature) and refuses to send plain AMQP to an amqps:// URL".to_owned());
    }
    Connection::connect(url, props)
        .await
        .map_err(|e| e.to_string())
}

impl Publisher {
    pub(crate) fn new(url: String) -> Self {
        Publisher {
            url,
            tls: TlsConfig::default(),
            conn: None,
        }
    }

    pub(crate) fn set_tls(&mut self, tls: TlsConfig) {
        self.tls = tls;
        self.conn = None;
    }

    async fn channel(&mut self) -> Result<Channel, OutboxError> {
        if let Some((conn, ch)) = &self.conn {
            if conn.status().connected() && ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        self.conn = None;
        let props =
            ConnectionProperties::default().with_connection_name("idem-outbox-relay".into());
        let conn = connect(&self.url, props, &self.tls).await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| broker_err(&self.url, "open channel", e))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| broker_err(&self.url, "confirm_select", e))?;
        tracing::info!(url = %redact_url(&self.url), "outbox relay connected to the broker");
        self.conn = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// Forgets the connection so the next call reconnects.
    pub(crate) fn reset(&mut self) {
        self.conn = None;
    }

    /// Publishes `rows` in order on one channel (so their order is kept), then waits
    /// for every confirm. Returns, per row, `Ok` or why it was not confirmed. An `Err`
    /// means the broker could not be used at all; nothing may be marked then.
    pub(crate) async fn publish(
        &mut self,
        rows: &[Row],
    ) -> Result<Vec<Result<(), String>>, OutboxError> {
        let ch = self.channel().await?;
        let mut pending = Vec::with_capacity(rows.len());
        for row in rows {
            let (exchange, routing_key) = match (short(&row.exchange), short(&row.routing_key)) {
                (Ok(e), Ok(r)) => (e, r),
                (Err(e), _) | (_, Err(e)) => {
                    pending.push(Err(e));
                    continue;
                }
            };
            let mut props = BasicProperties::default()
                .with_message_id(row.message_id.as_str().into())
                .with_delivery_mode(2)
                .with_headers(field_table(&row.headers));
            if let Some(ct) = row
                .content_type
                .as_deref()
                .and_then(|c| ShortString::try_new(c.to_owned()).ok())
            {
                props = props.with_content_type(ct);
            }
            let confirm = ch
                .basic_publish(
                    exchange,
                    routing_key,
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &row.body,
                    props,
                )
                .await;
            match confirm {
                Ok(c) => pending.push(Ok(c)),
                Err(e) => {
                    self.reset();
                    return Err(broker_err(&self.url, "publish", e));
                }
            }
        }
        let mut results = Vec::with_capacity(rows.len());
        for p in pending {
            results.push(match p {
                Err(invalid) => Err(invalid),
                Ok(confirm) => match confirm.await {
                    Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => Ok(()),
                    Ok(Confirmation::Ack(Some(ret))) => Err(format!(
                        "returned unroutable by the broker: {} {}",
                        ret.reply_code, ret.reply_text
                    )),
                    Ok(Confirmation::Nack(_)) => Err("nacked by the broker".to_owned()),
                    Err(e) => {
                        self.reset();
                        return Err(broker_err(&self.url, "publisher confirm", e));
                    }
                },
            });
        }
        Ok(results)
    }
}
