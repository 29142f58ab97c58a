//! Coalesced acknowledgements: one `basic.ack` with `multiple=true` for a run of
//! settled deliveries instead of one frame per delivery.
//!
//! One [`AckCoalescer`] belongs to one consuming channel (one worker session). The
//! consume loop registers every delivery tag in the order the channel delivered it;
//! the delivery tasks settle tags in any order. A background flusher sends
//! `basic.ack(T, multiple=true)` where `T` is the highest tag such that every
//! registered tag up to `T` is settled, so an ack never covers a delivery that is
//! still running.
//!
//! A tag counts as settled when:
//! - its ack is due ([`Settle::Ack`]: the handler acked, a duplicate, or a retry or
//!   dead-letter copy that the broker has *confirmed*: the caller settles only after
//!   the confirm), or
//! - it was handed back individually ([`Settle::Requeued`]: the caller has already
//!   sent `basic.nack(requeue=true, multiple=false)` for it, so the broker no longer
//!   counts it as unacked).
//!
//! RabbitMQ answers a `multiple=true` ack whose own tag is not outstanding with
//! `PRECONDITION_FAILED - unknown delivery tag`, closing the channel. The flusher
//! therefore always names the highest *ack-due* tag of the run, never a requeued one;
//! a run made only of requeued tags sends nothing. Each tag leaves the coalescer once,
//! so no tag is acked twice, and the flusher is the only sender of acks, one frame at
//! a time, so a later `multiple` ack cannot overtake an earlier one. A requeue nack
//! is sent (and its frame queued) before its tag is settled here, so an ack that
//! covers its position is always sent after it.
//!
//! lapin keeps no per-delivery ack state for consumers beyond each
//! [`Acker`](lapin::Acker)'s single-use switch: `Channel::basic_ack` sends the frame
//! as asked. The coalesced deliveries' ackers are simply never used. (lapin drops its
//! prefetched buffer on `multiple=true` with tag 0, "everything"; tags start at 1 and
//! the coalescer never sends 0.)
//!
//! A flush happens when [`batch`](AckCoalescer::spawn) tags in a row are settled, or
//! `interval` after the first of them settled, whichever comes first, and a last time
//! when the session closes cleanly ([`AckCoalescer::close`]). When the channel is lost
//! ([`AckCoalescer::abandon`], or a failed ack) nothing more is sent: the broker
//! redelivers every unacked delivery of a dead channel and the dedup store absorbs
//! the repeats.
//!
//! Every settled tag carries a record `T` that the flusher hands to its `after`
//! callback once the ack covering it was sent (or dropped because the channel was
//! gone); the worker uses it to run the settle hook.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use lapin::options::BasicAckOptions;
use lapin::Channel;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How a registered delivery was settled.
#[derive(Debug)]
pub(crate) enum Settle<T> {
    /// Its ack is due; `T` is handed to the flusher's callback after the ack is sent.
    Ack(T),
    /// The caller already sent its `basic.nack(requeue=true)`; no ack may name it.
    Requeued,
}

#[derive(Debug)]
enum Slot<T> {
    Pending,
    Ack(T),
    Requeued,
}

/// The coalescer's bookkeeping, free of I/O (unit-tested below).
#[derive(Debug)]
struct Book<T> {
    /// Registered tags not yet flushed, in delivery order (strictly increasing).
    slots: VecDeque<(u64, Slot<T>)>,
    /// Length of the settled prefix of `slots`.
    ready: usize,
    /// The session ended: no more acks are sent, settles hand their record back.
    closed: bool,
    /// Flush what is ready now and stop.
    closing: bool,
}

/// What a flush takes out: the tag to ack with `multiple=true` (none if the run holds
/// only requeued tags) and the records of the acked tags.
#[derive(Debug, PartialEq)]
struct Run<T> {
    ack_up_to: Option<u64>,
    records: Vec<T>,
}

impl<T> Book<T> {
    fn new() -> Self {
        Book {
            slots: VecDeque::new(),
            ready: 0,
            closed: false,
            closing: false,
        }
    }

