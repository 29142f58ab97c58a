//! One connection's session: open the channels, consume until shutdown, loss or a
//! breaker pause, then close. A session dropped before it closed (its worker's
//! future was dropped) closes its connection from `Drop`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::future::Fuse;
use futures_util::StreamExt;
use idem_core::ordered::Admit;
use idem_core::DeliveryMode;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Event};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::lane::{run_lane, run_unkeyed, Job};
use super::settle::{handle, prepare, report, Record};
use super::{breaker_opens, drain, End, Shared};
use crate::acks::AckCoalescer;
use crate::error::Error;
use crate::health::WorkerHealth;

/// The connection a session consumes on: its own, or one shared with other workers of
/// a [`Service`](crate::Service), which the session never closes (it closes only its
/// channels).
enum Conn {
    Own(Box<Connection>),
    Shared(Arc<Connection>),
}

impl std::ops::Deref for Conn {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        match self {
            Conn::Own(c) => c,
            Conn::Shared(c) => c,
        }
    }
}

pub(super) struct Session {
    /// `None` once closed (or handed to the closing task by `Drop`).
    conn: Option<Conn>,
    // Shared by the delivery tasks: one Arc clone per delivery instead of a Channel clone.
    publish: Arc<Channel>,
    consume: Channel,
    stream: lapin::Consumer,
    /// The task logging the connection's events (the shared connection has its own).
    events: Option<JoinHandle<()>>,
    /// This channel's ack coalescer (tags restart with each channel); `None` when acks
    /// are sent one per delivery.
    acks: Option<AckCoalescer<Record>>,
    /// The worker's health: told when this session's connection goes.
    health: Arc<WorkerHealth>,
    /// The dead-letter queue sampler, on its own channel.
    sampler: Option<JoinHandle<()>>,
    /// Turns true when the session ends: ordered deliveries waiting to retry in
    /// place stop waiting.
    lane_stop: watch::Sender<bool>,
}

impl Drop for Session {
    /// A session ends through [`Session::consume`], which closes it. Reaching `Drop`
    /// with the connection still held means the worker's future was dropped mid-way:
    /// close the connection now, so the broker hands every unacked delivery back at
    /// once instead of when the process exits. Handler tasks were aborted by the
    /// worker's task set; the coalescer's flusher by its own `Drop`.
    /// On a shared connection only the channels go: they close when their last
    /// handle is dropped, with the session and its aborted handler tasks.
    fn drop(&mut self) {
        self.stop_events();
        self.stop_watching();
        let Some(Conn::Own(conn)) = self.conn.take() else {
            return;
        };
        if !conn.status().connected() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = conn.close(200, "worker dropped".into()).await {
                        tracing::debug!(error = %e, "closing a dropped worker's connection");
                    }
                });
            }
            // No runtime (dropped after it shut down): the socket goes with the
            // process; lapin also closes a connection when its last handle is dropped.
            Err(_) => drop(conn),
        }
    }
}

impl Session {
    pub(super) async fn open(shared: &Arc<Shared>) -> Result<Session, Error> {
        let (conn, url) = match &shared.shared_connection {
            Some(pool) => (Conn::Shared(pool.get().await?), None),
            None => {
                let (conn, url) = shared
                    .endpoints
                    .connect_indexed(&shared.connection_name, &shared.tls)
                    .await?;
                (Conn::Own(Box::new(conn)), Some(url))
            }
        };
        match Self::channels(shared, &conn).await {
            Ok((publish, consume, stream)) => {
                let events = url.map(|url| tokio::spawn(log_events(conn.events_listener(), url)));
                shared.health.connected(conn.status().clone());
                let sampler = spawn_sampler(shared, &conn).await;
                tracing::info!(queue = %shared.topology.queue(), prefetch = shared.prefetch, "consuming");
                let acks = shared.acks.flush.map(|(batch, interval)| {
                    let hooked = shared.clone();
                    AckCoalescer::spawn(consume.clone(), batch, interval, move |done| {
                        report(&hooked, done)
                    })
                });
                Ok(Session {
                    conn: Some(conn),
                    publish: Arc::new(publish),
                    consume,
                    stream,
                    events,
                    acks,
                    health: shared.health.clone(),
                    sampler,
                    lane_stop: watch::Sender::new(false),
                })
            }
            Err(e) => {
                // A shared connection stays; the channels opened so far close when dropped.
                if let Conn::Own(conn) = conn {
                    let _ = conn.close(200, "setup failed".into()).await;
                }
                Err(e)
            }
        }
    }

