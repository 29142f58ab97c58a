//! The behavioural suite shared by the PostgreSQL, SQLite and MariaDB test files.
//!
//! `sql_suite!(DB, pool_fn, placeholder_fn)` expands to the tests; `pool_fn(tag)` is an
//! async fn returning `(Pool<DB>, guard)` (the guard cleans up, e.g. a temp dir) and
//! `placeholder_fn(n)` the n-th bind placeholder of the dialect, `text_fn(col)` a
//! column as decodable text. [`pg`] is the set-up of the PostgreSQL inbox tests.

#![allow(dead_code, unused_macros)] // each test binary uses its own part of it

#[cfg(feature = "postgres")]
pub(crate) mod pg;

pub(crate) use idem_testkit::unique;

use idem_core::{Disposition, ErrorKind};

/// Checks that `d` is the disposition `name` (`retry` or `dead_letter`, as
/// [`Disposition::name`] says) of a failure of `kind` whose error says `needle`.
pub(crate) fn assert_failure(d: &Disposition, name: &str, kind: ErrorKind, needle: &str) {
    let failure = match d {
        Disposition::Retry { failure, .. } | Disposition::DeadLetter { failure, .. } => failure,
        other => panic!("expected a {name}, got {other:?}"),
    };
    assert_eq!(d.name(), name, "{d:?}");
    assert_eq!(failure.kind, kind, "{d:?}");
    assert!(failure.error.contains(needle), "{}", failure.error);
}