    /// Registers `tag`, delivered after every tag registered so far. A tag not above
    /// the last one is refused (false): it cannot be ordered safely.
    fn register(&mut self, tag: u64) -> bool {
        if tag == 0 || self.slots.back().is_some_and(|(last, _)| *last >= tag) {
            return false;
        }
        self.slots.push_back((tag, Slot::Pending));
        true
    }

    /// Settles `tag`. Returns the record back if it cannot be acked (the session
    /// ended, or the tag is not registered), so the caller can still report it.
    fn settle(&mut self, tag: u64, how: Settle<T>) -> Result<(), Option<T>> {
        let record = |how: Settle<T>| match how {
            Settle::Ack(r) => Some(r),
            Settle::Requeued => None,
        };
        if self.closed {
            return Err(record(how));
        }
        let Ok(i) = self.slots.binary_search_by_key(&tag, |(t, _)| *t) else {
            return Err(record(how));
        };
        let slot = &mut self.slots[i].1;
        if !matches!(slot, Slot::Pending) {
            return Err(record(how));
        }
        *slot = match how {
            Settle::Ack(r) => Slot::Ack(r),
            Settle::Requeued => Slot::Requeued,
        };
        while self
            .slots
            .get(self.ready)
            .is_some_and(|(_, s)| !matches!(s, Slot::Pending))
        {
            self.ready += 1;
        }
        Ok(())
    }

    /// Takes the settled prefix out.
    fn take_run(&mut self) -> Run<T> {
        let mut run = Run {
            ack_up_to: None,
            records: Vec::with_capacity(self.ready),
        };
        for (tag, slot) in self.slots.drain(..self.ready) {
            match slot {
                Slot::Ack(r) => {
                    run.ack_up_to = Some(tag);
                    run.records.push(r);
                }
                Slot::Requeued => {}
                Slot::Pending => unreachable!("the ready prefix holds settled tags only"),
            }
        }
        self.ready = 0;
        run
    }

    /// Ends the session: takes every settled record (their acks are not sent).
    fn close(&mut self) -> Vec<T> {
        self.closed = true;
        self.ready = 0;
        self.slots
            .drain(..)
            .filter_map(|(_, s)| match s {
                Slot::Ack(r) => Some(r),
                _ => None,
            })
            .collect()
    }
}

struct Inner<T> {
    book: Mutex<Book<T>>,
    wake: Notify,
    batch: usize,
}

impl<T> Inner<T> {
    fn lock(&self) -> MutexGuard<'_, Book<T>> {
        // The book stays consistent across a panic (each update is one step).
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The settling side of an [`AckCoalescer`], cloned into each delivery task.
pub(crate) struct AckSettler<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for AckSettler<T> {
    fn clone(&self) -> Self {
        AckSettler {
            inner: self.inner.clone(),
        }
    }
}

impl<T> AckSettler<T> {
    /// Settles `tag`. `Err(record)` when its ack will not be sent (the session is
    /// over): the caller reports the record itself.
    pub(crate) fn settle(&self, tag: u64, how: Settle<T>) -> Result<(), Option<T>> {
        let wake = {
            let mut book = self.inner.lock();
            let before = book.ready;
            book.settle(tag, how)?;
            (before == 0 && book.ready > 0)
                || (before < self.inner.batch && book.ready >= self.inner.batch)
        };
        if wake {
            self.inner.wake.notify_one();
        }
        Ok(())
    }
}

/// Coalesces the acks of one consuming channel; see the [module docs](self).
pub(crate) struct AckCoalescer<T> {
    inner: Arc<Inner<T>>,
    flusher: JoinHandle<()>,
    /// Set by `abandon`: the flusher ends by itself, reporting what it holds.
    detached: bool,
}

impl<T: Send + 'static> AckCoalescer<T> {
    /// Starts the flusher for `channel`: it acks after `batch` settled tags in a row
    /// or `interval` after the first one, and hands each acked tag's record to
    /// `after` once the ack is sent (or dropped with the channel).
    pub(crate) fn spawn(
        channel: Channel,
        batch: usize,
        interval: Duration,
        after: impl Fn(T) + Send + Sync + 'static,
    ) -> Self {
        let inner = Arc::new(Inner {
            book: Mutex::new(Book::new()),
            wake: Notify::new(),
            batch: batch.max(1),
        });
        let flusher = tokio::spawn(flush_loop(inner.clone(), channel, interval, after));
        AckCoalescer {
            inner,
            flusher,
            detached: false,
        }
    }

