//! [`DeliveryContext`]: what one delivery carries through the consumer besides its
//! content (see the type's docs).

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use crate::crash::CrashGuard;
use crate::headers;
use crate::message::Message;

/// One delivery's context: its attempt numbers (read once), the consumer's crash
/// guard, and the key its dedup stage resolved.
///
/// Several stages of one delivery need the same few facts: the transport and the
/// consumer need the attempt numbers of `x-idem-attempts` and `x-idem-first-failed-at`,
/// the dedup stage needs the consumer's [crash guard](crate::crash), and the consumer
/// needs the key the dedup stage resolved, to name it in the failure record
/// (`x-idem-key`). They travel in one typed value, [`Message::context`]:
///
/// - **Read once.** [`DeliveryContext::read`] is the one reading of those two headers
///   under the [header rule](crate::read) (a malformed value is logged once, and
///   counts as absent). A transport reads it when it converts a delivery (RabbitMQ:
///   `message_from_delivery`; the in-memory broker when it delivers), and then takes
///   its numbers from the context, never from the headers again.
///   [`Consumer::process`](crate::Consumer::process) reads a message that arrives
///   without one (built by hand with [`Message::new`]), and uses the transport's
///   reading otherwise. A context is read from the headers the message had then:
///   editing the `x-idem-*` headers of a read message does not change it (replace it
///   with a new reading). An [in-place retry](crate::ordered::process_in_place) takes
///   the next run's numbers from the failure record it wrote into the headers.
/// - **Given the consumer's guard.** `process` puts its crash guard into the context
///   of every run; a dedup stage waits for its [turn](crate::crash::CrashGuard::turn)
///   through [`crash_guard`](DeliveryContext::crash_guard).
/// - **Given the key.** A dedup stage records the key it resolved with
///   [`record_key`](DeliveryContext::record_key) as soon as it has one; the consumer
///   reads it back after the stack ran, however the run ended. The key is kept in a
///   slot that the clones of a context share, so the record reaches the consumer
///   although the message itself moved into the stack; `process` gives each delivery
///   a new, empty slot. A message whose key could not be resolved (no key, an
///   oversized one) is named by its `message_id` instead, if it has one.
///
/// The failure record of a delivery is built from its context by the one constructor
/// [`Failure::for_delivery`](crate::Failure::for_delivery).
///
/// The default context is not read yet: no failed attempts, no crash guard, no key.
#[derive(Clone, Debug, Default)]
pub struct DeliveryContext {
    /// What the one reading of the headers found; `None` until then.
    arrival: Option<Arrival>,
    /// The consumer's guard, once the consumer runs the delivery.
    guard: Option<CrashGuard>,
    /// The key the dedup stage resolved; shared by the clones of this context.
    key: Arc<OnceLock<String>>,
}

/// What a delivery brings from its earlier attempts, read from its headers once.
#[derive(Clone, Debug)]
struct Arrival {
    /// Failed attempts before this delivery (`x-idem-attempts`).
    failed_before: u32,
    /// When the first of them failed (`x-idem-first-failed-at`).
    first_failed_at: Option<SystemTime>,
    /// The message id, the key a failure record names when no stage resolved one.
    message_id: Option<String>,
}

impl DeliveryContext {
    /// Reads the context of `msg`: its failed attempts from `x-idem-attempts` and the
    /// time of the first from `x-idem-first-failed-at`, under the
    /// [header rule](crate::read) (0 and none when absent or malformed; a malformed
    /// value is logged at `warn`, once for this reading). The one reading of those
    /// headers for a delivery: transports call it when they convert one, and store it
    /// in [`Message::context`].
    ///
    /// ```
    /// use idem_core::{DeliveryContext, Message};
    ///
    /// let msg = Message::new("x").with_header("x-idem-attempts", 2u32);
    /// let ctx = DeliveryContext::read(&msg);
    /// assert_eq!((ctx.failed_before(), ctx.attempt()), (2, 3));
    /// assert_eq!(ctx.key(), None);
    /// ```
    pub fn read(msg: &Message) -> Self {
        DeliveryContext {
            arrival: Some(Arrival::read(msg)),
            guard: None,
            key: Arc::default(),
        }
    }

