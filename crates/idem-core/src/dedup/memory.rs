use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::store::{
    Claim, ClaimRequest, Completion, CountedClaim, DedupStore, HeldClaim, OwnerToken, ScopedKey,
    StoreResult, Terms,
};

#[derive(Debug, Clone)]
enum State {
    Processing { owner: OwnerToken },
    Done { completion: Completion },
}

#[derive(Debug, Clone)]
struct Entry {
    state: State,
    expires: Instant,
    fingerprint: Option<String>,
}

/// An in-process dedup store: the embedded default for tests and the quickstart.
///
/// It forgets everything when the process exits, so it only dedups within one
/// process. Expired records are swept every `max(1024, records)` operations. Cloning shares the map.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<ScopedKey, Entry>,
    /// Unsettled starts per key (crash counting), and until when they are remembered.
    starts: HashMap<ScopedKey, (u32, Instant)>,
    ops_until_sweep: usize,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of records, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave a half-written entry (every
        // write is one insert/remove), so a poisoned lock is safe to reuse.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<ScopedKey, Entry>, Instant) -> T) -> T {
        let mut inner = self.lock();
        // Read the clock under the lock, so times follow the order of the operations:
        // read before it, a call that waited for the lock would see a claim made after
        // its clock read, and answer a `retry_in` longer than the lease.
        let now = Instant::now();
        // Sweep expired records once per max(1024, len) operations: amortised O(1).
        if inner.ops_until_sweep == 0 {
            inner.map.retain(|_, e| e.expires > now);
            inner.starts.retain(|_, (_, until)| *until > now);
            inner.ops_until_sweep = inner.map.len().max(1024);
        } else {
            inner.ops_until_sweep -= 1;
        }
        f(&mut inner.map, now)
    }

    /// Records one more start of `key`; returns the earlier unsettled ones.
    fn count_start(&self, key: &ScopedKey, memory: Duration) -> u32 {
        let mut inner = self.lock();
        let now = Instant::now();
        let entry = inner.starts.entry(key.clone()).or_insert((0, now));
        let earlier = if entry.1 > now { entry.0 } else { 0 };
        *entry = (earlier.saturating_add(1), now + memory);
        earlier
    }

    fn clear_starts(&self, key: &ScopedKey) {
        self.lock().starts.remove(key);
    }
}

fn held_by<'a>(
    map: &'a mut HashMap<ScopedKey, Entry>,
    held: &HeldClaim,
    now: Instant,
) -> Option<&'a mut Entry> {
    map.get_mut(&held.key).filter(|e| {
        e.expires > now && matches!(&e.state, State::Processing { owner } if *owner == held.owner)
    })
}

#[async_trait]
impl DedupStore for MemoryStore {
    async fn claim(&self, req: &ClaimRequest, terms: Terms) -> StoreResult<Claim> {
        let HeldClaim { key, owner } = &req.held;
        Ok(self.with(|map, now| {
            if let Some(e) = map.get(key).filter(|e| e.expires > now) {
                return match &e.state {
                    State::Done { completion } => Claim::Done {
                        completion: *completion,
                        fingerprint: e.fingerprint.clone(),
                    },
                    State::Processing { .. } => Claim::Busy {
                        retry_in: e.expires - now,
                    },
                };
            }
            map.insert(
                key.clone(),
                Entry {
                    state: State::Processing {
                        owner: owner.clone(),
                    },
                    expires: now + terms.lease,
                    fingerprint: req.fingerprint.clone(),
                },
            );
            Claim::Acquired
        }))
    }

    async fn claim_counting(&self, req: &ClaimRequest, terms: Terms) -> StoreResult<CountedClaim> {
        let claim = self.claim(req, terms).await?;
        // Only the claim's holder reaches this: no other start can interleave.
        let earlier = match claim {
            Claim::Acquired => self.count_start(&req.held.key, terms.retention),
            _ => 0,
        };
        Ok((claim, Some(earlier)))
    }

    async fn extend(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool> {
        Ok(self.with(|map, now| match held_by(map, held, now) {
            Some(e) => {
                e.expires = now + terms.lease;
                true
            }
            None => false,
        }))
    }

    async fn complete(&self, held: &HeldClaim, how: Completion, terms: Terms) -> StoreResult<bool> {
        let done = self.with(|map, now| match held_by(map, held, now) {
            Some(e) => {
                e.state = State::Done { completion: how };
                e.expires = now + terms.retention;
                true
            }
            None => false,
        });
        if done {
            self.clear_starts(&held.key);
        }
        Ok(done)
    }

    async fn release(&self, held: &HeldClaim) -> StoreResult<bool> {
        Ok(self.with(|map, now| {
            if held_by(map, held, now).is_some() {
                map.remove(&held.key);
                true
            } else {
                false
            }
        }))
        .inspect(|released| {
            if *released {
                self.clear_starts(&held.key);
            }
        })
    }

    async fn reopen_poisoned(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool> {
        Ok(self.with(|map, now| match map.get_mut(&held.key) {
            Some(e)
                if e.expires > now
                    && matches!(
                        e.state,
                        State::Done {
                            completion: Completion::Poisoned
                        }
                    ) =>
            {
                e.state = State::Processing {
                    owner: held.owner.clone(),
                };
                e.expires = now + terms.lease;
                true
            }
            _ => false,
        }))
    }
}