    /// Registers a delivery's tag; call in delivery order, before the delivery can be
    /// settled. False if the tag is out of order (then settle it outside).
    pub(crate) fn register(&self, tag: u64) -> bool {
        self.inner.lock().register(tag)
    }

    /// A handle for the delivery tasks.
    pub(crate) fn settler(&self) -> AckSettler<T> {
        AckSettler {
            inner: self.inner.clone(),
        }
    }

    /// Clean end of the session (shutdown, breaker pause): sends the ack of every
    /// settled run, then stops. Call after the handlers are drained and before the
    /// channel closes. Tags still running stay unacked (the channel close returns them).
    pub(crate) async fn close(mut self, timeout: Duration) {
        self.inner.lock().closing = true;
        self.inner.wake.notify_one();
        match tokio::time::timeout(timeout, &mut self.flusher).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "ack flusher ended abnormally"),
            Err(_) => tracing::warn!(
                "the last coalesced ack was not sent in time; closing: the broker redelivers those messages"
            ),
        }
    }

    /// The channel is gone: sends nothing more; settled records are handed to the
    /// callback by the flusher as it stops.
    pub(crate) fn abandon(mut self) {
        self.inner.lock().closed = true;
        self.inner.wake.notify_one();
        self.detached = true;
    }
}

impl<T> Drop for AckCoalescer<T> {
    /// Dropped without [`close`](Self::close) or [`abandon`](Self::abandon) (its
    /// worker's future was dropped): stop the flusher at once, so it neither acks
    /// nor keeps the channel, and with it the connection, open.
    fn drop(&mut self) {
        if !self.detached {
            self.flusher.abort();
        }
    }
}

