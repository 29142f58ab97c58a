//! "Will be acked as a duplicate": what a replay predicts from the consumer's dedup
//! store, before it moves anything.
//!
//! A replayed message whose key is already `done (succeeded)` in its consumer's dedup
//! store is acked by the consumer without running its handler. `idem dlq replay
//! --dedup-redis URL` looks each selected message's key up first (the record layout of
//! `idem_redis`, read only) and reports those as `will be acked as a duplicate`, in a
//! dry run and in a real run. The key is the message's `x-idem-key` (else its message
//! id), the consumer its `x-idem-consumer` (else `--dedup-consumer`). A key recorded
//! with a payload fingerprint that is neither the body's nor the one it was edited from
//! is reported as `will be dead-lettered: different payload`. Only the Redis store is
//! supported; the SQL inbox is not looked up.

use idem_core::dedup::{ScopedKey, ORIGINAL_FINGERPRINT_HEADER};
use idem_redis::RedisStore;
use serde::Serialize;

use crate::error::CliError;

/// What the consumer will do with a replayed message, as far as its store tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// No record, or one that lets it run (poisoned, processing): the handler runs.
    Runs,
    /// Its key is done (succeeded): acked as a duplicate, the handler does not run.
    Duplicate,
    /// Its key is done with another payload: dead-lettered again.
    Mismatch,
}

/// A read-only look into a consumer's Redis dedup store.
#[derive(Clone, Debug)]
pub struct DedupLookup {
    store: RedisStore,
    consumer: Option<String>,
}

impl DedupLookup {
    /// Connects to the Redis store at `url` (key prefix `prefix`, `idem` by default);
    /// `consumer` names the consumer for messages without `x-idem-consumer`.
    pub async fn redis(
        url: &str,
        prefix: &str,
        consumer: Option<String>,
    ) -> Result<Self, CliError> {
        let store = RedisStore::builder(url)
            .prefix(prefix)
            .connect()
            .await
            .map_err(|e| CliError::Unreachable(format!("cannot reach the dedup store: {e}")))?;
        Ok(DedupLookup { store, consumer })
    }

    /// What the consumer will do with `msg` (a dead letter as read).
    pub async fn predict(
        &self,
        consumer: Option<&str>,
        key: &str,
        body: &[u8],
        edited_from: Option<&str>,
    ) -> Result<Prediction, CliError> {
        let Some(consumer) = consumer.or(self.consumer.as_deref()) else {
            return Ok(Prediction::Runs);
        };
        let rkey = self.store.redis_key(&ScopedKey::new(consumer, key));
        let mut conn = self.store.connection();
        let (state, completion, fingerprint): (Option<String>, Option<String>, Option<String>) =
            redis::cmd("HMGET")
                .arg(&rkey)
                .arg("s")
                .arg("c")
                .arg("f")
                .query_async(&mut conn)
                .await
                .map_err(|e| CliError::Unreachable(format!("dedup store lookup failed: {e}")))?;
        if state.as_deref() != Some("d") {
            return Ok(Prediction::Runs);
        }
        if let Some(f) = fingerprint {
            let body_fp = super::sha256_hex(body);
            if f != body_fp && edited_from != Some(f.as_str()) {
                return Ok(Prediction::Mismatch);
            }
        }
        Ok(match completion.as_deref() {
            Some("p") => Prediction::Runs,
            _ => Prediction::Duplicate,
        })
    }
}

/// The header naming the fingerprint a message was edited from.
pub(super) const EDITED_FROM: &str = ORIGINAL_FINGERPRINT_HEADER;