    /// The failed attempts this context read, `None` if it was not read.
    pub(crate) fn read_failed_before(&self) -> Option<u32> {
        self.arrival.as_ref().map(|a| a.failed_before)
    }

    /// Failed attempts before this delivery, as its `x-idem-attempts` recorded them
    /// (0 for a first delivery, and for a context not read).
    pub fn failed_before(&self) -> u32 {
        self.arrival.as_ref().map_or(0, |a| a.failed_before)
    }

    /// Which attempt this delivery is: [`failed_before`](Self::failed_before) plus
    /// one (saturating).
    pub fn attempt(&self) -> u32 {
        self.failed_before().saturating_add(1)
    }

    /// When the first failed attempt failed, as `x-idem-first-failed-at` recorded it
    /// (`None` for a first delivery, and when the header is absent or malformed).
    pub fn first_failed_at(&self) -> Option<SystemTime> {
        self.arrival.as_ref().and_then(|a| a.first_failed_at)
    }

    /// The idempotency key the dedup stage resolved for this delivery, once it has
    /// (`None` before, without a dedup stage, and when the key could not be resolved).
    pub fn key(&self) -> Option<&str> {
        self.key.get().map(String::as_str)
    }

    /// The key a failure record of this delivery names: the one the dedup stage
    /// resolved, else the message id read with the context.
    pub(crate) fn failure_key(&self) -> Option<&str> {
        self.key()
            .or_else(|| self.arrival.as_ref()?.message_id.as_deref())
    }

    /// Records the idempotency key a dedup stage resolved, for the failure record's
    /// `x-idem-key`. The first key recorded for a delivery stays; dedup stages call
    /// this once they have resolved the key.
    pub fn record_key(&self, key: &str) {
        // Already set: a second try of the same delivery resolved the same key.
        let _ = self.key.set(key.to_owned());
    }

    /// The crash guard of the consumer running this delivery, or, for a stage used
    /// outside a [`Consumer`](crate::Consumer), a default one without isolation
    /// partners. Dedup stages wait for the message's turn with it (see
    /// [`crate::crash`]).
    pub fn crash_guard(&self) -> CrashGuard {
        self.guard.clone().unwrap_or_default()
    }

    /// The context of one run of `msg` by a consumer with `guard`: the transport's
    /// reading if the message carries one, else a reading now; a new, empty key slot.
    pub(crate) fn for_run(msg: &Message, guard: CrashGuard) -> Self {
        let arrival = match &msg.context.arrival {
            Some(a) => a.clone(),
            None => Arrival::read(msg),
        };
        DeliveryContext {
            arrival: Some(arrival),
            guard: Some(guard),
            key: Arc::default(),
        }
    }

    /// The context of the run after an in-place retry of `msg` whose failure record
    /// was `failure`: what the retry copy's headers say, without reading them back.
    pub(crate) fn after_retry(msg: &Message, failure: &crate::outcome::Failure) -> Self {
        DeliveryContext {
            arrival: Some(Arrival {
                failed_before: failure.attempts,
                first_failed_at: Some(failure.first_failed_at),
                message_id: msg.properties.message_id.clone(),
            }),
            guard: None,
            key: Arc::default(),
        }
    }

    /// This context with `guard` (for tests that run a dedup stage without a consumer).
    #[cfg(test)]
    pub(crate) fn with_crash_guard(mut self, guard: CrashGuard) -> Self {
        self.guard = Some(guard);
        self
    }
}

