//! The checks of concurrent calls: [`race`] and [`concurrent`].

use std::sync::Arc;

use super::*;

/// `n` owners claim one key at once: exactly one acquires.
pub async fn race(store: Arc<dyn DedupStore>, scope: &str, n: usize) {
    let k = key(scope, "race");
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (store, k) = (store.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            let req = ClaimRequest::new(k, OwnerToken::generate(), None);
            store.claim(&req, LONG).await
        }));
    }
    let mut acquired = 0;
    for t in tasks {
        match t.await {
            Ok(Ok(Claim::Acquired)) => acquired += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("claim failed during race: {e}"),
            Err(e) => panic!("claim task failed: {e}"),
        }
    }
    assert_eq!(
        acquired, 1,
        "exactly one of {n} concurrent claims must acquire"
    );
}

/// Runs `n` futures built by `op(i)` at once, each in a task of its own (so a store that
/// batches concurrent calls gets them together), and returns their answers in order.
async fn all_at_once<T, F, Fut>(store: &Arc<dyn DedupStore>, n: usize, op: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(Arc<dyn DedupStore>, usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(op(store.clone(), i))).collect();
    let mut out = Vec::with_capacity(n);
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(v) => out.push(v),
            Err(e) => panic!("concurrent operation {i} panicked: {e}"),
        }
    }
    out
}

/// Many operations of every kind at once, on many keys and on shared keys, each checked
/// against its own expected answer: a store that batches or pipelines concurrent calls
/// must still give every caller the answer to *its* operation.
///
/// In rounds, each round's operations all in flight together:
/// 1. `n` owners claim `n` keys (each with its own fingerprint), while pairs of owners
///    race for shared keys: every single key is acquired; of each pair, exactly one
///    wins and the other sees `Busy`.
/// 2. Per key, by its position: complete (succeeded), complete (poisoned), release or
///    extend by the owner, each beside a stranger's complete, release and extend on
///    the same key; both racers of each shared key complete. Owners succeed,
///    strangers and race losers are refused.
/// 3. Fresh owners claim every key (plain and counting claims mixed): they see `Done`
///    with that key's own completion and fingerprint, `Acquired` (released keys, no
///    earlier start) or `Busy` (extended keys); at the same time other owners try to
///    reopen the done keys, which succeeds only for the poisoned ones (so a claim of
///    a poisoned key may also see it held again: `Busy`).
pub async fn concurrent(store: Arc<dyn DedupStore>, scope: &str, n: usize) {
    let many = Arc::new(Many::new(scope, n));
    let winners = many.claims(&store).await;
    many.settle(&store, &winners).await;
    many.fresh_claims(&store).await;
}

/// The claims of [`concurrent`]: `n` keys with one owner each (`claims[i]`, with
/// fingerprint `fp-i`), and `pairs` shared keys with two racing owners each
/// (`racers[2p]` and `racers[2p + 1]`, no fingerprint). Shared with every task.
struct Many {
    n: usize,
    pairs: usize,
    claims: Vec<ClaimRequest>,
    racers: Vec<ClaimRequest>,
}

impl Many {
    fn new(scope: &str, n: usize) -> Self {
        let claims = (0..n)
            .map(|i| {
                let k = key(scope, &format!("many-{i}"));
                ClaimRequest::new(k, OwnerToken::generate(), Some(format!("fp-{i}")))
            })
            .collect();
        let pairs = (n / 8).max(1);
        let racers = (0..2 * pairs)
            .map(|r| {
                let k = key(scope, &format!("shared-{}", r / 2));
                ClaimRequest::new(k, OwnerToken::generate(), None)
            })
            .collect();
        Many {
            n,
            pairs,
            claims,
            racers,
        }
    }

    /// The `i`th key.
    fn key(&self, i: usize) -> &ScopedKey {
        &self.claims[i].held.key
    }

    /// Fresh owners of every key, one each.
    fn others(&self) -> Arc<Vec<HeldClaim>> {
        Arc::new((0..self.n).map(|i| holder(self.key(i))).collect())
    }

    /// Round 1: claims, own keys and shared keys at once. Returns each shared key's
    /// winning racer.
    async fn claims(self: &Arc<Self>, store: &Arc<dyn DedupStore>) -> Arc<Vec<usize>> {
        let (n, pairs) = (self.n, self.pairs);
        let many = self.clone();
        let claims = all_at_once(store, n + 2 * pairs, move |s, i| {
            let many = many.clone();
            async move {
                let req = many.claims.get(i).unwrap_or_else(|| &many.racers[i - n]);
                s.claim(req, LONG).await
            }
        })
        .await;
        let mut winners = vec![None; pairs];
        for (i, c) in claims.into_iter().enumerate() {
            let c = ok(c, "concurrent claim");
            if i < n {
                assert_eq!(
                    c,
                    Claim::Acquired,
                    "claim of {} by its only owner",
                    self.key(i)
                );
            } else {
                let r = i - n;
                match c {
                    Claim::Acquired => {
                        assert!(
                            winners[r / 2].replace(r).is_none(),
                            "both owners acquired {}",
                            self.racers[r].held.key
                        );
                    }
                    Claim::Busy { retry_in } => assert!(
                        retry_in > Duration::ZERO && retry_in <= LONG.lease,
                        "retry_in {retry_in:?}"
                    ),
                    other => panic!("racing claim of a fresh key got {other:?}"),
                }
            }
        }
        let winners: Arc<Vec<usize>> = Arc::new(
            winners
                .into_iter()
                .enumerate()
                .map(|(p, w)| {
                    w.unwrap_or_else(|| panic!("no owner acquired {}", self.racers[2 * p].held.key))
                })
                .collect(),
        );
        winners
    }