    async fn channels(
        shared: &Shared,
        conn: &Connection,
    ) -> Result<(Channel, Channel, lapin::Consumer), Error> {
        let publish = conn
            .create_channel()
            .await
            .map_err(Error::amqp("channel.open"))?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(Error::amqp("confirm.select"))?;
        if shared.topology.get_declare() {
            shared.topology.declare_on(&publish).await?;
        }
        let consume = conn
            .create_channel()
            .await
            .map_err(Error::amqp("channel.open"))?;
        consume
            .basic_qos(shared.prefetch, BasicQosOptions::default())
            .await
            .map_err(Error::amqp("basic.qos"))?;
        let stream = consume
            .basic_consume(
                shared.queue.clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(Error::amqp("basic.consume"))?;
        Ok((publish, consume, stream))
    }

    pub(super) async fn consume<F: Future<Output = ()>>(
        mut self,
        shared: &Arc<Shared>,
        permits: &Arc<Semaphore>,
        tasks: &mut JoinSet<()>,
        mut shutdown: Pin<&mut Fuse<F>>,
    ) -> End {
        let end = loop {
            // Forget the tasks that ended (their results are `()`).
            while let Some(done) = tasks.try_join_next() {
                if let Err(e) = done {
                    if e.is_panic() {
                        tracing::error!(error = %e, "a delivery task panicked; the broker redelivers its message");
                    }
                }
            }
            let permit = tokio::select! {
                biased;
                _ = &mut shutdown => break End::Shutdown,
                _ = breaker_opens(shared) => break End::Paused,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break End::Shutdown,
                },
            };
            let next = tokio::select! {
                biased;
                _ = &mut shutdown => break End::Shutdown,
                _ = breaker_opens(shared) => break End::Paused,
                d = self.stream.next() => d,
            };
            match next {
                Some(Ok(delivery)) => {
                    if let Some(end) = self
                        .dispatch(shared, delivery, permit, tasks, shutdown.as_mut())
                        .await
                    {
                        break end;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, queue = %shared.topology.queue(), "consumer error");
                    break End::Lost;
                }
                None => {
                    tracing::warn!(queue = %shared.topology.queue(), "consumer ended (cancelled by the broker or channel closed)");
                    break End::Lost;
                }
            }
        };
        self.wind_down(end, shared, permits).await
    }

    /// Hands one delivery to its task: at once, or through its key's lane on an
    /// ordered worker (waiting while the lane is full). `Some` when the session must
    /// end instead.
    async fn dispatch<F: Future<Output = ()>>(
        &self,
        shared: &Arc<Shared>,
        delivery: Delivery,
        permit: OwnedSemaphorePermit,
        tasks: &mut JoinSet<()>,
        mut shutdown: Pin<&mut Fuse<F>>,
    ) -> Option<End> {
        // At-most-once acks each delivery before its handler: not coalesced.
        let settler = match &self.acks {
            Some(acks)
                if shared.consumer.mode() != DeliveryMode::AtMostOnce
                    && acks.register(delivery.delivery_tag) =>
            {
                Some(acks.settler())
            }
            _ => None,
        };
        let Some(ordered) = &shared.ordered else {
            tasks.spawn(handle(
                shared.clone(),
                self.publish.clone(),
                delivery,
                settler,
                permit,
            ));
            return None;
        };
        let prepared = prepare(shared, delivery);
        let Some(key) = ordered.key.key_of(&prepared.msg) else {
            let publish = self.publish.clone();
            tasks.spawn(run_unkeyed(
                shared.clone(),
                publish,
                prepared,
                settler,
                permit,
            ));
            return None;
        };
        let job = Job::new(
            prepared,
            settler,
            self.publish.clone(),
            self.lane_stop.subscribe(),
        );
        // Waits while the key's lane (or all lanes) are full: back-pressure.
        let admitted = tokio::select! {
            biased;
            _ = &mut shutdown => return Some(End::Shutdown),
            _ = breaker_opens(shared) => return Some(End::Paused),
            a = ordered.lanes.admit(&key, job) => a,
        };
        if let Admit::Run(job) = admitted {
            tasks.spawn(run_lane(shared.clone(), key, job, permit));
        }
        // Parked: it takes a permit when its lane reaches it; this one is free.
        None
    }

