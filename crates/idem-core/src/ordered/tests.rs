use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::dedup::HeaderKey;
use crate::{Attempt, Backoff, Consumer, Disposition, HandlerError, Jitter, MemoryStore};

fn lanes(per_key: usize, total: usize) -> Lanes<u32> {
    Lanes::new(OrderLimits::new(per_key, total))
}

#[test]
fn one_head_per_key_and_arrival_order() {
    let l = lanes(8, 8);
    assert_eq!(l.try_admit("a", 1), Ok(Admit::Run(1)));
    assert_eq!(l.try_admit("a", 2), Ok(Admit::Parked));
    assert_eq!(l.try_admit("b", 10), Ok(Admit::Run(10)));
    assert_eq!(l.try_admit("a", 3), Ok(Admit::Parked));
    assert_eq!((l.active(), l.parked(), l.parked_behind("a")), (2, 2, 2));
    assert_eq!(l.next("a"), Some(2));
    assert_eq!(l.next("a"), Some(3));
    assert_eq!(l.next("b"), None);
    assert_eq!(l.next("a"), None);
    assert_eq!((l.active(), l.parked()), (0, 0));
    // A closed lane opens again with the next arrival as its head.
    assert_eq!(l.try_admit("a", 4), Ok(Admit::Run(4)));
}

#[test]
fn bounds_refuse_instead_of_dropping() {
    let l = lanes(2, 3);
    assert_eq!(l.try_admit("a", 1), Ok(Admit::Run(1)));
    assert_eq!(l.try_admit("a", 2), Ok(Admit::Parked));
    assert_eq!(l.try_admit("a", 3), Ok(Admit::Parked));
    // Per key: the item comes back to the caller.
    assert_eq!(l.try_admit("a", 4), Err(4));
    assert_eq!(l.try_admit("b", 20), Ok(Admit::Run(20)));
    assert_eq!(l.try_admit("b", 21), Ok(Admit::Parked));
    // In all: 3 parked.
    assert_eq!(l.try_admit("b", 22), Err(22));
    // A head without followers is never refused: it parks nothing.
    assert_eq!(l.try_admit("c", 30), Ok(Admit::Run(30)));
    assert_eq!(l.next("a"), Some(2));
    assert_eq!(l.try_admit("a", 4), Ok(Admit::Parked));
}

