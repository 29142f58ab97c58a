//! The queues idem declares for a work queue `Q` (SEMANTICS section 5).
//!
//! - `Q`: the work queue, durable, dead-lettering to `Q.dlq` (so a broker-side
//!   dead-letter, e.g. a quorum queue's `x-delivery-limit`, is never a loss);
//! - `Q.retry.<tier>` for each delay tier (`Q.retry.1s`, `Q.retry.2m`, ...): durable,
//!   `x-message-ttl` = the tier, dead-lettering back to `Q` through the default
//!   exchange. A retry copy waits there, in the broker, so it survives worker crashes
//!   and never blocks the consumer;
//! - `Q.dlq`: where dead-lettered messages are kept for an operator.
//!
//! **Exchanges and bindings** ([`exchange`] module). A topology can also declare
//! exchanges ([`Topology::exchange`]) and bind its work queue to exchanges with routing
//! keys ([`Topology::bind`]). Several consuming services of one stream of messages each
//! have their own topology (their own `Q`, delay queues and DLQ), all bound to the same
//! exchange: one publish to the exchange gives each of them a copy. Retry copies and
//! replays never go back through the exchange: a retry copy is published to the
//! failing consumer's own delay queue through the default exchange and comes back to
//! its own `Q` only, and `idem dlq replay` publishes to the queue the message failed in
//! (`x-idem-original-queue`), also through the default exchange. The other subscribers
//! already have their copy; sending a retry through the exchange would hand every one
//! of them a second copy (absorbed by their dedup, but run through each subscriber's
//! stack and counted as a duplicate), and would reach no one at all once the binding
//! changed.
//!
//! Declaring is idempotent and can be turned off ([`Topology::declare`]) when the
//! queues are managed elsewhere; they must then exist with the same arguments.
//!
//! With [`QueueType::Quorum`], every queue is a quorum queue, and each delay queue is
//! declared with `x-dead-letter-strategy: at-least-once` and `x-overflow:
//! reject-publish`. A quorum queue dead-letters *at most once* by default: the hop
//! from a delay queue back to `Q` when the TTL expires is a publish without confirms,
//! and a retry is lost if `Q` cannot take it at that moment (no quorum, leader
//! change). With the at-least-once strategy the delay queue keeps the message until
//! `Q` confirmed it (possibly delivering it twice, which dedup absorbs); RabbitMQ
//! only honours it with the `reject-publish` overflow
//! (<https://www.rabbitmq.com/docs/quorum-queues#dead-lettering>, "Activating
//! at-least-once dead-lettering" and "Limitations"; needs the `stream_queue` feature
//! flag, on by default since 3.9, and RabbitMQ 3.10 or later).
//!
//! Quorum delay queues declared by an older idem (without those two arguments) make
//! the declaration fail with `PRECONDITION_FAILED`, reported as
//! [`Error::Inequivalent`] with what to do: stop the workers, let each delay queue
//! empty (it holds each message at most its TTL), delete it
//! (`rabbitmqctl delete_queue Q.retry.5s`), and start again. idem never deletes a queue
//! by itself.
//!
//! [`delivery_limit`](Topology::delivery_limit) sets `x-delivery-limit`: a last-resort
//! guard, not the crash-loop guard. What it counts, and why it must stay well above
//! the consumer's crash limit:
//!
//! - The broker counts every return of a message to the queue: worker crashes, lost
//!   channels, requeues after a failed copy publish, *including messages the dead worker
//!   only held prefetched and never started*. A low limit therefore dead-letters the
//!   healthy neighbours of a message that keeps killing workers along with it.
//! - idem retries through copies, each a new message with broker delivery count 0. A
//!   redelivery answered "busy" (its claim still held by the worker that died) would
//!   reset the count; so the worker carries it on the copy (`x-idem-delivery-count`)
//!   and dead-letters a delivery whose carried count exceeds the limit, without
//!   running it.
//!
//! The guard that ends crash loops is the consumer's crash limit
//! (`ConsumerBuilder::crash_limit`, see `idem_core::crash`): it counts *starts*, and
//! runs redelivered messages alone so that neighbours are not charged. The worker logs
//! a warning at build time when the delivery limit is not above it.

use std::time::Duration;

use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::Channel;

use crate::error::Error;
use crate::tiers::DelayTiers;

pub mod exchange;

pub use exchange::{Binding, Exchange, ExchangeKind};

/// Classic or quorum queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QueueType {
    /// Classic queues (the default).
    #[default]
    Classic,
    /// Quorum queues (replicated; supports `x-delivery-limit`).
    Quorum,
}

