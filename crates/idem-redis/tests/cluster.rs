//! RedisStore against a real Redis Cluster (3 masters + 3 replicas). The cluster is
//! not one of the default services: the first test starts it with `bash .ci/cluster up`
//! (README, "Running on a cluster") and leaves it up. REDIS_CLUSTER_URL points to a
//! cluster of your own instead (comma-separated seed nodes; default the three masters
//! `.ci/cluster` starts).
//!
//! A test binary of its own, so that the single-node tests never wait for a cluster.
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use idem_core::dedup::{Claim, ClaimRequest, Completion, DedupStore, OwnerToken, ScopedKey, Terms};
use idem_core::redact::redact_url;
use idem_redis::RedisStore;
use idem_testkit::{conformance, unique};

/// The seed nodes; starts the test clusters first unless REDIS_CLUSTER_URL names others.
fn urls() -> String {
    if std::env::var_os("REDIS_CLUSTER_URL").is_none() {
        idem_testkit::cluster::ensure_up();
    }
    std::env::var("REDIS_CLUSTER_URL").unwrap_or_else(|_| {
        "redis://127.0.0.1:7001,redis://127.0.0.1:7002,redis://127.0.0.1:7003".into()
    })
}

async fn store(prefix: &str) -> RedisStore {
    match RedisStore::builder(&urls()).prefix(prefix).connect().await {
        Ok(s) => s,
        Err(e) => panic!(
            "Redis Cluster not reachable at {}: start it with `bash .ci/cluster up` (README, \"Running on a cluster\") or set REDIS_CLUSTER_URL: {e}",
            urls().split(',').map(redact_url).collect::<Vec<_>>().join(",")
        ),
    }
}

/// The masters' addresses (`host:port`), as the cluster reports them.
async fn masters(s: &RedisStore) -> Vec<String> {
    let mut conn = s.connection();
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut conn)
        .await
        .unwrap();
    nodes
        .lines()
        .filter(|l| l.split(' ').nth(2).is_some_and(|f| f.contains("master")))
        .filter(|l| !l.split(' ').nth(2).unwrap().contains("fail"))
        .map(|l| {
            let addr = l.split(' ').nth(1).unwrap();
            addr.split('@').next().unwrap().to_owned()
        })
        .collect()
}

/// Every key under the prefix, per master (KEYS is per node on a cluster).
async fn keys_by_master(s: &RedisStore) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for addr in masters(s).await {
        let client = redis::Client::open(format!("redis://{addr}")).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", s.prefix()))
            .query_async(&mut conn)
            .await
            .unwrap();
        out.push((addr, keys));
    }
    out
}

/// Deletes every key under the test's prefix, on every master.
async fn cleanup(s: &RedisStore) {
    let mut conn = s.connection();
    for (_, keys) in keys_by_master(s).await {
        for k in keys {
            let _: i64 = redis::cmd("DEL")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
    let left: usize = keys_by_master(s).await.iter().map(|(_, k)| k.len()).sum();
    assert_eq!(left, 0, "cleanup left keys behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_and_race_on_a_cluster() {
    let prefix = unique("cconf");
    let s = store(&prefix).await;
    assert!(s.is_cluster());
    conformance::run(&s, &prefix).await;
    conformance::race(Arc::new(s.clone()), &prefix, 16).await;
    conformance::concurrent(Arc::new(s.clone()), &prefix, 64).await;
    cleanup(&s).await;
}

/// Claims held 30 s, records kept a minute.
const TERMS: Terms = Terms::new(Duration::from_secs(30), Duration::from_secs(60));

#[tokio::test]
async fn records_spread_over_masters_one_slot_per_message() {
    let prefix = unique("cspread");
    let s = store(&prefix).await;
    let owner = OwnerToken::generate();
    let mut conn = s.connection();
    for i in 0..32 {
        let k = ScopedKey::new("billing", format!("order-{i}"));
        let req = ClaimRequest::new(k.clone(), owner.clone(), None);
        let (claim, starts) = s.claim_counting(&req, TERMS).await.unwrap();
        assert_eq!((claim, starts), (Claim::Acquired, Some(0)));
        // The record and its start counter hash to one slot (the scripts need both).
        let rkey = s.redis_key(&k);
        let slot = |key: String| {
            let mut conn = conn.clone();
            async move {
                let n: i64 = redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                n
            }
        };
        assert_eq!(slot(rkey.clone()).await, slot(format!("{rkey}:n")).await);
        if i % 2 == 0 {
            assert!(s
                .complete(&req.held, Completion::Succeeded, TERMS)
                .await
                .unwrap());
        }
    }
    let ttl: i64 = redis::cmd("PTTL")
        .arg(s.redis_key(&ScopedKey::new("billing", "order-0")))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 30_000 && ttl <= 60_000, "retention TTL, got {ttl}");
    let holding: BTreeSet<String> = keys_by_master(&s)
        .await
        .into_iter()
        .filter(|(_, keys)| !keys.is_empty())
        .map(|(addr, _)| addr)
        .collect();
    assert!(
        holding.len() >= 2,
        "32 messages should land on more than one master, got {holding:?}"
    );
    cleanup(&s).await;
}

#[tokio::test]
async fn one_seed_url_with_cluster_mode_finds_the_rest() {
    let prefix = unique("cseed");
    let seed = urls().split(',').next().unwrap().trim().to_owned();
    let s = RedisStore::builder(&seed)
        .prefix(&prefix)
        .cluster(true)
        .connect()
        .await
        .unwrap_or_else(|e| {
            panic!("Redis Cluster seed not reachable: run `bash .ci/cluster up`: {e}")
        });
    assert!(s.is_cluster());
    let owner = OwnerToken::generate();
    for i in 0..16 {
        let k = ScopedKey::new("seed", format!("k{i}"));
        let req = ClaimRequest::new(k, owner.clone(), None);
        assert_eq!(
            s.claim(&req, TERMS).await.unwrap(),
            Claim::Acquired,
            "a key on any master is reachable through one seed"
        );
    }
    cleanup(&s).await;
}

#[tokio::test]
async fn an_unreachable_cluster_fails_fast_and_names_the_nodes_without_passwords() {
    let started = std::time::Instant::now();
    let err = RedisStore::builder("redis://u:hunter2@127.0.0.1:1,redis://u:hunter2@127.0.0.1:2")
        .connect()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(!err.contains("hunter2"), "{err}");
    assert!(
        err.contains("127.0.0.1:1") && err.contains("127.0.0.1:2"),
        "{err}"
    );
}

/// A batch handler over the cluster store: the batch's keys hash to many slots, and
/// its claim call (one per slot, all in flight together) still answers every key as
/// the single-node store does (`idem_testkit::lease_batch`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_handler_claims_its_keys_across_slots() {
    let prefix = unique("cbatch");
    let s = store(&prefix).await;
    assert!(s.is_cluster());
    idem_testkit::lease_batch::check(Arc::new(s.clone()), &unique("batch")).await;
    cleanup(&s).await;
}