    /// Round 2: settle, beside strangers and race losers. Per key: 4 operations.
    async fn settle(self: &Arc<Self>, store: &Arc<dyn DedupStore>, winners: &[usize]) {
        let (n, pairs) = (self.n, self.pairs);
        let strangers = self.others();
        let many = self.clone();
        let settled = all_at_once(store, 4 * n + 2 * pairs, move |s, j| {
            let (many, strangers) = (many.clone(), strangers.clone());
            async move {
                if j >= 4 * n {
                    let racer = &many.racers[j - 4 * n].held;
                    return s.complete(racer, Completion::Succeeded, LONG).await;
                }
                let (i, which) = (j / 4, j % 4);
                let (owner, stranger) = (&many.claims[i].held, &strangers[i]);
                match (which, i % 4) {
                    (0, 0) => s.complete(owner, Completion::Succeeded, LONG).await,
                    (0, 1) => s.complete(owner, Completion::Poisoned, LONG).await,
                    (0, 2) => s.release(owner).await,
                    (0, _) => s.extend(owner, LONG).await,
                    (1, _) => s.complete(stranger, Completion::Succeeded, LONG).await,
                    (2, _) => s.release(stranger).await,
                    _ => s.extend(stranger, LONG).await,
                }
            }
        })
        .await;
        for (j, r) in settled.into_iter().enumerate() {
            let done = ok(r, "concurrent settle");
            if j >= 4 * n {
                let r = j - 4 * n;
                assert_eq!(
                    done,
                    winners[r / 2] == r,
                    "completion of {} by {} (only the claim's winner may complete)",
                    self.racers[r].held.key,
                    if winners[r / 2] == r {
                        "the winner"
                    } else {
                        "the loser"
                    }
                );
            } else if j % 4 == 0 {
                assert!(
                    done,
                    "owner's operation {} on {}",
                    (j / 4) % 4,
                    self.key(j / 4)
                );
            } else {
                assert!(
                    !done,
                    "stranger's operation {} on {} must be refused",
                    j % 4,
                    self.key(j / 4)
                );
            }
        }
    }

    /// Round 3: fresh claims see each key's own state; reopen the done ones.
    async fn fresh_claims(self: &Arc<Self>, store: &Arc<dyn DedupStore>) {
        let n = self.n;
        let fresh: Arc<Vec<ClaimRequest>> = Arc::new(
            (0..n)
                .map(|i| {
                    let fp = Some(format!("fresh-{i}"));
                    ClaimRequest::new(self.key(i).clone(), OwnerToken::generate(), fp)
                })
                .collect(),
        );
        let reopeners = self.others();
        let answers = all_at_once(store, 2 * n, move |s, j| {
            let (fresh, reopeners) = (fresh.clone(), reopeners.clone());
            async move {
                let (i, reopen) = (j / 2, j % 2 == 1);
                if reopen {
                    if i % 4 < 2 {
                        let reopened = s.reopen_poisoned(&reopeners[i], LONG).await?;
                        return Ok((None, Some(reopened)));
                    }
                    return Ok((None, None));
                }
                if i % 2 == 0 {
                    let (c, starts) = s.claim_counting(&fresh[i], LONG).await?;
                    Ok((Some((c, starts)), None))
                } else {
                    let c = s.claim(&fresh[i], LONG).await?;
                    Ok::<_, StoreError>((Some((c, None)), None))
                }
            }
        })
        .await;
        for (j, r) in answers.into_iter().enumerate() {
            let (i, k) = (j / 2, self.key(j / 2));
            match ok(r, "concurrent claim or reopen") {
                (Some((c, starts)), _) => match i % 4 {
                    0 | 1 => {
                        let completion = if i % 4 == 0 {
                            Completion::Succeeded
                        } else {
                            Completion::Poisoned
                        };
                        // The reopen of a poisoned key runs at the same time: the claim
                        // sees the record before it (done) or after it (held: busy).
                        let done = Claim::Done {
                            completion,
                            fingerprint: Some(format!("fp-{i}")),
                        };
                        assert!(
                            c == done || (i % 4 == 1 && matches!(c, Claim::Busy { .. })),
                            "claim of {k}: expected {done:?}, got {c:?}"
                        );
                    }
                    2 => {
                        assert_eq!(c, Claim::Acquired, "claim of released {k}");
                        assert!(
                            matches!(starts, None | Some(0)),
                            "released {k}: no earlier unsettled start, got {starts:?}"
                        );
                    }
                    _ => assert!(
                        matches!(c, Claim::Busy { .. }),
                        "claim of extended {k}: expected Busy, got {c:?}"
                    ),
                },
                (None, Some(reopened)) => assert_eq!(
                    reopened,
                    i % 4 == 1,
                    "reopen of {k} ({})",
                    if i % 4 == 1 { "poisoned" } else { "succeeded" }
                ),
                (None, None) => {}
            }
        }
    }
}
