//! `idem dlq purge`.

use lapin::options::QueuePurgeOptions;
use lapin::Connection;

use super::scan::Scan;
use super::{MoveReport, MovedMessage, Selector};
use crate::broker::queue_name;
use crate::error::CliError;

/// Deletes the selected messages of the DLQ of `queue` (see [`resolve`](super::resolve); `--all`
/// purges the whole queue, including messages dead-lettered while the command runs).
/// With `dry_run`, only reports what would be deleted.
pub async fn purge(
    conn: &Connection,
    queue: &str,
    selector: &Selector,
    dry_run: bool,
) -> Result<MoveReport, CliError> {
    let mut scan = Scan::open(conn, queue).await?;
    let mut report = MoveReport::new(scan.dlq.clone(), None, dry_run);
    if matches!(selector, Selector::All) && !dry_run {
        let result = scan
            .channel
            .queue_purge(queue_name(&scan.dlq)?, QueuePurgeOptions::default())
            .await
            .map_err(CliError::amqp("queue.purge"));
        scan.finish(Ok(())).await?;
        let purged = u64::from(result?);
        report.scanned = purged;
        report.matched = purged;
        report.done = purged;
        return Ok(report);
    }
    let result = async {
        while let Some((delivery, entry)) = scan.next().await? {
            report.scanned += 1;
            if !selector.matches(&entry) {
                scan.restore(&delivery, entry.position).await?;
                continue;
            }
            report.matched += 1;
            let outcome = if dry_run {
                scan.restore(&delivery, entry.position).await?;
                "would purge"
            } else {
                scan.ack(delivery.delivery_tag);
                report.done += 1;
                "purged"
            };
            report.messages.push(MovedMessage {
                position: entry.position,
                message_id: entry.message_id,
                target: None,
                outcome: outcome.to_owned(),
            });
        }
        Ok::<_, CliError>(())
    }
    .await;
    scan.finish(result).await.map(|()| report)
}
