//! The Redis store's batching, watched from Redis itself (`MONITOR`, filtered by this
//! test's own key prefix): a lone operation is one script call of its own; concurrent
//! operations share script calls, never more per call than the bound, and each caller
//! gets its own answer. Needs the default Redis (REDIS_URL, default
//! redis://127.0.0.1:6379).
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use idem_core::dedup::{
    Claim, ClaimRequest, Completion, DedupStore, HeldClaim, OwnerToken, ScopedKey, Terms,
};
use idem_redis::RedisStore;
use idem_testkit::{unique, Service};

/// The script calls (`EVALSHA`/`EVAL`) on keys under `prefix`, as the number of
/// operations each carried (two keys per operation).
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<usize>>>);

impl Calls {
    async fn watch(url: &str, prefix: &str) -> Calls {
        let client = redis::Client::open(url).unwrap();
        let monitor = client.get_async_monitor().await.unwrap();
        let calls = Calls::default();
        let (out, prefix) = (calls.clone(), prefix.to_owned());
        tokio::spawn(async move {
            let mut lines = monitor.into_on_message::<String>();
            while let Some(line) = lines.next().await {
                // `<time> [<db> <client>] "evalsha" "<sha>" "<numkeys>" "<key>" ...`
                let quoted: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
                let is_script = quoted.first().is_some_and(|c| {
                    c.eq_ignore_ascii_case("evalsha") || c.eq_ignore_ascii_case("eval")
                });
                if is_script && line.contains(&prefix) {
                    let keys: usize = quoted[2].parse().unwrap();
                    out.0.lock().unwrap().push(keys / 2);
                }
            }
        });
        calls
    }

    /// Waits until the calls seen carry `ops` operations in all.
    async fn until(&self, ops: usize) -> Vec<usize> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = self.0.lock().unwrap().clone();
            if seen.iter().sum::<usize>() >= ops || Instant::now() > deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_operations_go_alone_and_concurrent_ones_share_bounded_calls() {
    let url = Service::Redis.url();
    let prefix = unique("batching");
    let s = Service::Redis.expect_connected(
        &url,
        RedisStore::builder(&url)
            .prefix(&prefix)
            .max_batch(16)
            .connect()
            .await,
    );
    assert_eq!(s.max_batch(), 16);
    let long = Terms::new(Duration::from_secs(60), Duration::from_secs(60));
    // Load the script first, so that no EVALSHA-then-EVAL pair is counted.
    let warm = ClaimRequest::new(ScopedKey::new("c", "warm-up"), OwnerToken::generate(), None);
    s.claim(&warm, long).await.unwrap();
    let calls = Calls::watch(&url, &prefix).await;

    // One at a time: one call per operation, each alone.
    for i in 0..3 {
        let k = ScopedKey::new("c", format!("lone-{i}"));
        let req = ClaimRequest::new(k, OwnerToken::generate(), None);
        assert_eq!(s.claim(&req, long).await.unwrap(), Claim::Acquired);
    }
    assert_eq!(calls.until(3).await, vec![1, 1, 1], "lone operations");

    // 200 at once: claims and completions of other keys mixed.
    let owners: Vec<OwnerToken> = (0..100).map(|_| OwnerToken::generate()).collect();
    for (i, o) in owners.iter().enumerate() {
        let k = ScopedKey::new("c", format!("held-{i}"));
        s.claim(&ClaimRequest::new(k, o.clone(), None), long)
            .await
            .unwrap();
    }
    calls.until(103).await;
    calls.0.lock().unwrap().clear();
    let mut tasks = Vec::new();
    for (i, o) in owners.into_iter().enumerate() {
        let s1 = s.clone();
        tasks.push(tokio::spawn(async move {
            let s = s1;
            let k = ScopedKey::new("c", format!("held-{i}"));
            // Even keys completed by their owner, odd ones by a stranger.
            let owner = if i % 2 == 0 {
                o
            } else {
                OwnerToken::generate()
            };
            let done = s
                .complete(&HeldClaim::new(k, owner), Completion::Succeeded, long)
                .await
                .unwrap();
            (done == (i % 2 == 0))
                .then_some(())
                .ok_or(format!("complete {i}: {done}"))
        }));
        let s2 = s.clone();
        tasks.push(tokio::spawn(async move {
            let s = s2;
            let k = ScopedKey::new("c", format!("fresh-{i}"));
            let req = ClaimRequest::new(k, OwnerToken::generate(), None);
            let c = s.claim(&req, long).await.unwrap();
            (c == Claim::Acquired)
                .then_some(())
                .ok_or(format!("claim {i}: {c:?}"))
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let seen = calls.until(200).await;
    assert_eq!(
        seen.iter().sum::<usize>(),
        200,
        "every operation sent once: {seen:?}"
    );
    assert!(seen.iter().all(|&n| n <= 16), "bound of 16 kept: {seen:?}");
    assert!(
        seen.len() < 200,
        "concurrent operations shared calls: {seen:?}"
    );

    let pattern = format!("{prefix}:*");
    idem_testkit::delete_redis_keys(&mut s.connection(), &pattern).await;
}