impl Arrival {
    /// The one reading of a delivery's attempt headers (see [`DeliveryContext::read`]).
    fn read(msg: &Message) -> Self {
        Arrival {
            failed_before: msg.failed_attempts(),
            first_failed_at: crate::read::read_in(msg, headers::FIRST_FAILED_AT),
            message_id: msg.properties.message_id.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::dedup::{DedupLayer, HeaderKey, MemoryStore};
    use crate::error::ErrorKind;
    use crate::error::HandlerError;
    use crate::outcome::{headers as h, Disposition, Failure};
    use crate::{Backoff, Consumer, HeaderValue, Jitter};
    use idem_testkit::logs::LogCapture;

    fn backoff(attempts: u32) -> Backoff {
        Backoff::exponential(Duration::from_millis(1))
            .jitter(Jitter::None)
            .max_attempts(attempts)
    }

    /// A consumer keyed by the `order-id` header whose handler fails with `fail`.
    fn keyed_by_order(fail: fn() -> HandlerError) -> Consumer {
        Consumer::builder("c")
            .dedup(DedupLayer::new(MemoryStore::new()).key(HeaderKey::new("order-id")))
            .backoff(backoff(3))
            .handler(move || async move { Err::<(), _>(fail()) })
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn failure_of(d: &Disposition) -> &Failure {
        match d {
            Disposition::Retry { failure, .. } | Disposition::DeadLetter { failure, .. } => failure,
            other => panic!("no failure record: {other:?}"),
        }
    }

    fn warns_about(logs: &LogCapture, header: &str) -> usize {
        logs.lines_with(&format!("header {header} has value")).len()
    }

    #[test]
    fn read_takes_the_numbers_from_the_headers_and_a_default_context_is_unread() {
        let at = crate::text::parse_rfc3339("2026-01-31T12:00:00.000Z");
        let msg = Message::new("x")
            .with_message_id("m-1")
            .with_header(h::ATTEMPTS, 4u32)
            .with_header(h::FIRST_FAILED_AT, "2026-01-31T12:00:00.000Z");
        let ctx = DeliveryContext::read(&msg);
        assert_eq!((ctx.failed_before(), ctx.attempt()), (4, 5));
        assert_eq!(ctx.first_failed_at(), at);
        assert_eq!((ctx.key(), ctx.failure_key()), (None, Some("m-1")));
        assert_eq!(ctx.read_failed_before(), Some(4));
        let unread = DeliveryContext::default();
        assert_eq!(unread.read_failed_before(), None);
        assert_eq!((unread.attempt(), unread.failure_key()), (1, None));
        // Saturates like the header rule: never fewer attempts than recorded.
        let huge = Message::new("x").with_header(h::ATTEMPTS, HeaderValue::Int(1 << 40));
        assert_eq!(DeliveryContext::read(&huge).attempt(), u32::MAX);
    }

    #[test]
    fn the_first_recorded_key_stays_and_clones_share_it() {
        let ctx = DeliveryContext::read(&Message::new("x").with_message_id("m-1"));
        let moved_into_the_stack = ctx.clone();
        moved_into_the_stack.record_key("order-1");
        moved_into_the_stack.record_key("order-2");
        assert_eq!(ctx.key(), Some("order-1"));
        assert_eq!(ctx.failure_key(), Some("order-1"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_malformed_attempts_header_is_read_and_logged_once_per_delivery() {
        let logs = LogCapture::default();
        let _guard = logs.install();
        let consumer = keyed_by_order(|| HandlerError::transient("down"));
        let bad = || {
            Message::new("x")
                .with_message_id("m-1")
                .with_header("order-id", "order-1")
                .with_header(h::ATTEMPTS, "abc")
                .with_header(h::FIRST_FAILED_AT, "yesterday")
        };
        // Built by hand: the consumer reads it, once, through a failure, its record
        // and its copy headers.
        let d = consumer.process(bad()).await;
        assert_eq!(failure_of(&d).attempts, 1, "malformed counts as absent");
        assert_eq!(warns_about(&logs, h::ATTEMPTS), 1, "{}", logs.text());
        assert_eq!(warns_about(&logs, h::FIRST_FAILED_AT), 1, "{}", logs.text());

        // Read by a transport: nothing read again, whatever builds headers from it.
        let mut msg = bad();
        msg.context = DeliveryContext::read(&msg);
        assert_eq!(warns_about(&logs, h::ATTEMPTS), 2);
        let failure = Failure::for_delivery(
            &msg.context,
            ErrorKind::Permanent,
            "refused",
            SystemTime::now(),
        );
        let _ = Disposition::dead_letter(&msg, "c", failure);
        let d = consumer.process(msg).await;
        assert!(matches!(d, Disposition::Retry { .. }), "{d:?}");
        assert_eq!(warns_about(&logs, h::ATTEMPTS), 2, "{}", logs.text());
        assert_eq!(warns_about(&logs, h::FIRST_FAILED_AT), 2, "{}", logs.text());

        // Retried in place: the later runs count up from the failure record of the
        // run before, to the budget of 3.
        let never = std::future::pending::<()>();
        let d = crate::ordered::process_in_place(&consumer, bad(), never).await;
        assert_eq!(failure_of(&d).attempts, 3, "{d:?}");
        assert!(matches!(d, Disposition::DeadLetter { .. }), "{d:?}");
        assert_eq!(warns_about(&logs, h::ATTEMPTS), 3, "{}", logs.text());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_failure_record_names_the_key_the_lease_stage_resolved() {
        let consumer = keyed_by_order(|| HandlerError::permanent("no such order"));
        let msg = Message::new("x")
            .with_message_id("m-1")
            .with_header("order-id", "order-1");
        let d = consumer.process(msg).await;
        assert_eq!(failure_of(&d).key.as_deref(), Some("order-1"));
        match &d {
            Disposition::DeadLetter { headers, .. } => {
                assert_eq!(headers[h::KEY], HeaderValue::from("order-1"));
            }
            other => panic!("{other:?}"),
        }
        // A transient failure too, on its retry copy's record.
        let consumer = keyed_by_order(|| HandlerError::transient("down"));
        let msg = Message::new("x")
            .with_message_id("m-2")
            .with_header("order-id", "order-2");
        let d = consumer.process(msg).await;
        assert!(matches!(d, Disposition::Retry { .. }), "{d:?}");
        assert_eq!(failure_of(&d).key.as_deref(), Some("order-2"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn without_a_resolved_key_the_failure_record_names_the_message_id_or_nothing() {
        let consumer = keyed_by_order(|| HandlerError::permanent("never runs"));
        // No `order-id`: the stage poisons it before resolving a key.
        let d = consumer
            .process(Message::new("x").with_message_id("m-3"))
            .await;
        let failure = failure_of(&d);
        assert!(failure.error.contains("no idempotency key"), "{d:?}");
        assert_eq!(failure.key.as_deref(), Some("m-3"));
        let d = consumer.process(Message::new("x")).await;
        assert_eq!(failure_of(&d).key, None);
        match &d {
            Disposition::DeadLetter { headers, .. } => assert!(!headers.contains_key(h::KEY)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn each_delivery_gets_its_own_key_slot() {
        let consumer = keyed_by_order(|| HandlerError::permanent("no such order"));
        // A message the stage resolved once is run again with another key source:
        // its record names the key of this run, not the earlier one.
        let mut msg = Message::new("x").with_header("order-id", "order-1");
        msg.context = DeliveryContext::read(&msg);
        msg.context.record_key("order-1");
        msg.headers
            .insert("order-id".into(), HeaderValue::from("order-9"));
        let d = consumer.process(msg).await;
        assert_eq!(failure_of(&d).key.as_deref(), Some("order-9"));
    }

    #[test]
    fn for_delivery_carries_the_first_failure_and_caps_a_future_one() {
        let now = SystemTime::now();
        let earlier = now - Duration::from_secs(60);
        let later = now + Duration::from_secs(3600);
        for (recorded, want) in [(None, now), (Some(earlier), earlier), (Some(later), now)] {
            let mut msg = Message::new("x").with_header(h::ATTEMPTS, 2u32);
            if let Some(t) = recorded {
                msg = msg.with_header(h::FIRST_FAILED_AT, crate::text::rfc3339(t));
            }
            let ctx = DeliveryContext::read(&msg);
            let f = Failure::for_delivery(&ctx, ErrorKind::Transient, "down", now);
            assert_eq!(f.attempts, 2);
            assert_eq!(f.last_failed_at, now);
            // rfc3339 keeps milliseconds.
            let diff = f
                .first_failed_at
                .duration_since(want)
                .unwrap_or_else(|e| e.duration());
            assert!(diff < Duration::from_millis(1), "{recorded:?}: {f:?}");
        }
    }
}