async fn flush_loop<T>(
    inner: Arc<Inner<T>>,
    channel: Channel,
    interval: Duration,
    after: impl Fn(T),
) {
    loop {
        // Wait for a settled run (or the end).
        loop {
            let notified = inner.wake.notified();
            {
                let book = inner.lock();
                if book.closed || book.closing || book.ready > 0 {
                    break;
                }
            }
            notified.await;
        }
        // Let it grow up to `batch` tags or `interval`.
        let deadline = Instant::now() + interval;
        loop {
            let notified = inner.wake.notified();
            {
                let book = inner.lock();
                if book.closed || book.closing || book.ready >= inner.batch {
                    break;
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let (run, closing) = {
            let mut book = inner.lock();
            if book.closed {
                break;
            }
            (book.take_run(), book.closing)
        };
        if let Some(tag) = run.ack_up_to {
            #[cfg(feature = "_failpoints")]
            crate::failpoints::hit(crate::failpoints::BEFORE_ACK_FLUSH);
            let options = BasicAckOptions { multiple: true };
            if let Err(e) = channel.basic_ack(tag, options).await {
                tracing::warn!(error = %e, delivery_tag = tag, "coalesced ack not sent: the channel is gone; the broker redelivers these messages and dedup absorbs them");
                inner.lock().closed = true;
            }
        }
        for record in run.records {
            report(&after, record);
        }
        if closing {
            break;
        }
    }
    let left = inner.lock().close();
    for record in left {
        report(&after, record);
    }
}

/// Runs the callback; a panic in it (a user's settle hook) must not stop the flusher,
/// or every later ack of the channel would wait for the channel to close.
fn report<T>(after: &impl Fn(T), record: T) {
    let call = std::panic::AssertUnwindSafe(|| after(record));
    if std::panic::catch_unwind(call).is_err() {
        tracing::error!("the settle hook panicked; acks continue");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(tags: impl IntoIterator<Item = u64>) -> Book<u64> {
        let mut b = Book::new();
        for t in tags {
            assert!(b.register(t));
        }
        b
    }

    #[test]
    fn acks_only_the_contiguous_settled_prefix() {
        let mut b = book(1..=5);
        b.settle(2, Settle::Ack(2)).unwrap();
        b.settle(3, Settle::Ack(3)).unwrap();
        assert_eq!(b.ready, 0, "tag 1 still runs");
        assert_eq!(
            b.take_run(),
            Run {
                ack_up_to: None,
                records: vec![]
            }
        );
        b.settle(1, Settle::Ack(1)).unwrap();
        assert_eq!(b.ready, 3);
        assert_eq!(
            b.take_run(),
            Run {
                ack_up_to: Some(3),
                records: vec![1, 2, 3]
            }
        );
        b.settle(5, Settle::Ack(5)).unwrap();
        assert_eq!(b.ready, 0, "tag 4 still runs");
        b.settle(4, Settle::Ack(4)).unwrap();
        assert_eq!(b.take_run().ack_up_to, Some(5));
        assert!(b.slots.is_empty());
    }

    #[test]
    fn never_names_a_requeued_tag() {
        let mut b = book(1..=4);
        b.settle(1, Settle::Ack(1)).unwrap();
        b.settle(2, Settle::Requeued).unwrap();
        b.settle(3, Settle::Requeued).unwrap();
        // Tags 2 and 3 are no longer outstanding: the ack names 1, the last ack-due tag.
        assert_eq!(
            b.take_run(),
            Run {
                ack_up_to: Some(1),
                records: vec![1]
            }
        );
        b.settle(4, Settle::Requeued).unwrap();
        assert_eq!(
            b.take_run(),
            Run {
                ack_up_to: None,
                records: vec![]
            }
        );
    }

    #[test]
    fn a_tag_settles_once_and_only_if_registered() {
        let mut b = book([3, 4, 9]);
        assert_eq!(b.settle(5, Settle::Ack(5)), Err(Some(5)));
        b.settle(3, Settle::Ack(3)).unwrap();
        assert_eq!(b.settle(3, Settle::Ack(33)), Err(Some(33)));
        assert!(!b.register(9), "not after the last tag");
        assert!(!b.register(0), "tag 0 means everything to the broker");
        b.settle(9, Settle::Ack(9)).unwrap();
        assert_eq!(b.ready, 1, "a gap in the tags is fine, 4 is still running");
        b.settle(4, Settle::Requeued).unwrap();
        assert_eq!(b.take_run().ack_up_to, Some(9));
    }

    #[test]
    fn a_closed_book_acks_nothing_and_returns_records() {
        let mut b = book(1..=3);
        b.settle(1, Settle::Ack(1)).unwrap();
        b.settle(3, Settle::Ack(3)).unwrap();
        assert_eq!(b.close(), vec![1, 3]);
        assert_eq!(b.settle(2, Settle::Ack(2)), Err(Some(2)));
        assert_eq!(b.settle(2, Settle::Requeued), Err(None));
        assert_eq!(b.take_run().ack_up_to, None);
    }

    #[test]
    fn random_settle_orders_never_ack_a_running_tag() {
        for seed in 0..200u64 {
            let n = 64;
            let mut b = book(1..=n);
            let mut order: Vec<u64> = (1..=n).collect();
            // A small deterministic shuffle (xorshift).
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for i in (1..order.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                order.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut settled = std::collections::BTreeSet::new();
            let mut acked_up_to = 0;
            let mut records = Vec::new();
            for (i, tag) in order.into_iter().enumerate() {
                let how = if tag % 7 == 0 {
                    Settle::Requeued
                } else {
                    Settle::Ack(tag)
                };
                b.settle(tag, how).unwrap();
                settled.insert(tag);
                if i % 5 == 0 {
                    let run = b.take_run();
                    if let Some(t) = run.ack_up_to {
                        assert!(t > acked_up_to);
                        assert!((1..=t).all(|x| settled.contains(&x)), "seed {seed}");
                        assert!(t % 7 != 0, "names a requeued tag");
                        acked_up_to = t;
                    }
                    records.extend(run.records);
                }
            }
            records.extend(b.take_run().records);
            records.sort_unstable();
            let expected: Vec<u64> = (1..=n).filter(|t| t % 7 != 0).collect();
            assert_eq!(records, expected, "every ack-due tag exactly once");
        }
    }
}
