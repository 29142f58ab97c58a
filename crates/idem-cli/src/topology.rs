//! `idem topology`: declare the queues of a work queue, or show what exists.

use std::time::Duration;

use idem_amqp::topology::tier_name;
use idem_amqp::DelayTiers;
use idem_amqp::{QueueType, Topology};
use lapin::Connection;
use serde::Serialize;

use crate::broker::{close_channel, open_channel, probe};
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
        idem_amqp::Error::Inequivalent { .. } => CliError::Failed(e.to_string()),
        other => CliError::Failed(format!(
            "{other} (if a queue already exists with other arguments, e.g. classic vs --quorum or other tiers, delete it first or use the same options)"
        )),
    })
}

/// One queue of a topology and its state.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueueState {
    /// Queue name.
    pub name: String,
    /// `work`, `dead-letter` or `retry <tier>`.
    pub role: String,
    /// Whether the queue exists.
    pub exists: bool,
    /// Ready messages (None if missing).
    pub messages: Option<u32>,
    /// Consumers (None if missing).
    pub consumers: Option<u32>,
}

/// The state of every queue of `topology` (passive declares, one throwaway channel
/// per queue; nothing is created).
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
            exists: counts.is_some(),
            messages: counts.map(|c| c.messages),
            consumers: counts.map(|c| c.consumers),
            name,
            role,
        });
    }
    Ok(states)
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
}
