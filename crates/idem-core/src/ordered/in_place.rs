//! [`process_in_place`]: a lane's head retried in this process.

use std::future::Future;

use crate::consumer::{Consumer, DeliveryContext};
use crate::message::Message;
use crate::outcome::{copy_onto, Disposition};

/// Why an in-place retry wait ended in a hand-back.
const STOPPED: &str =
    "stopping while a retry waited in place; handed back to its place in the queue";

/// Runs `msg` through `consumer`; while the answer is a [`Disposition::Retry`], waits
/// its delay here and runs the message again, with the headers the retry copy would
/// have carried (so `x-idem-attempts` counts up and the consumer's attempt budget and
/// dead-letter decision apply unchanged; the run takes its attempt numbers from the
/// retry's failure record, without reading the headers back). Returns the first other
/// disposition. A `msg` whose [context](DeliveryContext) the transport read starts
/// from that reading.
///
/// When `stop` completes during a wait, returns [`Disposition::Release`]: the
/// transport hands the original back (RabbitMQ: `basic.nack requeue=true`), which
/// puts it back ahead of the key's later messages; the attempts spent in place are
/// not carried (the original's headers are the broker's).
///
/// Each retry is counted in [`Stats::retries`](crate::Stats) like a retry copy.
pub async fn process_in_place(
    consumer: &Consumer,
    mut msg: Message,
    stop: impl Future<Output = ()>,
) -> Disposition {
    let mut stop = std::pin::pin!(stop);
    loop {
        let disposition = consumer.process(msg.clone()).await;
        let Disposition::Retry {
            delay,
            headers,
            failure,
            ..
        } = &disposition
        else {
            return disposition;
        };
        tokio::select! {
            biased;
            _ = stop.as_mut() => {
                return Disposition::Release {
                    reason: STOPPED.to_owned(),
                }
            }
            _ = tokio::time::sleep(*delay) => {}
        }
        copy_onto(&mut msg.headers, headers);
        // The next run's attempt numbers are the ones the copy's headers now carry.
        msg.context = DeliveryContext::after_retry(&msg, failure);
    }
}
