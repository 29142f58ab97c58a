//! The relay as a [`HostedTask`] of an [`idem_amqp::Service`]: one process runs its
//! consumers and its outbox relay, with one listener and one graceful stop.
//!
//! `idem-outbox` builds on `idem-amqp`, so the service cannot name the relay; the
//! relay implements the service's seam for work that is not a consumer instead.
//! Hosted, a relay does what [`Relay::run`] does, with the service's stop as its
//! shutdown: on SIGTERM it finishes the round under way (its rows are published,
//! confirmed and marked, or the round fails and they stay pending), closes its broker
//! connection and returns, within the service's shutdown timeout. A relay still in a
//! round at that timeout is dropped: its transaction rolls back and the rows it had
//! published are published again by the next relay (same `message_id`, absorbed by
//! the consumers' dedup). [`Relay::run`] never fails (it retries database and broker
//! failures), so a hosted relay never stops the service.
//!
//! Its readiness source is the one [`RelayBuilder::readiness`](crate::RelayBuilder::readiness)
//! asks for: give it [`Readiness::global`](idem_amqp::readiness::Readiness::global),
//! the registry the service's listener serves, and `/ready` answers 503 while the
//! oldest pending row is older than the threshold.
//!
//! ```no_run
//! use std::time::Duration;
//! use idem_amqp::readiness::Readiness;
//! use idem_amqp::{Service, Topology};
//! use idem_core::{Consumer, MemoryStore};
//! use idem_outbox::{Outbox, Relay};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let url = idem_amqp::amqp_url_from_env();
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres").await?;
//! let relay = Relay::builder(pool, Outbox::new("idem_outbox")?, &url)
//!     .readiness(&Readiness::global(), Duration::from_secs(60))
//!     .build();
//! let deposits = Consumer::builder("deposits").store(MemoryStore::new()).handler(|| async {})?;
//! Service::builder(&url)
//!     .listen("0.0.0.0:9090".parse()?) // /ready waits for the consumer and the relay
//!     .consumer(Topology::new("deposits"), deposits, |w| w.prefetch(20))
//!     .task(relay)
//!     .build()?
//!     .run_until_signal()
//!     .await?;
//! # Ok(()) }
//! ```

use futures_util::future::BoxFuture;
use idem_amqp::service::{HostedTask, TaskContext, TaskError};

use crate::relay::Relay;

impl HostedTask for Relay {
    /// `outbox-relay:<table>`.
    fn name(&self) -> String {
        format!("outbox-relay:{}", self.outbox().table_name())
    }

    fn run(self: Box<Self>, ctx: TaskContext) -> BoxFuture<'static, Result<(), TaskError>> {
        Box::pin(async move {
            let stats = Relay::run(&self, ctx.shutdown()).await?;
            tracing::info!(
                table = %self.outbox().table_name(),
                published = stats.published,
                refused = stats.refused,
                "outbox relay stopped"
            );
            self.close().await;
            Ok(())
        })
    }
}
