//! Exchanges and bindings of a [`Topology`](super::Topology): how messages published
//! to an exchange reach the work queue of each consuming service.
//!
//! Each consuming service has its own [`Topology`](super::Topology) (its own work
//! queue, delay queues and DLQ) and binds its work queue to the exchanges it listens
//! to ([`Topology::bind`](super::Topology::bind)). A publisher publishes to the
//! exchange by name with a routing key; the broker hands a copy to every bound queue
//! whose binding matches. Retry copies and replays never go through the exchange:
//! they go to the failing consumer's own queue through the default exchange (see the
//! [topology docs](super)).
//!
//! idem declares exchanges durable and not auto-deleted. It declares the exchanges a
//! topology names with [`Topology::exchange`](super::Topology::exchange) and the
//! bindings it names with [`Topology::bind`](super::Topology::bind); it never deletes
//! an exchange and never removes a binding by itself (a binding dropped from the
//! configuration stays until an operator removes it, e.g. `rabbitmqctl` or the
//! management UI).

use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions};
use lapin::types::FieldTable;
use lapin::Channel;

use crate::error::Error;

/// The routing of an exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExchangeKind {
    /// A copy to every queue bound with exactly the message's routing key.
    Direct,
    /// A copy to every queue whose binding pattern matches the routing key (words
    /// separated by `.`; `*` matches one word, `#` zero or more).
    Topic,
    /// A copy to every bound queue; routing keys are ignored.
    Fanout,
}

impl ExchangeKind {
    /// The AMQP exchange type: `direct`, `topic` or `fanout`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Fanout => "fanout",
        }
    }

    /// Parses `direct`, `topic` or `fanout` (case-insensitive).
    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "direct" => Some(ExchangeKind::Direct),
            "topic" => Some(ExchangeKind::Topic),
            "fanout" => Some(ExchangeKind::Fanout),
            _ => None,
        }
    }

    fn lapin(self) -> lapin::ExchangeKind {
        match self {
            ExchangeKind::Direct => lapin::ExchangeKind::Direct,
            ExchangeKind::Topic => lapin::ExchangeKind::Topic,
            ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        }
    }
}

impl std::fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An exchange a [`Topology`](super::Topology) declares: durable, not auto-deleted.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Exchange {
    name: String,
    kind: ExchangeKind,
}

impl Exchange {
    /// An exchange named `name` of `kind`.
    pub fn new(name: impl Into<String>, kind: ExchangeKind) -> Self {
        Exchange {
            name: name.into(),
            kind,
        }
    }

    /// A direct exchange.
    pub fn direct(name: impl Into<String>) -> Self {
        Self::new(name, ExchangeKind::Direct)
    }

    /// A topic exchange.
    pub fn topic(name: impl Into<String>) -> Self {
        Self::new(name, ExchangeKind::Topic)
    }

    /// A fanout exchange.
    pub fn fanout(name: impl Into<String>) -> Self {
        Self::new(name, ExchangeKind::Fanout)
    }

    /// The exchange's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The exchange's routing.
    pub fn kind(&self) -> ExchangeKind {
        self.kind
    }

    /// Refuses names the broker would refuse: the default exchange (`""`, which
    /// cannot be declared) and the reserved `amq.` prefix.
    pub(crate) fn check(&self) -> Result<(), Error> {
        super::short(&self.name)?;
        if self.name.is_empty() || self.name.starts_with("amq.") {
            return Err(Error::Topology(format!(
                "exchange {:?} cannot be declared: the default exchange and the names starting with \"amq.\" belong to the broker (bind to an amq.* exchange with Topology::bind without declaring it)",
                self.name
            )));
        }
        Ok(())
    }

    /// Declares the exchange on `channel` (idempotent). An exchange that exists with
    /// another type or other flags is [`Error::ExchangeInequivalent`].
    pub async fn declare_on(&self, channel: &Channel) -> Result<(), Error> {
        self.check()?;
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                super::short(&self.name)?,
                self.kind.lapin(),
                options,
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                if crate::error::is_precondition_failed(&e) {
                    Error::ExchangeInequivalent {
                        exchange: self.name.clone(),
                        detail: e.to_string(),
                        hint: format!(
                            "idem declares it durable, of type {}; declare it with the type it was created with, or delete it once nothing publishes to it (management UI, or `rabbitmqadmin delete exchange name={}`)",
                            self.kind, self.name
                        ),
                    }
                } else {
                    Error::amqp("exchange.declare")(e)
                }
            })
    }

    /// Deletes the exchange (tests, tear-down tools; its bindings go with it).
    pub async fn delete_on(&self, channel: &Channel) -> Result<(), Error> {
        channel
            .exchange_delete(super::short(&self.name)?, ExchangeDeleteOptions::default())
            .await
            .map_err(Error::amqp("exchange.delete"))
    }
}

/// A binding of a topology's work queue to an exchange, with a routing key (for a
/// fanout exchange the key is ignored; for a topic exchange it is a pattern).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Binding {
    exchange: String,
    routing_key: String,
}

impl Binding {
    pub(crate) fn new(exchange: String, routing_key: String) -> Self {
        Binding {
            exchange,
            routing_key,
        }
    }

    /// The exchange bound to.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The routing key (a pattern for a topic exchange).
    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }

    pub(crate) fn check(&self) -> Result<(), Error> {
        super::short(&self.exchange)?;
        super::short(&self.routing_key)?;
        if self.exchange.is_empty() {
            return Err(Error::Topology(
                "a queue cannot be bound to the default exchange (\"\"): every queue already receives the messages published there with its name as routing key".to_owned(),
            ));
        }
        Ok(())
    }
}