    /// Ends the session: parked deliveries handed back, in-flight handlers finished
    /// (on a shutdown or a pause), pending acks sent, the channel closed. Returns
    /// `end`.
    async fn wind_down(mut self, end: End, shared: &Arc<Shared>, permits: &Arc<Semaphore>) -> End {
        // Parked deliveries of this session go back to the queue when its channel
        // closes (ahead of anything not yet delivered); in-place retry waits hand
        // their delivery back. In this order: a runner whose head was handed back
        // finds no follower to run ahead of it.
        if let Some(ordered) = &shared.ordered {
            drop(ordered.lanes.clear());
        }
        let _ = self.lane_stop.send(true);
        if let End::Shutdown = end {
            tracing::info!(queue = %shared.topology.queue(), "shutting down: cancelling the consumer and finishing in-flight handlers");
            let tag = self.stream.tag();
            if let Err(e) = self
                .consume
                .basic_cancel(tag, BasicCancelOptions::default())
                .await
            {
                tracing::warn!(error = %e, "basic.cancel failed");
            }
            drain(permits, shared).await;
        }
        if let End::Paused = end {
            // Handlers in flight settle on this channel (a store failure is nacked
            // back, uncharged); closing then returns the prefetched deliveries.
            drain(permits, shared).await;
        }
        if let Some(acks) = self.acks.take() {
            match end {
                // The settled deliveries' acks go out before the channel closes.
                End::Shutdown | End::Paused => acks.close(shared.shutdown_timeout).await,
                // Nothing can be sent on a lost channel: the broker redelivers.
                End::Lost => acks.abandon(),
            }
        }
        self.close().await;
        end
    }

    /// The connection is no longer this worker's: readiness and the sampler stop
    /// looking at it.
    fn stop_watching(&mut self) {
        self.health.disconnected();
        if let Some(s) = self.sampler.take() {
            s.abort();
        }
    }

    fn stop_events(&mut self) {
        if let Some(events) = self.events.take() {
            events.abort();
        }
    }

    async fn close(mut self) {
        self.stop_events();
        self.stop_watching();
        let Some(conn) = self.conn.take() else { return };
        if conn.status().connected() {
            let _ = self.consume.close(200, "bye".into()).await;
            let _ = self.publish.close(200, "bye".into()).await;
            if let Conn::Own(conn) = conn {
                let _ = conn.close(200, "bye".into()).await;
            }
        }
    }
}

pub(super) async fn log_events(events: impl futures_util::Stream<Item = Event>, url: String) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Event::Error(e) => tracing::warn!(url = %url, error = %e, "RabbitMQ connection error"),
            Event::ConnectionBlocked(reason) => {
                tracing::warn!(url = %url, %reason, "RabbitMQ blocked the connection (resource alarm); publishes wait")
            }
            Event::ConnectionUnblocked => {
                tracing::info!(url = %url, "RabbitMQ unblocked the connection")
            }
            _ => {}
        }
    }
}

/// Starts the dead-letter queue sampler on a channel of its own (none when sampling is
/// off, or without the `prometheus` feature).
#[cfg(feature = "prometheus")]
async fn spawn_sampler(shared: &Shared, conn: &Connection) -> Option<JoinHandle<()>> {
    if shared.dlq_sample_interval.is_zero() {
        return None;
    }
    match conn.create_channel().await {
        Ok(ch) => Some(tokio::spawn(crate::health::sample_dlq(
            ch,
            shared.dlq.clone(),
            shared.dlq_sample_interval,
            shared.health.clone(),
        ))),
        Err(e) => {
            tracing::warn!(error = %e, "no channel for the dead-letter queue sampler");
            None
        }
    }
}

#[cfg(not(feature = "prometheus"))]
async fn spawn_sampler(_: &Shared, _: &Connection) -> Option<JoinHandle<()>> {
    None
}
