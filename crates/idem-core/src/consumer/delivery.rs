//! One delivery through the consumer: the stack's run (with its immediate retries),
//! the [policy](super::policy)'s decision, and the [`Disposition`] it becomes.

use std::time::{Instant, SystemTime};

use tower::ServiceExt;
use tracing::{field, Instrument};

use super::context::DeliveryContext;
use super::policy::{self, Decision, History, Policy};
use super::stats::Meters;
use super::Consumer;
use crate::dedup::Processed;
use crate::error::{capturing_backtraces, ErrorKind, HandlerError};
use crate::message::Message;
use crate::outcome::{Disposition, Failure, Origin, MAX_BACKTRACE_LEN, MAX_HEADER_LEN};
use crate::text::truncate;

impl Consumer {
    /// Runs the stack on one delivery and decides what the transport must do.
    ///
    /// The delivery's [context](DeliveryContext) is the one the transport read into
    /// [`Message::context`], or, for a message that arrives without one, read here
    /// from its headers; [`DeliveryInfo::attempt`](crate::DeliveryInfo::attempt) is
    /// set from it. Its failure record names the key the dedup stage resolved.
    ///
    /// In at-most-once mode the transport has acked already; a failure then yields
    /// [`Disposition::Ack`] after being logged and counted as dropped.
    pub async fn process(&self, mut msg: Message) -> Disposition {
        let inner = &self.inner;
        let meters = inner.meters.get_or_init(|| Meters::new(&inner.name));
        let ctx = DeliveryContext::for_run(&msg, inner.crash_guard.clone());
        let origin = Origin::of(&msg, ctx.failed_before());
        msg.delivery.attempt = ctx.attempt();
        msg.context = ctx.clone();
        let span = tracing::info_span!(
            "idem.delivery",
            consumer = %inner.name,
            queue = %msg.delivery.queue,
            message_id = msg.properties.message_id.as_deref().unwrap_or(""),
            key = field::Empty,
            // i64: OpenTelemetry exports it as an integer (a u64 field becomes text).
            attempt = i64::from(msg.delivery.attempt),
            immediate_retries = field::Empty,
            outcome = field::Empty,
            latency_ms = field::Empty,
        );
        // W3C trace context: parent from the message, link to the previous attempt.
        #[cfg(feature = "otel")]
        let had_parent = crate::otel::adopt(&span, &msg);
        let started = Instant::now();
        let (result, spent) = self.run_tries(msg, &span, meters).await;
        span.record("immediate_retries", spent);
        let elapsed = started.elapsed();
        meters.latency.record(elapsed.as_secs_f64());

        let history = History {
            failed_before: ctx.failed_before(),
            first_failed_at: ctx.first_failed_at(),
            now: SystemTime::now(),
        };
        let policy = Policy {
            mode: inner.mode,
            backoff: &inner.backoff,
        };
        let decision = policy::decide(
            result.as_ref().map(|p| *p).map_err(HandlerError::verdict),
            &history,
            &policy,
        );
        let disposition = match result {
            Ok(_) => self.disposition(decision, None),
            Err(err) => {
                let failure = self.failure(&err, &ctx, history.now, spent);
                self.disposition(decision, Some((failure, &origin)))
            }
        };
        #[cfg(feature = "otel")]
        let disposition = crate::otel::mark_copy(&span, had_parent, disposition);
        inner.counters.record(decision, meters);
        span.record("outcome", disposition.name());
        span.record("latency_ms", elapsed.as_secs_f64() * 1000.0);
        let _enter = span.enter();
        match &disposition {
            Disposition::Ack { .. } => tracing::debug!(outcome = disposition.name(), "settled"),
            Disposition::Retry { delay, failure, .. } => tracing::info!(
                ?delay, attempts = failure.attempts, error = %failure.error, "retry scheduled"
            ),
            Disposition::DeadLetter { failure, .. } => tracing::warn!(
                kind = %failure.kind, attempts = failure.attempts, error = %failure.error, "dead-lettered"
            ),
            // The breaker logs once when it opens; not one line per delivery.
            Disposition::Release { reason } => tracing::debug!(%reason, "handed back"),
            Disposition::Discard { reason } => tracing::info!(%reason, "discarded on purpose"),
        }
        disposition
    }