/// Expands to the shared suite for one database (see the module docs).
macro_rules! sql_suite {
    ($db:ty, $pool:path, $ph:path, $text:path) => {
        use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
        use std::sync::Arc;
        use std::time::Duration;

        use idem_core::dedup::{
            Claim, ClaimRequest, Completion, DedupStore, HeldClaim, OwnerToken, ScopedKey,
            StoreErrorKind, REPLAY_HEADER,
        };
        use idem_testkit::conformance;
        use idem_core::{
            Consumer, Disposition, ErrorKind, HandlerError, IdempotencyKey, Message, State,
        };
        use idem_sql::{SqlInbox, SqlStore, Tx};
        use sqlx::Pool;

        use common::unique;

        async fn drop_table(pool: &Pool<$db>, table: &str) {
            sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
                .execute(pool)
                .await
                .unwrap();
        }

        async fn count(pool: &Pool<$db>, table: &str) -> i64 {
            sqlx::query_scalar::<_, i64>(&format!("SELECT COUNT(*) FROM {table}"))
                .fetch_one(pool)
                .await
                .unwrap()
        }

        async fn state_of(pool: &Pool<$db>, table: &str, key: &str) -> Option<String> {
            sqlx::query_scalar::<_, String>(&format!(
                "SELECT {} FROM {table} WHERE idem_key = {}",
                $text("state"),
                $ph(1)
            ))
            .bind(key)
            .fetch_optional(pool)
            .await
            .unwrap()
        }

        async fn new_store(tag: &str) -> (SqlStore<$db>, impl Sized) {
            let (pool, guard) = $pool(tag).await;
            let store = SqlStore::<$db>::new(pool).try_table(&unique(tag)).unwrap();
            store.ensure_schema().await.unwrap();
            (store, guard)
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn store_conformance_and_race() {
            let (store, _g) = new_store("conf").await;
            let scope = unique("scope");
            conformance::run(&store, &scope).await;
            conformance::race(Arc::new(store.clone()), &scope, 16).await;
            conformance::concurrent(Arc::new(store.clone()), &scope, 64).await;
            drop_table(store.pool(), &store.table_name().to_string()).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn ensure_schema_is_idempotent_concurrent_and_validated() {
            let (pool, _g) = $pool("schema").await;
            let table = unique("schema");
            let stores: Vec<_> = (0..4)
                .map(|_| SqlStore::<$db>::new(pool.clone()).try_table(&table).unwrap())
                .collect();
            let results =
                futures_util::future::join_all(stores.iter().map(|s| s.ensure_schema())).await;
            for r in results {
                r.expect("concurrent ensure_schema");
            }
            stores[0].ensure_schema().await.expect("again");
            let inbox = SqlInbox::<$db>::new(pool.clone())
                .try_table(&unique("inbox"))
                .unwrap();
            inbox.ensure_schema().await.unwrap();
            inbox.ensure_schema().await.unwrap();
            for bad in ["x; DROP TABLE users", "a-b", "1t", "a.b.c", ""] {
                let err = SqlStore::<$db>::new(pool.clone()).try_table(bad).unwrap_err();
                assert!(err.to_string().contains("invalid table name"), "{err}");
                assert!(SqlInbox::<$db>::new(pool.clone()).try_table(bad).is_err());
            }
            let _: sqlx::Result<Vec<(String,)>> =
                sqlx::query_as("SELECT 'x'").fetch_all(&pool).await;
            drop_table(&pool, &table).await;
            drop_table(&pool, &inbox.table_name().to_string()).await;
            drop_table(&pool, &inbox.starts_table_name().to_string()).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn cleanup_removes_only_expired_rows() {
            let (store, _g) = new_store("cleanup").await;
            let t = store.table_name().to_string();
            let k = |n: &str, o: &OwnerToken| ClaimRequest::new(ScopedKey::new("c", n), o.clone(), None);
            let short = Duration::from_millis(50);
            let long = Duration::from_secs(3600);
            let live_lease = OwnerToken::generate();
            for (name, lease, retention) in [
                ("lease-expired", short, None),
                ("lease-live", long, None),
                ("done-expired", long, Some(short)),
                ("done-live", long, Some(long)),
            ] {
                let o = if name == "lease-live" {
                    live_lease.clone()
                } else {
                    OwnerToken::generate()
                };
                assert_eq!(
                    store.claim(&k(name, &o), idem_core::dedup::Terms::new(lease, long)).await.unwrap(),
                    Claim::Acquired
                );
                if let Some(r) = retention {
                    assert!(store
                        .complete(&k(name, &o).held, Completion::Succeeded, idem_core::dedup::Terms::new(long, r))
                        .await
                        .unwrap());
                }
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert_eq!(store.cleanup_expired().await.unwrap(), 2);
            assert_eq!(count(store.pool(), &t).await, 2);
            assert!(state_of(store.pool(), &t, "lease-live").await.is_some());
            assert_eq!(
                state_of(store.pool(), &t, "done-live").await.as_deref(),
                Some("succeeded")
            );
            assert!(
                store
                    .extend(&k("lease-live", &live_lease).held, idem_core::dedup::Terms::new(long, long))
                    .await
                    .unwrap(),
                "live lease untouched"
            );

            // The background task does the same on its own.
            let o = OwnerToken::generate();
            store.claim(&k("bg", &o), idem_core::dedup::Terms::new(long, long)).await.unwrap();
            store
                .complete(&k("bg", &o).held, Completion::Succeeded, idem_core::dedup::Terms::new(long, short))
                .await
                .unwrap();
            assert_eq!(count(store.pool(), &t).await, 3);
            let handle = store.spawn_cleanup(Duration::from_millis(50));
            let mut left = 3;
            for _ in 0..100 {
                left = count(store.pool(), &t).await;
                if left == 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(left, 2, "background cleanup deleted the expired row");
            assert!(!handle.is_finished());
            handle.stop();
            drop_table(store.pool(), &t).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn store_two_workers_same_message_run_handler_once() {
            let (store, _g) = new_store("workers").await;
            let runs = Arc::new(AtomicUsize::new(0));
            let worker = || {
                Consumer::builder("billing")
                    .store(store.clone())
                    .handler_with_state(
                        |State(runs): State<Arc<AtomicUsize>>| async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        },
                        runs.clone(),
                    )
                    .unwrap()
            };
            let (a, b) = (worker(), worker());
            let msg = || Message::new("{}").with_message_id("m-1");
            let (ra, rb) = tokio::join!(a.process(msg()), b.process(msg()));
            assert_eq!(runs.load(Ordering::SeqCst), 1, "handler ran once");
            let handled = [&ra, &rb]
                .iter()
                .filter(|d| ***d == Disposition::Ack { duplicate: false })
                .count();
            assert_eq!(handled, 1, "{ra:?} {rb:?}");
            assert_eq!(b.process(msg()).await, Disposition::Ack { duplicate: true });
            drop_table(store.pool(), &store.table_name().to_string()).await;
        }

        // ----- transactional inbox -----

        #[derive(Clone)]
        struct Ctx {
            insert: Arc<str>,
            runs: Arc<AtomicUsize>,
            /// 0 ok, 1 transient error, 2 permanent error (after the write).
            mode: Arc<AtomicU8>,
            delay: Duration,
        }

        async fn effect(
            State(ctx): State<Ctx>,
            key: IdempotencyKey,
            tx: Tx<$db>,
        ) -> Result<(), HandlerError> {
            ctx.runs.fetch_add(1, Ordering::SeqCst);
            {
                let mut conn = tx.conn().await?;
                sqlx::query(&ctx.insert)
                    .bind(key.0.clone())
                    .execute(&mut *conn)
                    .await?;
            }
            tokio::time::sleep(ctx.delay).await;
            match ctx.mode.load(Ordering::SeqCst) {
                0 => Ok(()),
                1 => Err(HandlerError::transient(std::io::Error::other(
                    "flaky downstream",
                ))),
                _ => Err(HandlerError::permanent(std::io::Error::other(
                    "invalid payload",
                ))),
            }
        }

        struct InboxFixture {
            pool: Pool<$db>,
            inbox: SqlInbox<$db>,
            fx: String,
            ctx: Ctx,
        }

        impl InboxFixture {
            async fn new(pool: Pool<$db>, delay: Duration) -> Self {
                let fx = unique("fx");
                sqlx::query(&format!("CREATE TABLE {fx} (k VARCHAR(200) NOT NULL)"))
                    .execute(&pool)
                    .await
                    .unwrap();
                let inbox = SqlInbox::<$db>::new(pool.clone())
                    .try_table(&unique("inbox"))
                    .unwrap();
                inbox.ensure_schema().await.unwrap();
                let ctx = Ctx {
                    insert: format!("INSERT INTO {fx} (k) VALUES ({})", $ph(1)).into(),
                    runs: Arc::new(AtomicUsize::new(0)),
                    mode: Arc::new(AtomicU8::new(0)),
                    delay,
                };
                InboxFixture {
                    pool,
                    inbox,
                    fx,
                    ctx,
                }
            }

            /// A fixture on a pool of `$pool(tag)` whose handler does not wait, and the
            /// pool's guard.
            async fn open(tag: &str) -> (Self, impl Sized) {
                let (pool, guard) = $pool(tag).await;
                (InboxFixture::new(pool, Duration::ZERO).await, guard)
            }

            /// What the handler does after its write from now on: 0 ok, 1 transient
            /// error, 2 permanent error.
            fn set_mode(&self, mode: u8) {
                self.ctx.mode.store(mode, Ordering::SeqCst);
            }

            fn worker(&self) -> Consumer {
                Consumer::builder("billing")
                    .dedup(self.inbox.clone())
                    .handler_with_state(effect, self.ctx.clone())
                    .unwrap()
            }

            async fn effects(&self) -> i64 {
                count(&self.pool, &self.fx).await
            }

            async fn state(&self, key: &str) -> Option<String> {
                state_of(&self.pool, &self.inbox.table_name().to_string(), key).await
            }

            fn runs(&self) -> usize {
                self.ctx.runs.load(Ordering::SeqCst)
            }

            async fn drop_tables(self) {
                drop_table(&self.pool, &self.fx).await;
                drop_table(&self.pool, &self.inbox.table_name().to_string()).await;
                drop_table(&self.pool, &self.inbox.starts_table_name().to_string()).await;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn inbox_two_workers_at_once_exactly_one_effect() {
            let (pool, _g) = $pool("inbox-race").await;
            let f = InboxFixture::new(pool, Duration::from_millis(300)).await;
            let (a, b) = (f.worker(), f.worker());
            let msg = || Message::new("{}").with_message_id("pay-1");
            let (ra, rb) = tokio::join!(a.process(msg()), b.process(msg()));
            let mut outcomes = vec![ra, rb];
            outcomes.sort_by_key(|d| d.name());
            assert_eq!(
                outcomes,
                vec![
                    Disposition::Ack { duplicate: false },
                    Disposition::Ack { duplicate: true }
                ],
                "one handled, the concurrent duplicate waited and was acked as a duplicate"
            );
            assert_eq!(f.effects().await, 1, "exactly one effect row");
            assert_eq!(f.runs(), 1);
            assert_eq!(f.state("pay-1").await.as_deref(), Some("succeeded"));
            f.drop_tables().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn inbox_redelivery_after_commit_before_ack_is_duplicate() {
            let (f, _g) = InboxFixture::open("inbox-crash").await;
            let msg = Message::new("{}").with_message_id("pay-2");
            // Worker 1 commits, then "crashes" before acking: the broker redelivers.
            assert_eq!(
                f.worker().process(msg.clone()).await,
                Disposition::Ack { duplicate: false }
            );
            let mut again = msg;
            again.delivery.redelivered = true;
            assert_eq!(
                f.worker().process(again).await,
                Disposition::Ack { duplicate: true }
            );
            assert_eq!(f.effects().await, 1);
            assert_eq!(f.runs(), 1);
            // Same key, different payload: poison, not a silent duplicate.
            let other = Message::new("{\"x\":1}").with_message_id("pay-2");
            match f.worker().process(other).await {
                Disposition::DeadLetter { failure: fail, .. } => assert_eq!(fail.kind, ErrorKind::Permanent),
                d => panic!("expected dead-letter, got {d:?}"),
            }
            f.drop_tables().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn inbox_transient_error_rolls_back_everything() {
            let (f, _g) = InboxFixture::open("inbox-transient").await;
            f.set_mode(1);
            let msg = Message::new("{}").with_message_id("pay-3");
            let retry = match f.worker().process(msg.clone()).await {
                Disposition::Retry { headers, .. } => headers,
                d => panic!("expected retry, got {d:?}"),
            };
            assert_eq!(f.effects().await, 0, "handler's write rolled back");
            assert_eq!(f.state("pay-3").await, None, "nothing recorded");
            f.set_mode(0);
            let mut next = msg;
            for (k, v) in retry {
                next.headers.insert(k, v);
            }
            assert_eq!(
                f.worker().process(next).await,
                Disposition::Ack { duplicate: false }
            );
            assert_eq!(f.effects().await, 1);
            f.drop_tables().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn inbox_poison_is_recorded_and_replay_reopens_it() {
            let (f, _g) = InboxFixture::open("inbox-poison").await;
            f.set_mode(2);
            let msg = Message::new("{}").with_message_id("pay-4");
            assert!(matches!(
                f.worker().process(msg.clone()).await,
                Disposition::DeadLetter { .. }
            ));
            assert_eq!(f.effects().await, 0, "poison's writes rolled back");
            assert_eq!(f.state("pay-4").await.as_deref(), Some("poisoned"));
            assert!(
                matches!(
                    f.worker().process(msg.clone()).await,
                    Disposition::DeadLetter { .. }
                ),
                "redelivered poison is dead-lettered again, never dropped"
            );
            assert_eq!(f.runs(), 1, "redelivered poison does not run");
            f.set_mode(0);
            let replay = msg.clone().with_header(REPLAY_HEADER, "operator");
            assert_eq!(
                f.worker().process(replay.clone()).await,
                Disposition::Ack { duplicate: false }
            );
            assert_eq!(f.effects().await, 1);
            assert_eq!(f.state("pay-4").await.as_deref(), Some("succeeded"));
            assert_eq!(
                f.worker().process(replay).await,
                Disposition::Ack { duplicate: true },
                "succeeded never reopens"
            );
            f.drop_tables().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn inbox_retention_cleanup() {
            let (mut f, _g) = InboxFixture::open("inbox-retention").await;
            f.inbox = f.inbox.clone().retention(Duration::from_millis(100));
            let w = Consumer::builder("billing")
                .dedup(f.inbox.clone())
                .backoff(idem_core::Backoff::default().max_attempts(1))
                .handler_with_state(effect, f.ctx.clone())
                .unwrap();
            assert_eq!(
                w.process(Message::new("{}").with_message_id("pay-5")).await,
                Disposition::Ack { duplicate: false }
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(f.inbox.cleanup_expired().await.unwrap(), 1);
            assert_eq!(f.state("pay-5").await, None);
            f.drop_tables().await;
        }

        /// Plants `n` unsettled starts of `key`, as `n` crashed workers would leave.
        async fn plant_starts(f: &InboxFixture, key: &str, n: i64) {
            sqlx::query(&format!(
                "INSERT INTO {} (consumer, idem_key, starts, expires_at) VALUES ({}, {}, {}, 9000000000000000)",
                f.inbox.starts_table_name(),
                $ph(1),
                $ph(2),
                $ph(3)
            ))
            .bind("billing")
            .bind(key)
            .bind(n)
            .execute(&f.pool)
            .await
            .unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn inbox_crash_limit_dead_letters_without_running() {
            let (f, _g) = InboxFixture::open("inbox-crash").await;
            let starts = f.inbox.starts_table_name().to_string();
            plant_starts(&f, "pay-c", 3).await;
            plant_starts(&f, "pay-d", 2).await;
            let w = Consumer::builder("billing")
                .dedup(f.inbox.clone())
                .crash_limit(3)
                .handler_with_state(effect, f.ctx.clone())
                .unwrap();
            common::assert_failure(
                &w.process(Message::new("{}").with_message_id("pay-c")).await,
                "dead_letter",
                ErrorKind::Permanent,
                "crashed or hung the worker 3 times",
            );
            assert_eq!(f.runs(), 0, "not run again");
            assert_eq!(f.state("pay-c").await.as_deref(), Some("poisoned"));
            // Below the limit it runs; the success clears the counter with the effect.
            assert_eq!(
                w.process(Message::new("{}").with_message_id("pay-d")).await,
                Disposition::Ack { duplicate: false }
            );
            assert_eq!((f.runs(), f.effects().await), (1, 1));
            assert_eq!(count(&f.pool, &starts).await, 0, "counters cleared");
            f.drop_tables().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn inbox_without_starts_table_fails_closed_until_ensure_schema() {
            let (f, _g) = InboxFixture::open("inbox-nostarts").await;
            // A deployment that upgraded without ensure_schema(): no counters table.
            // No run-time fallback: the store error retries the message (nothing
            // applied, nothing lost) and names the missing table.
            let starts = f.inbox.starts_table_name().to_string();
            drop_table(&f.pool, &starts).await;
            let w = f.worker();
            match w.process(Message::new("{}").with_message_id("pay-1")).await {
                Disposition::Retry { failure, .. } => {
                    assert!(failure.error.contains(&starts), "{}", failure.error)
                }
                other => panic!("expected a retry, got {other:?}"),
            }
            assert_eq!(f.effects().await, 0);
            f.inbox.ensure_schema().await.unwrap();
            for id in ["pay-1", "pay-2"] {
                assert_eq!(
                    w.process(Message::new("{}").with_message_id(id)).await,
                    Disposition::Ack { duplicate: false }
                );
            }
            assert_eq!(f.effects().await, 2);
            f.drop_tables().await;
        }

        /// A store error says its kind: a statement the database refused (here: no
        /// such table) is `Refused`, a pool that cannot connect is `Unavailable`.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn store_errors_say_their_kind() {
            let (store, _g) = new_store("kinds").await;
            let t = store.table_name().to_string();
            drop_table(store.pool(), &t).await;
            let req = ClaimRequest::new(ScopedKey::new("c", "k"), OwnerToken::generate(), None);
            let lease = idem_core::dedup::Terms::new(Duration::from_secs(5), Duration::from_secs(60));
            let err = store.claim(&req, lease).await.unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Refused, "{err}");
            store.pool().close().await;
            let err = store.claim(&req, lease).await.unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Unavailable, "{err}");
        }

        /// The lease store counts starts that never settled (crashed claims), not a
        /// retried claim of the same owner; settled outcomes reset the count; a table
        /// from an older version (no `starts` column) is refused until
        /// `ensure_schema` adds the column.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn store_counts_unsettled_starts_and_upgrades_old_tables() {
            let (store, _g) = new_store("starts").await;
            let key = ScopedKey::new("c", "k");
            let lease = Duration::from_millis(400);
            let memory = Duration::from_secs(60);
            let claim = |owner: OwnerToken| {
                let (s, key) = (store.clone(), key.clone());
                async move {
                    let req = ClaimRequest::new(key, owner, None);
                    s.claim_counting(&req, idem_core::dedup::Terms::new(lease, memory)).await.unwrap()
                }
            };
            for n in 0..3 {
                let owner = OwnerToken::generate();
                assert_eq!(claim(owner.clone()).await, (Claim::Acquired, Some(n)));
                assert_eq!(claim(owner).await, (Claim::Acquired, Some(n)), "same owner");
                tokio::time::sleep(lease + Duration::from_millis(100)).await; // "crash"
            }
            let owner = OwnerToken::generate();
            assert_eq!(claim(owner.clone()).await, (Claim::Acquired, Some(3)));
            assert!(store
                .complete(&HeldClaim::new(key.clone(), owner), Completion::Succeeded, idem_core::dedup::Terms::new(lease, Duration::from_millis(1)))
                .await
                .unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
            // The done record expired: a fresh start.
            let owner = OwnerToken::generate();
            assert_eq!(claim(owner.clone()).await, (Claim::Acquired, Some(0)));
            assert!(store.release(&HeldClaim::new(key.clone(), owner)).await.unwrap());
            assert_eq!(
                claim(OwnerToken::generate()).await,
                (Claim::Acquired, Some(0)),
                "release settles"
            );

            // An older table, without the column.
            let t = store.table_name().to_string();
            sqlx::query(&format!("ALTER TABLE {t} DROP COLUMN starts"))
                .execute(store.pool())
                .await
                .unwrap();
            let old = SqlStore::<$db>::new(store.pool().clone()).table(store.table_name().clone());
            let k2 = ClaimRequest::new(ScopedKey::new("c", "k2"), OwnerToken::generate(), None);
            // No run-time fallback: the claim fails, naming the store's error, and
            // ensure_schema is the one upgrade path.
            let refused = old.claim_counting(&k2, idem_core::dedup::Terms::new(lease, memory)).await;
            assert!(refused.is_err(), "a table without `starts`: {refused:?}");
            old.ensure_schema().await.unwrap();
            let (c, n) = old
                .claim_counting(
                    &ClaimRequest::new(ScopedKey::new("c", "k3"), OwnerToken::generate(), None),
                    idem_core::dedup::Terms::new(lease, memory),
                )
                .await
                .unwrap();
            assert_eq!((c, n), (Claim::Acquired, Some(0)), "counted after the upgrade");
            drop_table(store.pool(), &t).await;
        }
    };
}
