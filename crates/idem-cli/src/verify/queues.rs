//! The queues of a topology, read without consuming (the `dlq` reads' walk, see
//! [`crate::dlq::visit_queue`]).

use std::collections::HashMap;
use std::time::Duration;

use idem_amqp::Topology;
use lapin::Connection;

use crate::broker::probe;
use crate::error::CliError;

/// Which queue of the topology a copy is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    /// The work queue.
    Work,
    /// A delay queue of this tier.
    Delay(Duration),
    /// The DLQ.
    Dead,
}

/// One message found in a queue.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Copy {
    pub(super) queue: String,
    pub(super) role: Role,
    /// Its AMQP message id.
    pub(super) id: Option<String>,
    /// Its key: `x-idem-key`, else the message id.
    pub(super) key: Option<String>,
    /// When it was dead-lettered (RFC 3339; DLQ copies).
    pub(super) dead_lettered_at: Option<String>,
}

/// Every message of the topology's queues.
#[derive(Clone, Debug, Default)]
pub(super) struct Seen {
    pub(super) copies: Vec<Copy>,
}

impl Seen {
    /// Where each message id was found (the DLQ first, then a delay queue, then the
    /// work queue, when a message has copies in several).
    pub(super) fn by_id(&self) -> HashMap<&str, Role> {
        let rank = |r: Role| match r {
            Role::Dead => 0,
            Role::Delay(_) => 1,
            Role::Work => 2,
        };
        let mut map: HashMap<&str, Role> = HashMap::new();
        for c in &self.copies {
            if let Some(id) = c.id.as_deref() {
                let e = map.entry(id).or_insert(c.role);
                if rank(c.role) < rank(*e) {
                    *e = c.role;
                }
            }
        }
        map
    }
}

/// Reads the DLQ, the delay queues (longest tier first) and the work queue of
/// `topology`. A missing work queue is an error (a wrong name or vhost would make
/// every id look lost); a missing delay queue or DLQ is noted in `notes` and
/// skipped, as are consumers on the work queue (their unacked deliveries cannot be
/// read).
pub(super) async fn read(
    conn: &Connection,
    topology: &Topology,
    notes: &mut Vec<String>,
) -> Result<Seen, CliError> {
    if probe(conn, topology.queue()).await?.is_none() {
        return Err(CliError::NotFound(format!(
            "work queue {:?} does not exist: check the name and the vhost in --url",
            topology.queue()
        )));
    }
    let mut queues = vec![(topology.dlq(), Role::Dead)];
    let mut tiers = topology.get_tiers().as_slice().to_vec();
    tiers.sort_unstable_by(|a, b| b.cmp(a));
    for tier in tiers {
        queues.push((topology.retry_queue(tier), Role::Delay(tier)));
    }
    queues.push((topology.queue().to_owned(), Role::Work));
    let mut seen = Seen::default();
    for (queue, role) in queues {
        let Some(counts) = probe(conn, &queue).await? else {
            notes.push(format!("queue {queue} does not exist: not read"));
            continue;
        };
        if role == Role::Work && counts.consumers > 0 {
            notes.push(format!(
                "{queue} has {} consumer(s): deliveries they hold unacked cannot be read; an id found only by the second look counts as in flight",
                counts.consumers
            ));
        }
        if counts.messages == 0 {
            continue;
        }
        crate::dlq::visit_queue(conn, &queue, |_, entry| {
            let key = entry.key.clone().or_else(|| entry.message_id.clone());
            let dead_lettered_at = (role == Role::Dead).then(|| entry.last_time()).flatten();
            seen.copies.push(Copy {
                queue: queue.clone(),
                role,
                id: entry.message_id,
                key,
                dead_lettered_at,
            });
        })
        .await?;
    }
    Ok(seen)
}