impl QueueType {
    fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// The work queue and its delay and dead-letter queues. See the [module docs](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    queue: String,
    single_active_consumer: bool,
    tiers: DelayTiers,
    queue_type: QueueType,
    delivery_limit: Option<u32>,
    declare: bool,
    exchanges: Vec<Exchange>,
    bindings: Vec<Binding>,
}

impl From<&str> for Topology {
    fn from(queue: &str) -> Self {
        Topology::new(queue)
    }
}

impl From<String> for Topology {
    fn from(queue: String) -> Self {
        Topology::new(queue)
    }
}

/// A tier's name in its queue name: `500ms`, `1s`, `2m`, `1h`.
pub fn tier_name(tier: Duration) -> String {
    let ms = tier.as_millis();
    match ms {
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

impl Topology {
    /// Work queue `queue` with the default tiers, classic queues, declared by idem.
    pub fn new(queue: impl Into<String>) -> Self {
        Topology {
            queue: queue.into(),
            single_active_consumer: false,
            tiers: DelayTiers::default(),
            queue_type: QueueType::Classic,
            delivery_limit: None,
            declare: true,
            exchanges: Vec::new(),
            bindings: Vec::new(),
        }
    }

    /// Declares `exchange` too (before the queues; idempotent). Several topologies
    /// may declare the same exchange: each consuming service declares what it binds
    /// to, so the services can start in any order. Naming an exchange twice keeps one
    /// entry; naming it twice with two types is refused when the topology is checked
    /// or declared ([`Error::Topology`]).
    ///
    /// ```
    /// use idem_amqp::{Exchange, Topology};
    /// // Two services, each with its own queue, delay queues and DLQ, both fed by
    /// // one publish to the fanout exchange "orders".
    /// let billing = Topology::new("billing").exchange(Exchange::fanout("orders")).bind("orders", "");
    /// let audit = Topology::new("audit").exchange(Exchange::fanout("orders")).bind("orders", "");
    /// assert_eq!(billing.bindings()[0].exchange(), "orders");
    /// assert_eq!(audit.exchanges()[0].name(), "orders");
    /// ```
    pub fn exchange(mut self, exchange: Exchange) -> Self {
        if !self.exchanges.contains(&exchange) {
            self.exchanges.push(exchange);
        }
        self
    }

    /// Binds the work queue to `exchange` with `routing_key` (declared after the
    /// queues; idempotent). The exchange must be declared by this topology
    /// ([`exchange`](Self::exchange)) or exist already (e.g. `amq.topic`). For a topic
    /// exchange the key is a pattern (`order.*`, `order.#`); a fanout exchange ignores
    /// it. Several bindings are allowed (several exchanges, several keys). idem never
    /// removes a binding: one left out of the topology later stays until an operator
    /// removes it.
    pub fn bind(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        let binding = Binding::new(exchange.into(), routing_key.into());
        if !self.bindings.contains(&binding) {
            self.bindings.push(binding);
        }
        self
    }

    /// The exchanges this topology declares, in the order given.
    pub fn exchanges(&self) -> &[Exchange] {
        &self.exchanges
    }

    /// The bindings of the work queue, in the order given.
    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    /// The delay tiers (default 1 s, 5 s, 30 s, 2 min, 10 min, 30 min).
    pub fn tiers(mut self, tiers: DelayTiers) -> Self {
        self.tiers = tiers;
        self
    }

    /// Classic or quorum queues.
    pub fn queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// Quorum queues only: `x-delivery-limit` on the work queue.
    pub fn delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = Some(limit);
        self
    }

    /// The `x-delivery-limit` in force: set, and the queues are quorum queues.
    pub fn effective_delivery_limit(&self) -> Option<u32> {
        match self.queue_type {
            QueueType::Quorum => self.delivery_limit,
            QueueType::Classic => None,
        }
    }

    /// Declares the work queue with `x-single-active-consumer` (default false): of all
    /// consumers of the queue, the broker delivers to one at a time and fails over to
    /// the next when it goes, so an [ordered](crate::ordered) worker keeps its keys'
    /// order across processes. Changing it on an existing queue is refused by the
    /// broker (`PRECONDITION_FAILED`).
    pub fn single_active_consumer(mut self, on: bool) -> Self {
        self.single_active_consumer = on;
        self
    }

    /// Whether the work queue is single-active-consumer.
    pub fn get_single_active_consumer(&self) -> bool {
        self.single_active_consumer
    }

    /// Whether the worker declares the queues at start-up and after each reconnect
    /// (default true).
    pub fn declare(mut self, declare: bool) -> Self {
        self.declare = declare;
        self
    }

    /// Whether the worker declares the queues (the value [`declare`](Self::declare)
    /// set).
    pub fn get_declare(&self) -> bool {
        self.declare
    }

    /// The work queue.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The delay tiers (the value [`tiers`](Self::tiers) set).
    pub fn get_tiers(&self) -> &DelayTiers {
        &self.tiers
    }

    /// The dead-letter queue, `Q.dlq`.
    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.queue)
    }

    /// The delay queue of `tier`, `Q.retry.<tier>`.
    pub fn retry_queue(&self, tier: Duration) -> String {
        format!("{}.retry.{}", self.queue, tier_name(tier))
    }

    /// Every queue name, work queue first.
    pub fn queue_names(&self) -> Vec<String> {
        let mut names = vec![self.queue.clone(), self.dlq()];
        names.extend(self.tiers.as_slice().iter().map(|t| self.retry_queue(*t)));
        names
    }

    /// Checks what the broker would refuse before anything is declared: names over
    /// 255 bytes ([`Error::NameTooLong`]), an exchange named with two types, an exchange
    /// idem cannot declare (`""`, `amq.*`), a binding to the default exchange
    /// ([`Error::Topology`]).
    pub fn check(&self) -> Result<(), Error> {
        for name in self.queue_names() {
            short(&name)?;
        }
        for (i, x) in self.exchanges.iter().enumerate() {
            x.check()?;
            if let Some(other) = self.exchanges[..i].iter().find(|o| o.name() == x.name()) {
                return Err(Error::Topology(format!(
                    "exchange {:?} is named twice, as {} and as {}",
                    x.name(),
                    other.kind(),
                    x.kind()
                )));
            }
        }
        for b in &self.bindings {
            b.check()?;
        }
        Ok(())
    }

    pub(crate) fn check_names(&self) -> Result<(), Error> {
        self.check()
    }

    fn base_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long(self.queue_type.as_str()));
        args
    }

    /// Declares the exchanges, then every queue, then the bindings on `channel`
    /// (idempotent). A queue that exists with other arguments is
    /// [`Error::Inequivalent`], an exchange of another type
    /// [`Error::ExchangeInequivalent`], a binding to an exchange that does not exist
    /// [`Error::Topology`]; the broker closes `channel` after such an error.
    pub async fn declare_on(&self, channel: &Channel) -> Result<(), Error> {
        self.check()?;
        for x in &self.exchanges {
            x.declare_on(channel).await?;
        }
        self.declare_queues(channel).await?;
        for b in &self.bindings {
            channel
                .queue_bind(
                    short(&self.queue)?,
                    short(b.exchange())?,
                    short(b.routing_key())?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    if crate::error::is_not_found(&e) {
                        Error::Topology(format!(
                            "cannot bind queue {:?} to exchange {:?}: the exchange does not exist (declare it with Topology::exchange, or create it before the workers start)",
                            self.queue,
                            b.exchange()
                        ))
                    } else {
                        Error::amqp("queue.bind")(e)
                    }
                })?;
        }
        Ok(())
    }

    async fn declare_queues(&self, channel: &Channel) -> Result<(), Error> {
        let durable = QueueDeclareOptions::durable();
        let declare = |name: String, args: FieldTable| async move {
            channel
                .queue_declare(short(&name)?, durable, args)
                .await
                .map_err(Error::amqp("queue.declare"))
        };
        let mut work = self.base_args();
        work.insert("x-dead-letter-exchange".into(), long(""));
        work.insert("x-dead-letter-routing-key".into(), long(&self.dlq()));
        if let (QueueType::Quorum, Some(limit)) = (self.queue_type, self.delivery_limit) {
            work.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(limit.into()),
            );
        }
        if self.single_active_consumer {
            work.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        declare(self.queue.clone(), work)
            .await
            .map_err(|e| self.inequivalent(&self.queue, e, false))?;
        let dlq = self.dlq();
        declare(dlq.clone(), self.base_args())
            .await
            .map_err(|e| self.inequivalent(&dlq, e, false))?;
        for tier in self.tiers.as_slice() {
            let name = self.retry_queue(*tier);
            declare(name.clone(), self.retry_args(*tier))
                .await
                .map_err(|e| self.inequivalent(&name, e, true))?;
        }
        Ok(())
    }

    /// The arguments of the delay queue of `tier` (module docs).
    pub fn retry_args(&self, tier: Duration) -> FieldTable {
        let mut args = self.base_args();
        let ttl = i64::try_from(tier.as_millis()).unwrap_or(i64::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        args.insert("x-dead-letter-exchange".into(), long(""));
        args.insert("x-dead-letter-routing-key".into(), long(&self.queue));
        if self.queue_type == QueueType::Quorum {
            args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
            args.insert("x-overflow".into(), long("reject-publish"));
        }
        args
    }

    /// Turns a `PRECONDITION_FAILED` on `queue` into [`Error::Inequivalent`] with a
    /// hint; other errors pass through.
    fn inequivalent(&self, queue: &str, e: Error, delay_queue: bool) -> Error {
        let Error::Amqp { source, .. } = &e else {
            return e;
        };
        if !crate::error::is_precondition_failed(source) {
            return e;
        }
        let hint = if delay_queue && self.queue_type == QueueType::Quorum {
            format!(
                "idem declares quorum delay queues with x-dead-letter-strategy=at-least-once and x-overflow=reject-publish, so that no retry is lost on its way back to {:?}; this one has other arguments (declared by an older idem?). To migrate: stop the workers of {:?}, wait until {queue:?} is empty (at most its TTL), delete it (`rabbitmqctl delete_queue {queue}`) and start the workers again; or keep the old queue and turn declaration off (Topology::declare(false))",
                self.queue, self.queue
            )
        } else {
            format!(
                "Declare it with the same options as before (classic vs quorum, delay tiers, delivery limit), or delete it once empty (`rabbitmqctl delete_queue {queue}`) to have idem declare it again"
            )
        };
        Error::Inequivalent {
            queue: queue.to_owned(),
            detail: source.to_string(),
            hint,
        }
    }

    /// Deletes every queue of this topology (tests, benchmarks, tear-down tools); their
    /// bindings go with them. Exchanges are left alone (other topologies may bind to
    /// them): [`Exchange::delete_on`] deletes one.
    pub async fn delete_on(&self, channel: &Channel) -> Result<(), Error> {
        for name in self.queue_names() {
            channel
                .queue_delete(short(&name)?, QueueDeleteOptions::default())
                .await
                .map_err(Error::amqp("queue.delete"))?;
        }
        Ok(())
    }
}

