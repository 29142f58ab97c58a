//! Replay rules: what changes when a dead-lettered message is sent back to its queue,
//! the inverse of the dead-letter headers the worker writes (see
//! [`idem_core::outcome::headers`]). `idem dlq replay` applies them; a program that
//! moves dead letters itself should too, with [`Publisher::publish_raw_each`](crate::Publisher::publish_raw_each).
//!
//! A replayed copy keeps its body, its properties (same `message_id`, so a consumer
//! that already applied it deduplicates it) and its application headers, and:
//!
//! - loses every failure header idem writes ([`STRIPPED_ON_REPLAY`], which is
//!   [`idem_core::outcome::headers::FAILURE`]): the attempts, the error, its kind and
//!   type, the host and process, the immediate retries, the backtrace and the
//!   crash-loop delivery count all start again, so a message dead-lettered for going
//!   over a quorum queue's delivery limit runs again when replayed. The `x-idem-*`
//!   headers kept are [`idem_core::outcome::headers::KEPT_ON_REPLAY`]: where the
//!   message was first published, an operator's edit marks, the trace link;
//! - loses the broker's dead-lettering headers ([`BROKER_DEATH_HEADERS`]): `x-`
//!   headers belong to the broker (RabbitMQ 4.x ignores an `x-death` a client
//!   publishes, 3.x interprets it and may drop a message it sees dying twice in one
//!   queue), so a replay starts a fresh history on every version; for a message the
//!   broker dead-lettered, the exchange and routing key it was published with move to
//!   `x-idem-original-exchange` / `x-idem-original-routing-key` (unless already set);
//! - loses the per-delivery headers of quorum queues ([`DELIVERY_HEADERS`]);
//! - gains [`REPLAY_HEADER`] (`x-idem-replay`) naming the replay run.
//!
//! A message put back where it was read (an operator tool reading a queue without
//! removing its messages) is [`restored_properties`]: only the per-delivery headers
//! go.

pub use idem_core::dedup::REPLAY_HEADER;
use idem_core::outcome::headers as h;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;

/// Failure headers removed from a replayed message: every header idem writes to
/// record a failure or an unsettled delivery ([`h::FAILURE`], one list kept in
/// `idem-core` next to the header names, so a header added there is cleared here too).
/// `x-idem-original-exchange` and `x-idem-original-routing-key` are kept.
pub const STRIPPED_ON_REPLAY: [&str; h::FAILURE.len()] = h::FAILURE;

/// The broker's dead-lettering headers, removed from a replayed message.
pub const BROKER_DEATH_HEADERS: [&str; 7] = [
    "x-death",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-first-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-last-death-exchange",
];

/// Headers the broker adds to each delivery of a quorum queue message; a replayed or
/// restored copy goes without them (they describe a delivery, not the message).
pub const DELIVERY_HEADERS: [&str; 2] = ["x-delivery-count", "x-acquired-count"];

/// The properties of the replayed copy of a message with properties `props` (see the
/// [module docs](self)), marked with `replay_id`. For a message the broker
/// dead-lettered, `broker_route` is the exchange and routing key it had been
/// published with (from its most recent `x-death` entry), kept as
/// `x-idem-original-exchange` / `x-idem-original-routing-key` unless already set.
pub fn replay_properties(
    props: &BasicProperties,
    replay_id: &str,
    broker_route: (Option<&str>, Option<&str>),
) -> BasicProperties {
    let mut table = props
        .headers()
        .as_ref()
        .map(|t| t.inner().clone())
        .unwrap_or_default();
    table.retain(|name, _| {
        let name = name.as_str();
        !STRIPPED_ON_REPLAY.contains(&name)
            && !BROKER_DEATH_HEADERS.contains(&name)
            && !DELIVERY_HEADERS.contains(&name)
    });
    let long = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes()));
    for (name, value) in [
        (h::ORIGINAL_EXCHANGE, broker_route.0),
        (h::ORIGINAL_ROUTING_KEY, broker_route.1),
    ] {
        if let Some(v) = value {
            table.entry(name.into()).or_insert_with(|| long(v));
        }
    }
    table.insert(REPLAY_HEADER.into(), long(replay_id));
    props.clone().with_headers(FieldTable::from(table))
}

/// The properties of a copy put back where the message was read: the original's,
/// minus the broker's per-delivery headers ([`DELIVERY_HEADERS`]).
pub fn restored_properties(props: &BasicProperties) -> BasicProperties {
    match props.headers() {
        Some(t) if DELIVERY_HEADERS.iter().any(|d| t.inner().contains_key(*d)) => {
            let mut table = t.inner().clone();
            table.retain(|name, _| !DELIVERY_HEADERS.contains(&name.as_str()));
            props.clone().with_headers(FieldTable::from(table))
        }
        _ => props.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s.as_bytes()))
    }

    #[test]
    fn a_replay_undoes_the_dead_letter_headers_and_keeps_the_rest() {
        let mut t = FieldTable::default();
        for name in STRIPPED_ON_REPLAY
            .iter()
            .chain(&BROKER_DEATH_HEADERS)
            .chain(&DELIVERY_HEADERS)
        {
            t.insert((*name).into(), long("x"));
        }
        t.insert("x-tenant".into(), long("acme"));
        t.insert(h::ORIGINAL_EXCHANGE.into(), long("orders"));
        let props = BasicProperties::default()
            .with_message_id("m1".into())
            .with_headers(t);
        let copy = replay_properties(&props, "replay-1", (Some("amq.direct"), Some("rk")));
        let headers = copy.headers().clone().unwrap();
        let t = headers.inner();
        for gone in STRIPPED_ON_REPLAY
            .iter()
            .chain(&BROKER_DEATH_HEADERS)
            .chain(&DELIVERY_HEADERS)
        {
            assert!(!t.contains_key(*gone), "{gone}");
        }
        assert_eq!(t.get("x-tenant"), Some(&long("acme")));
        // Already set: kept; missing: taken from the broker's route.
        assert_eq!(t.get(h::ORIGINAL_EXCHANGE), Some(&long("orders")));
        assert_eq!(t.get(h::ORIGINAL_ROUTING_KEY), Some(&long("rk")));
        assert_eq!(t.get(REPLAY_HEADER), Some(&long("replay-1")));
        assert_eq!(copy.message_id(), props.message_id());

        let restored = restored_properties(&props);
        let t = restored.headers().clone().unwrap();
        assert!(!t.inner().contains_key("x-delivery-count"));
        assert!(t.inner().contains_key("x-death") && t.inner().contains_key(h::ERROR));
    }
}
