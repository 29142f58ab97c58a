//! `idem topology`: declare the queues of a work queue, the exchanges it is fed from
//! and its bindings, or show what exists.
//!
//! Exchanges are given as `--exchange NAME=TYPE` (`direct`, `topic` or `fanout`) and
//! bindings of the work queue as `--bind EXCHANGE[=ROUTING_KEY]` (no key: `""`). `=`
//! cannot appear in an exchange name, so the first `=` splits.

use std::time::Duration;

use idem_amqp::topology::tier_name;
use idem_amqp::DelayTiers;
use idem_amqp::{Exchange, ExchangeKind, QueueType, Topology};
use lapin::Connection;
use serde::Serialize;

use crate::broker::{close_channel, exchange_exists, open_channel, probe};
use crate::error::CliError;

/// Parses a tier list such as `1s,5s,30s,2m,500ms,1h`.
///
/// ```
/// use std::time::Duration;
/// let tiers = idem_cli::topology::parse_tiers("500ms,5s,2m").unwrap();
/// assert_eq!(tiers.as_slice()[2], Duration::from_secs(120));
/// ```
pub fn parse_tiers(list: &str) -> Result<DelayTiers, CliError> {
    let mut tiers = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        tiers.push(parse_duration(part)?);
    }
    DelayTiers::new(tiers).ok_or_else(|| {
        CliError::Usage(format!(
            "invalid --tiers {list:?}: give at least one non-zero delay"
        ))
    })
}

fn parse_duration(s: &str) -> Result<Duration, CliError> {
    let bad = || {
        CliError::Usage(format!(
            "invalid delay {s:?}: use a number with ms, s, m or h (e.g. 500ms, 5s, 2m, 1h)"
        ))
    };
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let n: u64 = s[..split].parse().map_err(|_| bad())?;
    let ms = match &s[split..] {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }
    .ok_or_else(bad)?;
    if ms == 0 {
        return Err(bad());
    }
    Ok(Duration::from_millis(ms))
}

/// Declares `topology` (idempotent). A queue that exists with other arguments is an
/// error (exit 4).
pub async fn declare(conn: &Connection, topology: &Topology) -> Result<(), CliError> {
    let channel = open_channel(conn).await?;
    let result = topology.declare_on(&channel).await;
    close_channel(&channel).await;
    result.map_err(|e| match e {
        idem_amqp::Error::NameTooLong(_) => CliError::Usage(e.to_string()),
        idem_amqp::Error::Inequivalent { .. }
        | idem_amqp::Error::ExchangeInequivalent { .. }
        | idem_amqp::Error::Topology(_) => CliError::Failed(e.to_string()),
        other => CliError::Failed(format!(
            "{other} (if a queue already exists with other arguments, e.g. classic vs --quorum or other tiers, delete it first or use the same options)"
        )),
    })
}

/// One queue, exchange or binding of a topology and its state.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueueState {
    /// Queue or exchange name (for a binding: the exchange bound to).
    pub name: String,
    /// `work`, `dead-letter`, `retry <tier>`, `exchange <type>` or `binding`.
    pub role: String,
    /// Whether it exists; `None` for a binding (AMQP 0-9-1 cannot list bindings, so
    /// they are shown as configured, not checked).
    pub exists: Option<bool>,
    /// Ready messages (None if missing, or not a queue).
    pub messages: Option<u32>,
    /// Consumers (None if missing, or not a queue).
    pub consumers: Option<u32>,
    /// A binding's routing key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing_key: Option<String>,
}

/// The state of every queue of `topology`, then of its exchanges, then its bindings
/// (passive declares, one throwaway channel per queue or exchange; nothing is created).
/// Bindings are listed as configured: AMQP cannot list them (`rabbitmqctl
/// list_bindings` can).
pub async fn show(conn: &Connection, topology: &Topology) -> Result<Vec<QueueState>, CliError> {
    let mut roles = vec![
        (topology.queue().to_owned(), "work".to_owned()),
        (topology.dlq(), "dead-letter".to_owned()),
    ];
    for tier in topology.get_tiers().as_slice() {
        roles.push((
            topology.retry_queue(*tier),
            format!("retry {}", tier_name(*tier)),
        ));
    }
    let mut states = Vec::with_capacity(roles.len());
    for (name, role) in roles {
        let counts = probe(conn, &name).await?;
        states.push(QueueState {
            exists: Some(counts.is_some()),
            messages: counts.map(|c| c.messages),
            consumers: counts.map(|c| c.consumers),
            name,
            role,
            routing_key: None,
        });
    }
    for x in topology.exchanges() {
        states.push(QueueState {
            name: x.name().to_owned(),
            role: format!("exchange {}", x.kind()),
            exists: Some(exchange_exists(conn, x.name()).await?),
            messages: None,
            consumers: None,
            routing_key: None,
        });
    }
    for b in topology.bindings() {
        states.push(QueueState {
            name: b.exchange().to_owned(),
            role: "binding".to_owned(),
            exists: None,
            messages: None,
            consumers: None,
            routing_key: Some(b.routing_key().to_owned()),
        });
    }
    Ok(states)
}

