//! The checks of the calls on many keys: [`claim_many_as_one_by_one`] and
//! [`complete_and_release_many`].

use super::*;
use crate::dedup::{CompleteRequest, CountedClaim};

async fn claims(
    store: &dyn DedupStore,
    requests: &[ClaimRequest],
    terms: Terms,
) -> Vec<CountedClaim> {
    let answers = store.claim_many(requests, terms).await;
    assert_eq!(
        answers.len(),
        requests.len(),
        "claim_many answers once per request"
    );
    answers
        .into_iter()
        .zip(requests)
        .map(|(a, r)| ok(a, &format!("claim_many of {}", r.held.key)))
        .collect()
}

/// A claim of `k` for a fresh owner with fingerprint `fp-1`.
fn request(k: &ScopedKey) -> ClaimRequest {
    ClaimRequest::new(k.clone(), OwnerToken::generate(), Some("fp-1".into()))
}

/// One `claim_many` call over keys in every state answers each key as
/// `claim_counting` does: absent and expired keys acquired (with their earlier
/// unsettled starts: none for an absent key, one for a key whose counted lease
/// expired, when the store counts), done keys `Done` with their completion and
/// fingerprint, a held key `Busy`. The acquired claims are held by their requests'
/// owners, with the requests' fingerprints. An empty call answers nothing.
pub async fn claim_many_as_one_by_one(store: &dyn DedupStore, scope: &str) {
    let k = |name: &str| key(scope, &format!("many-{name}"));
    let (done, poisoned, held, expired) = (k("done"), k("poisoned"), k("held"), k("expired"));
    let (fresh, bare) = (k("fresh"), k("bare"));
    for (key, completion) in [
        (&done, Completion::Succeeded),
        (&poisoned, Completion::Poisoned),
    ] {
        let a = holder(key);
        assert_eq!(claim(store, &a, LONG).await, Claim::Acquired);
        assert!(complete(store, &a, completion, LONG).await);
    }
    assert_eq!(claim(store, &holder(&held), LONG).await, Claim::Acquired);
    let expiring = ClaimRequest::new(expired.clone(), OwnerToken::generate(), None);
    let counted = store.claim_counting(&expiring, SHORT_LEASE).await;
    assert!(matches!(
        ok(counted, "claim_counting"),
        (Claim::Acquired, _)
    ));
    tokio::time::sleep(LEASE + LEASE / 2).await;

    let requests = vec![
        request(&fresh),
        request(&done),
        request(&poisoned),
        request(&held),
        request(&expired),
        ClaimRequest::new(bare.clone(), OwnerToken::generate(), None),
    ];
    let answers = claims(store, &requests, LONG).await;
    let (first, starts) = &answers[0];
    assert_eq!(*first, Claim::Acquired, "absent key");
    assert!(
        matches!(starts, None | Some(0)),
        "absent key: no earlier start, got {starts:?}"
    );
    let counts = starts.is_some();
    let seen_done = |completion| Claim::Done {
        completion,
        fingerprint: Some("fp-1".into()),
    };
    assert_eq!(answers[1].0, seen_done(Completion::Succeeded), "done key");
    assert_eq!(
        answers[2].0,
        seen_done(Completion::Poisoned),
        "poisoned key"
    );
    assert!(
        matches!(answers[3].0, Claim::Busy { retry_in } if retry_in > Duration::ZERO && retry_in <= LONG.lease),
        "held key: busy, got {:?}",
        answers[3].0
    );
    assert_eq!(answers[4].0, Claim::Acquired, "expired lease");
    let expected = counts.then_some(1);
    assert_eq!(
        answers[4].1, expected,
        "a counted start whose lease expired is one earlier start"
    );
    assert_eq!(
        answers[5].0,
        Claim::Acquired,
        "absent key without fingerprint"
    );

    // The acquired claims are held, by their requests' owners, with their fingerprints.
    for i in [0, 4, 5] {
        let r = &requests[i].held;
        assert!(
            matches!(
                claim(store, &holder(&r.key), LONG).await,
                Claim::Busy { .. }
            ),
            "{} is held after claim_many",
            r.key
        );
        assert!(
            complete(store, r, Completion::Succeeded, LONG).await,
            "{} is held by its request's owner",
            r.key
        );
    }
    let stranger = ClaimRequest::new(bare.clone(), OwnerToken::generate(), None);
    let recorded = store.claim(&stranger, LONG).await;
    assert_eq!(
        ok(recorded, "claim"),
        Claim::Done {
            completion: Completion::Succeeded,
            fingerprint: None
        },
        "no fingerprint recorded for a request without one"
    );
    assert!(
        claims(store, &[], LONG).await.is_empty(),
        "an empty claim_many answers nothing"
    );
}

/// `complete_many` and `release_many` settle each key as `complete` and `release`
/// do: only for the owner of the claim (a stranger's request answers `false` and
/// changes nothing), each key with its own completion; released keys are free at once,
/// and their start count is cleared. Empty calls answer nothing.
pub async fn complete_and_release_many(store: &dyn DedupStore, scope: &str) {
    let keys: Vec<ScopedKey> = (0..5)
        .map(|i| key(scope, &format!("settle-many-{i}")))
        .collect();
    let requests: Vec<ClaimRequest> = keys.iter().map(request).collect();
    for (claim, _) in claims(store, &requests, LONG).await {
        assert_eq!(claim, Claim::Acquired);
    }
    let owner = |i: usize| requests[i].held.owner.clone();
    let stranger = OwnerToken::generate();
    let completions = vec![
        CompleteRequest::new(keys[0].clone(), owner(0), Completion::Succeeded),
        CompleteRequest::new(keys[1].clone(), owner(1), Completion::Poisoned),
        CompleteRequest::new(keys[2].clone(), stranger.clone(), Completion::Succeeded),
    ];
    let answers = store.complete_many(&completions, LONG).await;
    let answers: Vec<bool> = answers
        .into_iter()
        .map(|a| ok(a, "complete_many"))
        .collect();
    assert_eq!(answers, [true, true, false], "complete_many: owners only");
    let releases = vec![
        requests[2].held.clone(),
        HeldClaim::new(keys[3].clone(), stranger.clone()),
        requests[4].held.clone(),
    ];
    let answers = store.release_many(&releases).await;
    let answers: Vec<bool> = answers.into_iter().map(|a| ok(a, "release_many")).collect();
    assert_eq!(answers, [true, false, true], "release_many: owners only");

    let again = claims(store, &keys.iter().map(request).collect::<Vec<_>>(), LONG).await;
    let done = |completion| Claim::Done {
        completion,
        fingerprint: Some("fp-1".into()),
    };
    assert_eq!(
        again[0].0,
        done(Completion::Succeeded),
        "completed: succeeded"
    );
    assert_eq!(
        again[1].0,
        done(Completion::Poisoned),
        "completed: poisoned"
    );
    for i in [2, 4] {
        assert_eq!(again[i].0, Claim::Acquired, "released key is free");
        assert!(
            matches!(again[i].1, None | Some(0)),
            "release clears the start count, got {:?}",
            again[i].1
        );
    }
    assert!(
        matches!(again[3].0, Claim::Busy { .. }),
        "a stranger's release changes nothing"
    );
    assert!(store.complete_many(&[], LONG).await.is_empty());
    assert!(store.release_many(&[]).await.is_empty());
}
