//! `idem dlq stats`: the "common problems" view of a DLQ.

use std::collections::BTreeMap;

use idem_core::__private::parse_rfc3339;
use lapin::Connection;
use serde::Serialize;

use super::filter::GroupKey;
use super::scan::Scan;
use super::Selector;
use crate::error::CliError;

/// Messages of one error kind whose errors normalise to the same text; for messages
/// the broker dead-lettered, of one reason and one queue.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ErrorGroup {
    /// The group's stable id (see [`GroupKey::id`]), for `--group`.
    pub id: String,
    /// `x-idem-error-kind`; for broker dead letters the reason (`expired`,
    /// `rejected`, ...); `unknown` when absent.
    pub error_kind: String,
    /// For broker dead letters: the queue they were dead-lettered from.
    pub queue: Option<String>,
    /// The normalised error text (see [`normalize_error`](crate::normalize::normalize_error)).
    pub error: String,
    /// Messages in the group.
    pub count: u64,
    /// Earliest `x-idem-first-failed-at` of the group.
    pub first_seen: Option<String>,
    /// Latest `x-idem-last-failed-at` of the group.
    pub last_seen: Option<String>,
    /// One original error text.
    pub example: String,
    /// Up to 3 message ids of the group.
    pub message_ids: Vec<String>,
}

/// The "common problems" view of a DLQ.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DlqStats {
    /// The dead-letter queue.
    pub dlq: String,
    /// Messages read.
    pub scanned: u64,
    /// Groups, largest first.
    pub groups: Vec<ErrorGroup>,
}

fn earlier(a: &Option<String>, b: &Option<String>, later: bool) -> Option<String> {
    let time = |s: &Option<String>| s.as_deref().and_then(parse_rfc3339);
    match (time(a), time(b)) {
        (Some(x), Some(y)) => {
            let pick_a: bool = if later { x >= y } else { x <= y };
            if pick_a {
                a.clone()
            } else {
                b.clone()
            }
        }
        (Some(_), None) => a.clone(),
        (None, _) => b.clone().or_else(|| a.clone()),
    }
}

/// Groups the messages of the DLQ of `queue` (the first `limit`, or all) by error kind
/// and normalised error text (broker dead letters: by reason and queue); every message
/// stays, in order.
pub async fn stats(
    conn: &Connection,
    queue: &str,
    limit: Option<u64>,
) -> Result<DlqStats, CliError> {
    stats_where(conn, queue, limit, &Selector::All).await
}

/// [`stats`] of the messages `selector` selects (the first `limit` of them).
pub async fn stats_where(
    conn: &Connection,
    queue: &str,
    limit: Option<u64>,
    selector: &Selector,
) -> Result<DlqStats, CliError> {
    let mut scan = Scan::open_reading(conn, queue).await?;
    let mut groups: BTreeMap<GroupKey, ErrorGroup> = BTreeMap::new();
    let mut scanned = 0;
    let result = async {
        while let Some((delivery, e)) = scan.next().await? {
            scan.restore(&delivery, e.position).await?;
            if limit.is_some_and(|l| scanned >= l) || !selector.matches(&e) {
                continue;
            }
            scanned += 1;
            let key = GroupKey::of(&e);
            let raw = e.error_text().unwrap_or_default();
            let g = groups.entry(key.clone()).or_insert_with(|| ErrorGroup {
                id: key.id(),
                error_kind: key.kind.clone(),
                queue: key.queue.clone(),
                error: key.error.clone(),
                count: 0,
                first_seen: None,
                last_seen: None,
                example: raw,
                message_ids: Vec::new(),
            });
            g.count += 1;
            g.first_seen = earlier(&g.first_seen, &e.first_time(), false);
            g.last_seen = earlier(&g.last_seen, &e.last_time(), true);
            if let (Some(id), true) = (e.message_id, g.message_ids.len() < 3) {
                g.message_ids.push(id);
            }
        }
        Ok::<_, CliError>(())
    }
    .await;
    let dlq = scan.dlq.clone();
    scan.finish(result).await?;
    let mut groups: Vec<ErrorGroup> = groups.into_values().collect();
    groups.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.error.cmp(&b.error)));
    Ok(DlqStats {
        dlq,
        scanned,
        groups,
    })
}
