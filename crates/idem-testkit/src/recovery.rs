//! The last step of a store-outage test: once the store answers again, a new message
//! is handled (the consumer answers retry while its store reconnects) and a message
//! completed before the outage is acked as a duplicate.

use std::time::Duration;

use idem_core::{Consumer, Disposition, Message};

/// Processes `fresh` up to `tries` times, 100 ms apart, while the consumer answers
/// [`Disposition::Retry`], and asserts that it is then acked as handled (`back` is the
/// failure message); then asserts that `done`, completed before the outage, is acked
/// as a duplicate.
pub async fn assert_recovers(
    consumer: &Consumer,
    tries: usize,
    fresh: &Message,
    done: &Message,
    back: &str,
) {
    let mut settled = None;
    for _ in 0..tries {
        match consumer.process(fresh.clone()).await {
            Disposition::Retry { .. } => tokio::time::sleep(Duration::from_millis(100)).await,
            other => {
                settled = Some(other);
                break;
            }
        }
    }
    assert_eq!(
        settled,
        Some(Disposition::Ack { duplicate: false }),
        "{back}"
    );
    assert_eq!(
        consumer.process(done.clone()).await,
        Disposition::Ack { duplicate: true },
        "a message completed before the outage"
    );
}