#[tokio::test]
async fn admit_waits_for_room_then_keeps_order() {
    let l = Arc::new(lanes(1, 10));
    assert_eq!(l.admit("a", 1).await, Admit::Run(1));
    assert_eq!(l.admit("a", 2).await, Admit::Parked);
    let waiting = tokio::spawn({
        let l = l.clone();
        async move { l.admit("a", 3).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiting.is_finished(), "a full lane must make admit wait");
    assert_eq!(l.next("a"), Some(2));
    assert_eq!(waiting.await.unwrap(), Admit::Parked);
    assert_eq!(l.next("a"), Some(3));
    assert_eq!(l.next("a"), None);
}

#[test]
fn poison_lasts_until_the_lane_closes() {
    let l = lanes(4, 4);
    assert_eq!(l.try_admit("a", 1), Ok(Admit::Run(1)));
    assert_eq!(l.try_admit("a", 2), Ok(Admit::Parked));
    l.poison("a");
    l.poison("nobody");
    assert!(l.is_poisoned("a") && !l.is_poisoned("nobody"));
    assert_eq!(l.next("a"), Some(2));
    assert!(l.is_poisoned("a"));
    assert_eq!(l.next("a"), None);
    assert!(!l.is_poisoned("a"));
}

#[test]
fn clear_returns_parked_items_in_order() {
    let l = lanes(4, 8);
    for (k, i) in [("a", 1), ("a", 2), ("a", 3), ("b", 7), ("b", 8)] {
        let _ = l.try_admit(k, i);
    }
    let mut out = l.clear();
    out.sort_unstable();
    assert_eq!(out, vec![2, 3, 8]);
    assert_eq!(l.parked(), 0);
    // The heads' runners find nothing more.
    assert_eq!(l.next("a"), None);
    assert_eq!(l.next("b"), None);
}

/// Many keys, random run times, a multi-threaded runtime: each key's items run one at
/// a time and in admission order, and keys overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runners_keep_per_key_order_under_concurrency() {
    const KEYS: u32 = 20;
    const PER_KEY: u32 = 30;
    let l: Arc<Lanes<(u32, u32)>> = Arc::new(Lanes::new(OrderLimits::new(4, 40)));
    let seen: Arc<Mutex<HashMap<u32, Vec<u32>>>> = Arc::default();
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let busy: Arc<Mutex<HashMap<u32, bool>>> = Arc::default();
    let mut runners = Vec::new();
    for seq in 0..PER_KEY {
        for key in 0..KEYS {
            let name = key.to_string();
            if let Admit::Run(first) = l.admit(&name, (key, seq)).await {
                let (l, seen, running, peak, busy) = (
                    l.clone(),
                    seen.clone(),
                    running.clone(),
                    peak.clone(),
                    busy.clone(),
                );
                runners.push(tokio::spawn(async move {
                    let mut item = first;
                    loop {
                        let was_busy = busy.lock().unwrap().insert(item.0, true);
                        assert_ne!(was_busy, Some(true), "two heads of key {} at once", item.0);
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        let pause = (item.0 * 7 + item.1 * 13) % 5;
                        tokio::time::sleep(Duration::from_millis(u64::from(pause))).await;
                        seen.lock().unwrap().entry(item.0).or_default().push(item.1);
                        running.fetch_sub(1, Ordering::SeqCst);
                        busy.lock().unwrap().insert(item.0, false);
                        match l.next(&item.0.to_string()) {
                            Some(next) => item = next,
                            None => break,
                        }
                    }
                }));
            }
        }
    }
    for r in runners {
        r.await.unwrap();
    }
    let seen = seen.lock().unwrap();
    for key in 0..KEYS {
        assert_eq!(seen[&key], (0..PER_KEY).collect::<Vec<_>>(), "key {key}");
    }
    assert!(
        peak.load(Ordering::SeqCst) > 1,
        "different keys must overlap"
    );
    assert_eq!((l.active(), l.parked()), (0, 0));
}

#[test]
fn order_key_reads_the_dedup_extractors() {
    let key = OrderKey::new(HeaderKey::new("x-order"));
    let msg = crate::Message::new("{}").with_header("x-order", "o-1");
    assert_eq!(key.key_of(&msg).as_deref(), Some("o-1"));
    assert_eq!(key.key_of(&crate::Message::new("{}")), None);
    let bad = crate::Message::new("{}").with_header("x-order", true);
    assert_eq!(key.key_of(&bad), None);
}

/// Fails its first `fail` attempts, transiently; records the attempts it saw.
fn flaky(fail: u32, attempts: u32, seen: Arc<Mutex<Vec<u32>>>) -> Consumer {
    Consumer::builder("in-place")
        .store(MemoryStore::new())
        .backoff(
            Backoff::exponential(Duration::from_millis(5))
                .jitter(Jitter::None)
                .max_attempts(attempts),
        )
        .handler(move |Attempt(n): Attempt| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(n);
                if n <= fail {
                    Err(HandlerError::transient(std::io::Error::other("not yet")))
                } else {
                    Ok(())
                }
            }
        })
        .unwrap()
}

#[tokio::test]
async fn in_place_retries_until_success_counting_attempts() {
    let seen = Arc::default();
    let c = flaky(3, 10, Arc::clone(&seen));
    let msg = crate::Message::new("x").with_message_id("m-1");
    let d = process_in_place(&c, msg, std::future::pending()).await;
    assert_eq!(d, Disposition::Ack { duplicate: false });
    assert_eq!(*seen.lock().unwrap(), vec![1, 2, 3, 4]);
    assert_eq!(c.stats().retries, 3);
}

#[tokio::test]
async fn in_place_dead_letters_after_the_budget() {
    let seen = Arc::default();
    let c = flaky(u32::MAX, 3, Arc::clone(&seen));
    let msg = crate::Message::new("x").with_message_id("m-2");
    let d = process_in_place(&c, msg, std::future::pending()).await;
    match d {
        Disposition::DeadLetter { failure, .. } => assert_eq!(failure.attempts, 3),
        other => panic!("expected a dead-letter, got {other:?}"),
    }
    assert_eq!(*seen.lock().unwrap(), vec![1, 2, 3]);
}

#[tokio::test]
async fn in_place_wait_stops_with_a_hand_back() {
    let seen = Arc::default();
    let c = Consumer::builder("in-place-stop")
        .store(MemoryStore::new())
        .backoff(Backoff::exponential(Duration::from_secs(60)).jitter(Jitter::None))
        .handler({
            let seen: Arc<Mutex<Vec<u32>>> = Arc::clone(&seen);
            move |Attempt(n): Attempt| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(n);
                    Err::<(), _>(HandlerError::transient(std::io::Error::other("down")))
                }
            }
        })
        .unwrap();
    let msg = crate::Message::new("x").with_message_id("m-3");
    let stop = tokio::time::sleep(Duration::from_millis(20));
    let d = process_in_place(&c, msg, stop).await;
    assert!(matches!(d, Disposition::Release { .. }), "{d:?}");
    assert_eq!(*seen.lock().unwrap(), vec![1]);
}
