//! Trace context of outbox rows (feature `otel`).
//!
//! A row is written inside the enqueuer's transaction, usually while a request or a
//! handler is being traced, but published later by the relay, in a task of its own.
//! So the context is taken at enqueue time and stored with the row's headers: the
//! relay publishes those headers as they are (its publisher keeps a `traceparent`
//! that is already there), and the consumer of the message continues the enqueuer's
//! trace. A message whose headers already carry a `traceparent` keeps it.

use crate::message::OutboxMessage;

/// `msg` with the current span's trace context in its headers (see the module docs).
pub(crate) fn with_enqueuer_context(mut msg: OutboxMessage) -> OutboxMessage {
    idem_core::otel::inject_current(&mut msg.headers);
    msg
}
