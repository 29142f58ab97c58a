//! RedisStore against a real Redis (REDIS_URL, default redis://127.0.0.1:6379).
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem_core::dedup::{
    Claim, ClaimRequest, Completion, DedupStore, HeldClaim, OwnerToken, ScopedKey, Terms,
};
use idem_core::{Consumer, Disposition, Message};
use idem_redis::RedisStore;
use idem_testkit::recovery::assert_recovers;
use idem_testkit::{conformance, unique, Service};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

fn url() -> String {
    Service::Redis.url()
}

mod common;
use common::{cleanup, store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_and_race() {
    let prefix = unique("conf");
    let s = store(&prefix).await;
    conformance::run(&s, &prefix).await;
    conformance::race(Arc::new(s.clone()), &prefix, 16).await;
    conformance::concurrent(Arc::new(s.clone()), &prefix, 64).await;
    cleanup(&s).await;
}

#[tokio::test]
async fn record_layout_prefix_ttl_and_one_slot() {
    let prefix = unique("layout");
    let s = store(&prefix).await;
    let k = ScopedKey::new("billing", "order:{7}");
    let o = ClaimRequest::new(k.clone(), OwnerToken::generate(), Some("fp".into()));
    let terms = Terms::new(Duration::from_secs(30), Duration::from_secs(3600));
    assert_eq!(s.claim(&o, terms).await.unwrap(), Claim::Acquired);
    let rkey = s.redis_key(&k);
    assert_eq!(rkey, format!("{prefix}:{{7:billing:order:{{7}}}}"));
    let mut conn = s.connection();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&rkey)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 30_000, "lease is a TTL: {ttl}");
    assert!(s
        .complete(&o.held, Completion::Succeeded, terms)
        .await
        .unwrap());
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&rkey)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 30_000, "done record kept for the retention: {ttl}");
    // A completion retried after a lost reply finds its own completion: still true.
    assert!(s
        .complete(&o.held, Completion::Succeeded, terms)
        .await
        .unwrap());
    cleanup(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_same_message_run_handler_once() {
    let prefix = unique("workers");
    let s = store(&prefix).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let worker = |runs: Arc<AtomicUsize>| {
        Consumer::builder("billing")
            .store(s.clone())
            .handler(move || {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            })
            .unwrap()
    };
    let (a, b) = (worker(runs.clone()), worker(runs.clone()));
    let msg = || Message::new("{}").with_message_id(format!("{prefix}-m1"));
    let (ra, rb) = tokio::join!(a.process(msg()), b.process(msg()));
    let mut outcomes = [ra, rb];
    outcomes.sort_by_key(|d| d.name());
    assert_eq!(runs.load(Ordering::SeqCst), 1, "handler ran once");
    assert_eq!(outcomes[0], Disposition::Ack { duplicate: false });
    assert!(
        matches!(
            &outcomes[1],
            Disposition::Retry {
                delay_kind: idem_core::DelayKind::AtLeast,
                ..
            }
        ),
        "the loser is retried later (busy), not dropped: {:?}",
        outcomes[1]
    );
    // The retry arrives after the first finished: a duplicate.
    assert_eq!(b.process(msg()).await, Disposition::Ack { duplicate: true });
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    cleanup(&s).await;
}

#[tokio::test]
async fn killed_connection_reconnects_without_error() {
    let prefix = unique("kill");
    let s = store(&prefix).await;
    let o = ClaimRequest::new(ScopedKey::new("c", "k1"), OwnerToken::generate(), None);
    let terms = Terms::new(Duration::from_secs(30), Duration::from_secs(60));
    assert_eq!(s.claim(&o, terms).await.unwrap(), Claim::Acquired);
    // Kill exactly this store's connection from a second connection (a blanket
    // `CLIENT KILL TYPE normal` would also hit tests running in parallel).
    let mut conn = s.connection();
    let id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await
        .unwrap();
    let admin = redis::Client::open(url()).unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    // The first command after the kill hits the dead socket; the store retries once
    // on the reconnected manager. The claim retry finds its own token: Acquired.
    assert_eq!(s.claim(&o, terms).await.unwrap(), Claim::Acquired);
    let id2: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_ne!(id, id2, "a new connection");
    assert!(s
        .complete(&o.held, Completion::Succeeded, terms)
        .await
        .unwrap());
    cleanup(&s).await;
}

/// A TCP forwarder that can be stopped and started again on the same port, to make
/// Redis "go down" for one store only.
struct Proxy {
    port: u16,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(port: u16) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = url()
            .trim_start_matches("redis://")
            .split(['/', '?'])
            .next()
            .unwrap()
            .rsplit('@')
            .next()
            .unwrap()
            .to_owned();
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let t2 = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                t2.lock().unwrap().push(conn);
            }
        });
        tasks.lock().unwrap().push(accept);
        Proxy { port, tasks }
    }

    fn stop(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_transient_never_duplicate_and_recovers() {
    let prefix = unique("down");
    let direct = store(&prefix).await; // fails with instructions if Redis is not up
    let proxy = Proxy::start(0).await;
    let s = RedisStore::builder(&format!("redis://127.0.0.1:{}", proxy.port))
        .prefix(prefix.as_str())
        .connect()
        .await
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let consumer = Consumer::builder("billing")
        .store(s.clone())
        .handler(move || {
            let runs = r2.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
            }
        })
        .unwrap();
    let msg = |id: &str| Message::new("{}").with_message_id(format!("{prefix}-{id}"));
    assert_eq!(
        consumer.process(msg("a")).await,
        Disposition::Ack { duplicate: false }
    );

    proxy.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let k = ScopedKey::new("billing", format!("{prefix}-a"));
    let req = ClaimRequest::new(k, OwnerToken::generate(), None);
    let started = Instant::now();
    let err = s
        .claim(
            &req,
            Terms::new(Duration::from_secs(5), Duration::from_secs(60)),
        )
        .await
        .expect_err("store down must be an error, not Done");
    eprintln!(
        "claim with Redis down failed after {:?}: {err}",
        started.elapsed()
    );
    for id in ["a", "b"] {
        match consumer.process(msg(id)).await {
            Disposition::Retry { failure, .. } => {
                assert_eq!(failure.kind, idem_core::ErrorKind::Transient);
                assert!(
                    failure.error.contains("dedup store unavailable"),
                    "{}",
                    failure.error
                );
            }
            other => panic!("store down must give a transient retry, got {other:?}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "never ran without a claim");

    let back = Proxy::start(proxy.port).await;
    let (fresh, done) = (msg("b"), msg("a"));
    assert_recovers(&consumer, 50, &fresh, &done, "resumes when Redis is back").await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    back.stop();
    cleanup(&direct).await;
}

async fn never_runs() -> Result<(), std::io::Error> {
    unreachable!("must not run without a claim")
}

#[tokio::test]
async fn closed_port_fails_fast_and_redacts_password() {
    let url = "redis://app:hunter2@127.0.0.1:1";
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), RedisStore::builder(url).connect())
        .await
        .expect("connect to a closed port must not hang")
        .expect_err("nothing listens on port 1");
    eprintln!(
        "eager connect to a closed port failed after {:?}",
        started.elapsed()
    );
    let text = format!(
        "{err} {err:?} {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(!text.contains("hunter2"), "password leaked: {text}");
    assert!(text.contains("app:***@127.0.0.1:1"), "{text}");

    let lazy = RedisStore::builder(url).connect_lazy().unwrap();
    assert!(!format!("{lazy:?}").contains("hunter2"));
    let consumer = Consumer::builder("billing")
        .store(lazy.clone())
        .handler(never_runs)
        .unwrap();
    let started = Instant::now();
    let d = tokio::time::timeout(
        Duration::from_secs(10),
        consumer.process(Message::new("{}").with_message_id("m")),
    )
    .await
    .expect("a dead Redis must not hang the consumer");
    eprintln!(
        "process with a dead Redis settled after {:?}",
        started.elapsed()
    );
    match d {
        Disposition::Retry { failure, .. } => {
            assert!(!failure.error.contains("hunter2"), "{}", failure.error)
        }
        other => panic!("expected a transient retry, got {other:?}"),
    }
}

/// Starts are counted across claims that never settle (a crashed worker's), a retried
/// claim under the same token is not counted twice, and complete/release clear the count.
#[tokio::test]
async fn claims_count_unsettled_starts() {
    let prefix = unique("starts");
    let s = store(&prefix).await;
    let key = ScopedKey::new("c", "k");
    let lease = Duration::from_millis(300);
    let terms = Terms::new(lease, Duration::from_secs(60));
    let claim = |owner: OwnerToken| {
        let (s, key) = (s.clone(), key.clone());
        async move {
            let req = ClaimRequest::new(key, owner, Some("fp".into()));
            s.claim_counting(&req, terms).await.unwrap()
        }
    };
    for n in 0..3 {
        let owner = OwnerToken::generate();
        assert_eq!(claim(owner.clone()).await, (Claim::Acquired, Some(n)));
        // The same owner's retried claim (lost reply) reports the same count.
        assert_eq!(claim(owner).await, (Claim::Acquired, Some(n)));
        // Another owner while the lease lives: busy, not counted.
        assert!(matches!(
            claim(OwnerToken::generate()).await,
            (Claim::Busy { .. }, _)
        ));
        tokio::time::sleep(lease + Duration::from_millis(100)).await; // "crash"
    }
    let owner = OwnerToken::generate();
    assert_eq!(claim(owner.clone()).await, (Claim::Acquired, Some(3)));
    assert!(s
        .release(&HeldClaim::new(key.clone(), owner))
        .await
        .unwrap());
    let owner = OwnerToken::generate();
    assert_eq!(
        claim(owner.clone()).await,
        (Claim::Acquired, Some(0)),
        "release clears"
    );
    assert!(s
        .complete(
            &HeldClaim::new(key.clone(), owner),
            Completion::Succeeded,
            terms
        )
        .await
        .unwrap());
    let mut conn = s.connection();
    let left: i64 = redis::cmd("EXISTS")
        .arg(format!("{}:n", s.redis_key(&key)))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0, "complete clears the start counter");
    cleanup(&s).await;
}