pub(crate) fn short(name: &str) -> Result<ShortString, Error> {
    ShortString::try_new(name).map_err(|_| Error::NameTooLong(name.to_owned()))
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_tier_choice() {
        assert_eq!(tier_name(Duration::from_secs(1)), "1s");
        assert_eq!(tier_name(Duration::from_secs(120)), "2m");
        assert_eq!(tier_name(Duration::from_secs(1800)), "30m");
        assert_eq!(tier_name(Duration::from_secs(7200)), "2h");
        assert_eq!(tier_name(Duration::from_millis(1500)), "1500ms");
        let t = Topology::new("jobs");
        assert_eq!(t.retry_queue(Duration::from_secs(30)), "jobs.retry.30s");
        assert_eq!(t.dlq(), "jobs.dlq");
        assert_eq!(t.queue_names().len(), 8);
        assert!(Topology::new("q".repeat(250)).check_names().is_err());
    }

    #[test]
    fn exchanges_and_bindings_are_checked_before_declaring() {
        let t = Topology::new("billing")
            .exchange(Exchange::fanout("orders"))
            .exchange(Exchange::fanout("orders"))
            .bind("orders", "")
            .bind("orders", "")
            .bind("amq.topic", "order.*");
        assert_eq!(t.exchanges().len(), 1, "the same exchange twice is one");
        assert_eq!(t.bindings().len(), 2, "the same binding twice is one");
        assert!(t.check().is_ok());
        // The queues are unchanged by bindings.
        assert_eq!(t.queue_names(), Topology::new("billing").queue_names());

        let two_types = Topology::new("q")
            .exchange(Exchange::fanout("orders"))
            .exchange(Exchange::topic("orders"));
        let err = two_types.check().unwrap_err().to_string();
        assert!(err.contains("named twice, as fanout and as topic"), "{err}");
        for bad in [Exchange::direct(""), Exchange::topic("amq.topic")] {
            let err = Topology::new("q").exchange(bad).check().unwrap_err();
            assert!(matches!(err, Error::Topology(_)), "{err}");
        }
        let err = Topology::new("q").bind("", "q").check().unwrap_err();
        assert!(err.to_string().contains("default exchange"), "{err}");
        let long_key = Topology::new("q").bind("orders", "k".repeat(256));
        assert!(matches!(long_key.check(), Err(Error::NameTooLong(_))));
        assert_eq!(ExchangeKind::parse("Topic"), Some(ExchangeKind::Topic));
        assert_eq!(ExchangeKind::parse("headers"), None);
    }
}
