//! The lease-store dedup layer's batch path: a [batch handler](crate::batch) admitted
//! a whole batch at a time.
//!
//! The consumer collects messages before admission; per batch the layer sends one
//! [`claim_many`](super::DedupStore::claim_many) call for every key, decides each
//! key exactly as a message on its own is decided ([`decide`]), runs the batch handler
//! on the admitted messages (extending all their leases while it runs), then sends one
//! [`complete_many`](super::DedupStore::complete_many) call for the succeeded,
//! discarded and poisoned messages and one
//! [`release_many`](super::DedupStore::release_many) call for the transiently failed
//! ones. A batch of one message uses the single-key calls instead (they share the
//! store's own batching with other callers).

use std::sync::Arc;
use std::time::Instant;

use super::admission::{decide, settlement, Admission, BatchEntry, Decision, Reading, Settlement};
use super::key::IdempotencyKey;
use super::layer::{
    claimed, finish, padded, release, store_failure, timed, with_lease, Config, DedupLayer,
    LeaseSession, Processed,
};
use super::store::{ClaimRequest, Completion, OwnerToken, ScopedKey};
use crate::batch::{BatchInput, BatchRunner};
use crate::consumer::DedupedService;
use crate::crash::CrashGuard;
use crate::error::HandlerError;
use crate::message::Message;

type Answer = Result<Processed, HandlerError>;

impl DedupLayer {
    /// The per-message service of a batch handler over this layer: collects messages
    /// into batches (as `runner`'s settings say) and admits each batch as a whole.
    pub(crate) fn batch_service(&self, runner: BatchRunner) -> DedupedService {
        let config = self.config.clone();
        crate::batch::plumbing::collected(runner.config(), move |messages| {
            let (config, runner) = (config.clone(), runner.clone());
            Box::pin(run(config, runner, messages))
        })
    }
}

/// One message of the batch on its way through.
type Entry = BatchEntry;

/// What the claim step left to do: the messages that run (their place in the batch,
/// the message, its session; in batch order), and the sessions of crash-looping
/// messages, to be recorded poisoned.
#[derive(Default)]
struct Admitted {
    places: Vec<usize>,
    messages: Vec<Message>,
    sessions: Vec<LeaseSession>,
    crashed: Vec<LeaseSession>,
}

/// Runs one batch; one answer per message, in order.
async fn run(config: Arc<Config>, runner: BatchRunner, messages: Vec<Message>) -> Vec<Answer> {
    let Some(first) = messages.first() else {
        return Vec::new();
    };
    // The collector makes a suspect a batch of its own: it runs alone. The turn lasts
    // until the outcomes are recorded.
    let guard = first.context.crash_guard();
    let _turn = guard.turn(first).await;
    let mut entries = Reading::batch(&config.settings, messages);
    let Admitted {
        places,
        messages,
        mut sessions,
        crashed,
    } = admit(&config, &mut entries, &guard).await;
    let results = handle(&config, &runner, messages, &mut sessions).await;

    let mut done: Vec<(&LeaseSession, Completion)> =
        crashed.iter().map(|s| (s, Completion::Poisoned)).collect();
    let mut released = Vec::new();
    for ((i, session), result) in places.into_iter().zip(&sessions).zip(results) {
        match settlement(&result) {
            Settlement::Succeeded => done.push((session, Completion::Succeeded)),
            Settlement::Poisoned => done.push((session, Completion::Poisoned)),
            Settlement::Released => released.push(session),
        }
        entries[i].answer = Some(result.map(|()| Processed::Handled));
    }
    finish(&config, &done).await;
    release(&config, &released).await;

    entries
        .into_iter()
        .map(|e| {
            e.answer
                .unwrap_or_else(|| Err(HandlerError::transient(crate::batch::BatchLost)))
        })
        .collect()
}

/// Claims every key still without an answer in one call and decides each one. The
/// entries not admitted get their answers here.
async fn admit(config: &Arc<Config>, entries: &mut [Entry], guard: &CrashGuard) -> Admitted {
    let mut sessions: Vec<(usize, LeaseSession)> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.answer.is_none())
        .filter_map(|(i, e)| {
            let r = e.reading.as_ref()?;
            let session = LeaseSession {
                config: config.clone(),
                request: ClaimRequest::new(
                    ScopedKey::new(config.scope.clone(), r.key.as_str()),
                    OwnerToken::generate(),
                    r.fingerprint.clone(),
                ),
            };
            Some((i, session))
        })
        .collect();
    let t = Instant::now();
    let answers = match sessions.as_mut_slice() {
        [] => return Admitted::default(),
        // One message: the single-key call, batched by the store with other callers'.
        [(_, one)] => vec![one.claim().await],
        many => {
            let requests: Vec<ClaimRequest> = many.iter().map(|(_, s)| s.request.clone()).collect();
            let answers = config.store.claim_many(&requests, config.terms).await;
            padded(timed(t, "claim", answers), many.len())
                .into_iter()
                .map(|a| match a {
                    Ok((claim, starts)) => {
                        Ok((claimed(claim, config.terms.lease), starts.unwrap_or(0)))
                    }
                    Err(e) => Err(store_failure(e)),
                })
                .collect()
        }
    };
    let mut admitted = Admitted::default();
    for ((i, mut session), answer) in sessions.into_iter().zip(answers) {
        let entry = &mut entries[i];
        let (found, earlier) = match answer {
            Ok(found) => found,
            Err(e) => {
                entry.answer = Some(Err(e));
                continue;
            }
        };
        let Some(reading) = entry.reading.as_ref() else {
            continue;
        };
        match decide(
            &config.settings,
            reading,
            &mut session,
            found,
            earlier,
            guard,
        )
        .await
        {
            Decision::Run => {
                if let Some(msg) = entry.msg.take() {
                    admitted.places.push(i);
                    admitted.messages.push(msg);
                    admitted.sessions.push(session);
                }
            }
            Decision::Declined(answer) => entry.answer = Some(answer),
            Decision::Crashed(err) => {
                entry.answer = Some(Err(err));
                admitted.crashed.push(session);
            }
        }
    }
    admitted
}

/// Runs the batch handler on the admitted `messages`, extending the leases of their
/// `sessions` while it runs; one result per message, in order.
async fn handle(
    config: &Config,
    runner: &BatchRunner,
    mut messages: Vec<Message>,
    sessions: &mut [LeaseSession],
) -> Vec<Result<(), HandlerError>> {
    if messages.is_empty() {
        return Vec::new();
    }
    for (msg, session) in messages.iter_mut().zip(sessions.iter_mut()) {
        let key = session.key().key().to_owned();
        msg.extensions.insert(IdempotencyKey(key));
        session.prepare(msg);
    }
    let n = messages.len();
    let mut results = with_lease(config, sessions, runner.run(BatchInput::new(messages))).await;
    results.resize_with(n, || Err(HandlerError::transient(crate::batch::BatchLost)));
    results
}