/// `show`'s table: one line per queue, exchange and binding.
pub fn write_table(
    states: &[QueueState],
    out: &mut dyn std::io::Write,
    width: usize,
) -> std::io::Result<()> {
    let mut t = crate::render::Table::new(
        &["NAME", "ROLE", "STATE", "MESSAGES", "CONSUMERS"],
        &[80, 40, 9, 10],
    );
    let num = |n: Option<u32>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    for s in states {
        let role = match &s.routing_key {
            Some(key) => format!("binding, key {key:?}"),
            None => s.role.clone(),
        };
        let state = match s.exists {
            Some(true) => "ok",
            Some(false) => "MISSING",
            None => "unchecked",
        };
        t.row(vec![
            s.name.clone(),
            role,
            state.to_owned(),
            num(s.messages),
            num(s.consumers),
        ]);
    }
    t.write(out, width)?;
    if states.iter().any(|s| s.exists.is_none()) {
        writeln!(
            out,
            "bindings are shown as configured: AMQP cannot list them (`rabbitmqctl list_bindings` does)"
        )?;
    }
    Ok(())
}

/// Parses `--exchange NAME=TYPE` (`direct`, `topic` or `fanout`).
///
/// ```
/// let x = idem_cli::topology::parse_exchange("orders=fanout").unwrap();
/// assert_eq!((x.name(), x.kind()), ("orders", idem_amqp::ExchangeKind::Fanout));
/// ```
pub fn parse_exchange(text: &str) -> Result<Exchange, CliError> {
    let bad = || {
        CliError::Usage(format!(
            "invalid --exchange {text:?}: use NAME=TYPE with TYPE direct, topic or fanout (e.g. orders=fanout)"
        ))
    };
    let (name, kind) = text.split_once('=').ok_or_else(bad)?;
    let kind = ExchangeKind::parse(kind.trim()).ok_or_else(bad)?;
    if name.is_empty() {
        return Err(bad());
    }
    Ok(Exchange::new(name, kind))
}

/// Parses `--bind EXCHANGE[=ROUTING_KEY]` into the exchange and the key (`""` when
/// none is given).
pub fn parse_binding(text: &str) -> Result<(String, String), CliError> {
    let (exchange, key) = text.split_once('=').unwrap_or((text, ""));
    if exchange.is_empty() {
        return Err(CliError::Usage(format!(
            "invalid --bind {text:?}: use EXCHANGE or EXCHANGE=ROUTING_KEY (e.g. orders=order.created)"
        )));
    }
    Ok((exchange.to_owned(), key.to_owned()))
}

/// `topology` with the exchanges (`--exchange`) and bindings (`--bind`) given.
pub fn with_routing(
    mut topology: Topology,
    exchanges: &[String],
    bindings: &[String],
) -> Result<Topology, CliError> {
    for x in exchanges {
        topology = topology.exchange(parse_exchange(x)?);
    }
    for b in bindings {
        let (exchange, key) = parse_binding(b)?;
        topology = topology.bind(exchange, key);
    }
    topology
        .check()
        .map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(topology)
}

/// The topology for `queue` with these options.
pub fn topology_for(
    queue: &str,
    tiers: Option<&str>,
    quorum: bool,
    delivery_limit: Option<u32>,
) -> Result<Topology, CliError> {
    let mut t = Topology::new(queue);
    if let Some(list) = tiers {
        t = t.tiers(parse_tiers(list)?);
    }
    if quorum {
        t = t.queue_type(QueueType::Quorum);
    }
    if let Some(limit) = delivery_limit {
        if !quorum {
            return Err(CliError::Usage(
                "--delivery-limit needs --quorum".to_owned(),
            ));
        }
        t = t.delivery_limit(limit);
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_parse() {
        let t = parse_tiers("1s, 5s,30s").unwrap();
        assert_eq!(
            t.as_slice(),
            &[
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30)
            ]
        );
        assert!(parse_tiers("").is_err());
        assert!(parse_tiers("5").is_err());
        assert!(parse_tiers("0s").is_err());
        assert!(parse_tiers("5d").is_err());
        assert!(parse_tiers("s").is_err());
        assert!(topology_for("q", None, false, Some(3)).is_err());
    }

    #[test]
    fn exchanges_and_bindings_parse() {
        let t = with_routing(
            Topology::new("billing"),
            &["orders=topic".to_owned()],
            &["orders=order.*".to_owned(), "audit-all".to_owned()],
        )
        .unwrap();
        assert_eq!(t.exchanges(), &[Exchange::topic("orders")]);
        let b: Vec<(&str, &str)> = t
            .bindings()
            .iter()
            .map(|b| (b.exchange(), b.routing_key()))
            .collect();
        assert_eq!(b, [("orders", "order.*"), ("audit-all", "")]);
        // A key may hold '=': only the first one splits.
        assert_eq!(
            parse_binding("x=a=b").unwrap(),
            ("x".to_owned(), "a=b".to_owned())
        );
        for bad in ["orders", "orders=headers", "=fanout"] {
            assert!(parse_exchange(bad).is_err(), "{bad}");
        }
        assert!(parse_binding("=key").is_err());
        // What the broker would refuse is refused before connecting.
        for (xs, bs) in [
            (vec!["orders=topic", "orders=fanout"], vec![]),
            (vec!["amq.topic=topic"], vec![]),
        ] {
            let xs: Vec<String> = xs.into_iter().map(str::to_owned).collect();
            let bs: Vec<String> = bs;
            let err = with_routing(Topology::new("q"), &xs, &bs).unwrap_err();
            assert!(matches!(err, CliError::Usage(_)), "{err}");
        }
    }
}
