//! The quorum queue's `x-delivery-limit`, enforced across copies (see
//! [`idem_core::crash`]): the consumer carries the count of unsettled deliveries on
//! busy copies (`x-idem-delivery-count`); the worker dead-letters a delivery whose
//! count exceeds the limit without running it.

use std::time::SystemTime;

use idem_core::crash::prior_deliveries;
use idem_core::{Disposition, ErrorKind, Failure, Message};

/// A dead-letter disposition if `msg` was delivered more often than the queue's
/// `x-delivery-limit` allows, counting the deliveries of earlier copies (the broker
/// only counts this copy's).
pub(crate) fn over_limit(msg: &Message, consumer: &str, limit: Option<u32>) -> Option<Disposition> {
    let limit = limit?;
    let prior = prior_deliveries(msg);
    if prior <= limit {
        return None;
    }
    let now = SystemTime::now();
    tracing::warn!(
        deliveries = prior,
        limit,
        "delivery limit exceeded across copies; dead-lettering without running"
    );
    let error = format!(
        "delivered {prior} times without being settled, more than the queue's x-delivery-limit ({limit}), counted across idem's busy copies"
    );
    // From the context read when the delivery was converted: its attempts, first
    // failure and message id (no dedup stage ran, so no key was resolved).
    let failure = Failure::for_delivery(&msg.context, ErrorKind::Permanent, &error, now);
    Some(Disposition::dead_letter(msg, consumer, failure))
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem_core::crash::{BROKER_DELIVERY_COUNT_HEADER, DELIVERY_COUNT_HEADER};
    use idem_core::outcome::headers as h;
    use idem_core::HeaderValue;

    fn failure(attempts: u32) -> Failure {
        Failure::new(ErrorKind::Transient, "x", attempts, SystemTime::now())
    }

    #[test]
    fn busy_copies_carry_the_count_and_settled_ones_reset_it() {
        // As the transport converts a quorum queue's third delivery: the header kept
        // (to be zeroed on the copy), its count in the delivery info.
        let mut m = Message::new("x").with_header(BROKER_DELIVERY_COUNT_HEADER, 2u32);
        m.delivery.redelivered = true;
        m.delivery.delivery_count = 2;
        let busy = failure(0).retry_headers(&m);
        assert_eq!(busy[DELIVERY_COUNT_HEADER], HeaderValue::Int(2));
        assert_eq!(busy[BROKER_DELIVERY_COUNT_HEADER], HeaderValue::Int(0));

        // The busy copy comes back and is answered busy again after one more crash.
        let mut copy = Message::new("x")
            .with_message_id("m-1")
            .with_header(h::ATTEMPTS, 1u32)
            .with_header(DELIVERY_COUNT_HEADER, 2u32)
            .with_header(BROKER_DELIVERY_COUNT_HEADER, 1u32);
        copy.delivery.redelivered = true;
        copy.delivery.delivery_count = 1;
        // As the transport converts it: its context read once.
        copy.context = idem_core::DeliveryContext::read(&copy);
        let again = failure(1).retry_headers(&copy);
        assert_eq!(again[DELIVERY_COUNT_HEADER], HeaderValue::Int(3));
        let settled = failure(2).retry_headers(&copy);
        assert_eq!(settled[DELIVERY_COUNT_HEADER], HeaderValue::Int(0));

        assert!(over_limit(&copy, "c", Some(3)).is_none());
        assert!(over_limit(&copy, "c", None).is_none());
        match over_limit(&copy, "c", Some(2)) {
            Some(Disposition::DeadLetter {
                failure: f,
                headers,
            }) => {
                assert_eq!(f.kind, ErrorKind::Permanent);
                assert!(f.error.contains("x-delivery-limit (2)"), "{}", f.error);
                // From the delivery's context: its attempts so far, its message id.
                assert_eq!((f.attempts, f.key.as_deref()), (1, Some("m-1")));
                assert_eq!(headers[h::KEY], HeaderValue::from("m-1"));
                assert_eq!(headers[h::CONSUMER], HeaderValue::from("c"));
                assert_eq!(headers[h::ERROR_KIND], HeaderValue::from("permanent"));
            }
            other => panic!("{other:?}"),
        }
    }
}