    /// Runs the stack on `msg`, again at once after each failure the policy lets
    /// pass ([`policy::retry_at_once`]); returns the last result and how many
    /// immediate retries ran.
    async fn run_tries(
        &self,
        mut msg: Message,
        span: &tracing::Span,
        meters: &Meters,
    ) -> (Result<Processed, HandlerError>, u32) {
        let inner = &self.inner;
        let immediate = inner.immediate;
        let mut spent = 0u32;
        loop {
            // Each try runs the whole stack: the dedup stage claims the key again
            // (a failed try released it; the SQL inbox rolled its transaction back and
            // begins a new one), the handler timeout starts afresh, and the circuit
            // breaker sees every store call.
            let this_try = if spent < immediate.limit {
                msg.clone()
            } else {
                std::mem::take(&mut msg)
            };
            let call = inner.service.clone().oneshot(this_try);
            let result = capturing_backtraces(inner.backtraces, call)
                .instrument(span.clone())
                .await;
            match result {
                Err(err) if policy::retry_at_once(err.verdict(), spent, immediate.limit) => {
                    spent += 1;
                    inner.counters.immediate_retry(meters);
                    span.in_scope(|| {
                        tracing::info!(
                            immediate_retry = spent,
                            of = immediate.limit,
                            error = %err,
                            "transient failure; retrying at once"
                        )
                    });
                    if !immediate.delay.is_zero() {
                        tokio::time::sleep(immediate.delay).await;
                    }
                }
                result => return (result, spent),
            }
        }
    }

    /// The failure record of `err`, as retry and dead-letter copies carry it: built
    /// from the delivery's context by [`Failure::for_delivery`]. Its attempt count is
    /// the one before this delivery; [`disposition`](Self::disposition) sets the one
    /// the decision charged.
    fn failure(
        &self,
        err: &HandlerError,
        ctx: &DeliveryContext,
        now: SystemTime,
        immediate_retries: u32,
    ) -> Failure {
        let kind = err.kind().unwrap_or(ErrorKind::Transient);
        let mut failure = Failure::for_delivery(ctx, kind, &err.chain(), now);
        failure.error_type = err.type_name().map(|t| truncate(t, MAX_HEADER_LEN));
        failure.immediate_retries = immediate_retries;
        failure.backtrace = err
            .backtrace()
            .filter(|_| self.inner.backtraces)
            .map(|b| truncate(&b.to_string(), MAX_BACKTRACE_LEN));
        failure
    }

    /// Turns the policy's decision into what the transport carries out: for a failed
    /// delivery, its failure record and the copy headers derived from `origin`.
    fn disposition(&self, decision: Decision, failed: Option<(Failure, &Origin)>) -> Disposition {
        let inner = &self.inner;
        let Some((failure, origin)) = failed else {
            return match decision {
                Decision::Ack { duplicate } => Disposition::Ack { duplicate },
                // The stack succeeded, and the policy acks every success: an ack is
                // right whatever it said.
                _ => Disposition::Ack { duplicate: false },
            };
        };
        match decision {
            Decision::Ack { duplicate } => Disposition::Ack { duplicate },
            Decision::Discard => Disposition::Discard {
                reason: failure.error,
            },
            Decision::Dropped => {
                tracing::warn!(error = %failure.error, "at-most-once handler failed; message was acked on receipt and is not retried");
                Disposition::Ack { duplicate: false }
            }
            Decision::Release => Disposition::Release {
                reason: failure.error,
            },
            Decision::Retry {
                delay,
                delay_kind,
                attempts,
            } => {
                let mut failure = failure;
                failure.attempts = attempts;
                Disposition::Retry {
                    headers: failure.retry_headers_from(origin),
                    delay,
                    delay_kind,
                    failure,
                }
            }
            Decision::DeadLetter { attempts } => {
                let mut failure = failure;
                failure.attempts = attempts;
                Disposition::DeadLetter {
                    headers: failure.dead_letter_headers_from(origin, &inner.name),
                    failure,
                }
            }
        }
    }
}
