//! What the worker carries across copies for crash loops (see [`idem_core::crash`]):
//! the count of unsettled deliveries on busy copies, and the quorum queue's
//! `x-delivery-limit` enforced across them.

use std::time::SystemTime;

use idem_core::crash::{prior_deliveries, BROKER_DELIVERY_COUNT_HEADER, DELIVERY_COUNT_HEADER};
use idem_core::outcome::headers as idem_headers;
use idem_core::{Disposition, ErrorKind, Failure, HeaderValue, Headers, Message};

/// A delivery's history, read before the consumer runs it.
pub(crate) struct Seen {
    prior: u32,
    failed_before: u32,
    carried: bool,
    broker_count: bool,
}

impl Seen {
    pub(crate) fn new(msg: &Message) -> Self {
        Seen {
            prior: prior_deliveries(msg),
            // Already read (and a malformed value logged) by the consumer.
            failed_before: idem_core::read::read_quiet::<u32>(msg, idem_headers::ATTEMPTS)
                .unwrap_or(0),
            carried: msg.headers.contains_key(DELIVERY_COUNT_HEADER),
            broker_count: msg.headers.contains_key(BROKER_DELIVERY_COUNT_HEADER),
        }
    }

    /// A dead-letter disposition if the message was delivered more often than the
    /// queue's `x-delivery-limit` allows, counting the deliveries of earlier copies
    /// (the broker only counts this copy's).
    pub(crate) fn over_limit(&self, msg: &Message, limit: Option<u32>) -> Option<Disposition> {
        let limit = limit?;
        if self.prior <= limit {
            return None;
        }
        let now = SystemTime::now();
        tracing::warn!(
            deliveries = self.prior,
            limit,
            "delivery limit exceeded across copies; dead-lettering without running"
        );
        Some(Disposition::DeadLetter(Failure {
            kind: ErrorKind::Permanent,
            error: format!(
                "delivered {} times without being settled, more than the queue's x-delivery-limit ({limit}), counted across idem's busy copies",
                self.prior
            ),
            attempts: self.failed_before,
            first_failed_at: idem_core::read::read_quiet::<SystemTime>(
                msg,
                idem_headers::FIRST_FAILED_AT,
            )
            .map_or(now, |t| t.min(now)),
            last_failed_at: now,
            key: msg.properties.message_id.clone(),
        }))
    }

    /// Headers for a retry copy. A busy copy (no attempt spent: the message's claim
    /// was held, typically by a worker that just died) carries the unsettled
    /// deliveries so far in [`DELIVERY_COUNT_HEADER`]; a copy after a settled failure
    /// resets it. The broker's `x-delivery-count` of the original is zeroed on the
    /// copy, which is a new message to the broker.
    pub(crate) fn mark_copy(&self, extra: &mut Headers, failure: &Failure) {
        let busy = failure.attempts == self.failed_before;
        if busy && self.prior > 0 {
            extra.insert(DELIVERY_COUNT_HEADER.into(), HeaderValue::from(self.prior));
        } else if self.carried {
            extra.insert(DELIVERY_COUNT_HEADER.into(), HeaderValue::Int(0));
        }
        if self.broker_count {
            extra.insert(BROKER_DELIVERY_COUNT_HEADER.into(), HeaderValue::Int(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(attempts: u32) -> Failure {
        Failure {
            kind: ErrorKind::Transient,
            error: "x".into(),
            attempts,
            first_failed_at: SystemTime::now(),
            last_failed_at: SystemTime::now(),
            key: None,
        }
    }

    #[test]
    fn busy_copies_carry_the_count_and_settled_ones_reset_it() {
        let mut m = Message::new("x").with_header(BROKER_DELIVERY_COUNT_HEADER, 2u32);
        m.delivery.redelivered = true;
        let seen = Seen::new(&m);
        let mut busy = Headers::new();
        seen.mark_copy(&mut busy, &failure(0));
        assert_eq!(busy[DELIVERY_COUNT_HEADER], HeaderValue::Int(2));
        assert_eq!(busy[BROKER_DELIVERY_COUNT_HEADER], HeaderValue::Int(0));

        // The busy copy comes back and is answered busy again after one more crash.
        let mut copy = Message::new("x")
            .with_header(DELIVERY_COUNT_HEADER, 2u32)
            .with_header(BROKER_DELIVERY_COUNT_HEADER, 1u32);
        copy.delivery.redelivered = true;
        let seen = Seen::new(&copy);
        let mut again = Headers::new();
        seen.mark_copy(&mut again, &failure(0));
        assert_eq!(again[DELIVERY_COUNT_HEADER], HeaderValue::Int(3));
        let mut settled = Headers::new();
        seen.mark_copy(&mut settled, &failure(1));
        assert_eq!(settled[DELIVERY_COUNT_HEADER], HeaderValue::Int(0));

        assert!(seen.over_limit(&copy, Some(3)).is_none());
        assert!(seen.over_limit(&copy, None).is_none());
        match seen.over_limit(&copy, Some(2)) {
            Some(Disposition::DeadLetter(f)) => {
                assert_eq!(f.kind, ErrorKind::Permanent);
                assert!(f.error.contains("x-delivery-limit (2)"), "{}", f.error);
            }
            other => panic!("{other:?}"),
        }
    }
}
