//! Readiness: whether this process should be sent work, and if not, why.
//!
//! A [`Readiness`] is a registry of named *sources*: each running [`Worker`](crate::Worker)
//! registers one (kind [`SourceKind::Consumer`], named after its consumer), and an
//! outbox relay can register one (kind [`SourceKind::Relay`]). Each source is a check
//! that returns the reasons it is not ready (none: ready); the registry asks every
//! source when it is asked, so the answer is never older than the question. The
//! process is ready when no source has a reason.
//!
//! A worker's source is not ready while:
//!
//! - it has no open broker connection (before its first connection, after a loss until
//!   it has reconnected, and while it is paused, since a paused worker closes its
//!   connection);
//! - its consumer's circuit breaker is open (see [`idem_core::breaker`]);
//! - it is shutting down.
//!
//! A relay's source is not ready while its oldest pending outbox row is older than the
//! threshold it was given (see `idem_outbox::RelayBuilder::readiness`).
//!
//! Every worker and relay of a process registers in [`Readiness::global`] unless told
//! otherwise, and the Prometheus listener ([`crate::prometheus`]) serves that registry
//! at `/ready`, so any number of workers and relays in one process answer through one
//! listener. A source leaves the registry when its [`Registration`] is dropped (the
//! worker returned).
//!
//! ```
//! use idem_amqp::readiness::{Readiness, SourceKind};
//!
//! let readiness = Readiness::new();
//! let cache = readiness.register(SourceKind::Other, "cache-warmup", || {
//!     vec!["cache not warmed up yet".to_owned()]
//! });
//! let report = readiness.report();
//! assert!(!report.is_ready());
//! assert!(report.to_json().contains("cache not warmed up yet"));
//! drop(cache);
//! assert!(readiness.report().is_ready());
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// What a readiness source is; it decides the metric its state is published as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceKind {
    /// A consumer's worker: its state is also the gauge `idem_consumer_ready{consumer}`.
    Consumer,
    /// An outbox relay.
    Relay,
    /// Anything else the application wants `/ready` to wait for.
    Other,
}

impl SourceKind {
    /// `consumer`, `relay` or `other` (the `kind` field of the JSON report).
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Consumer => "consumer",
            SourceKind::Relay => "relay",
            SourceKind::Other => "other",
        }
    }
}

type Check = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

struct Source {
    kind: SourceKind,
    name: String,
    check: Check,
}

#[derive(Default)]
struct Inner {
    sources: Mutex<BTreeMap<u64, Source>>,
    next: AtomicU64,
}

/// A registry of readiness sources. Cloning gives another handle on the same
/// registry. See the [module docs](self).
#[derive(Clone, Default)]
pub struct Readiness {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .sources()
            .values()
            .map(|s| format!("{}:{}", s.kind.as_str(), s.name))
            .collect();
        f.debug_struct("Readiness")
            .field("sources", &names)
            .finish()
    }
}

impl Readiness {
    /// An empty registry (ready: nothing to wait for).
    pub fn new() -> Self {
        Self::default()
    }

    /// The process's registry: the one workers and relays register in by default, and
    /// the one the Prometheus listener serves at `/ready`.
    pub fn global() -> Readiness {
        static GLOBAL: OnceLock<Readiness> = OnceLock::new();
        GLOBAL.get_or_init(Readiness::new).clone()
    }

    fn sources(&self) -> MutexGuard<'_, BTreeMap<u64, Source>> {
        // A check never runs under the lock (see `report`), so a poisoned lock only
        // means a panic in between: the map itself is still whole.
        self.inner
            .sources
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a source named `name`: `check` returns why it is not ready (empty: ready).
    /// It is called each time the registry is asked (each `/ready` and `/metrics`
    /// request), from the listener's task: keep it quick and non-blocking. The source
    /// stays until the returned [`Registration`] is dropped. Several sources may share
    /// a name (two workers of one consumer); each is reported.
    pub fn register(
        &self,
        kind: SourceKind,
        name: impl Into<String>,
        check: impl Fn() -> Vec<String> + Send + Sync + 'static,
    ) -> Registration {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let name = name.into();
        self.sources().insert(
            id,
            Source {
                kind,
                name: name.clone(),
                check: Arc::new(check),
            },
        );
        Registration {
            registry: self.clone(),
            id,
            kind,
            name,
        }
    }

    /// Asks every source now.
    pub fn report(&self) -> Report {
        // Copy the checks out, so a slow or re-entrant check cannot hold the lock.
        let sources: Vec<(SourceKind, String, Check)> = self
            .sources()
            .values()
            .map(|s| (s.kind, s.name.clone(), s.check.clone()))
            .collect();
        Report {
            sources: sources
                .into_iter()
                .map(|(kind, name, check)| SourceReport {
                    kind,
                    name,
                    reasons: check(),
                })
                .collect(),
        }
    }
}

/// A source's place in a [`Readiness`] registry; dropping it removes the source.
#[must_use = "the source leaves the registry when this is dropped"]
pub struct Registration {
    registry: Readiness,
    id: u64,
    kind: SourceKind,
    name: String,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("kind", &self.kind)
            .field("name", &self.name)
            .finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.sources().remove(&self.id);
        #[cfg(feature = "prometheus")]
        if self.kind == SourceKind::Consumer {
            // A worker that stopped takes no work: its last state must not stay 1.
            metrics::gauge!("idem_consumer_ready", "consumer" => self.name.clone()).set(0.0);
        }
    }
}

/// The answer of every source at one moment. See [`Readiness::report`].
#[derive(Clone, Debug)]
pub struct Report {
    /// One entry per registered source, in registration order.
    pub sources: Vec<SourceReport>,
}

/// One source's answer.
#[derive(Clone, Debug)]
pub struct SourceReport {
    /// What the source is.
    pub kind: SourceKind,
    /// Its name (the consumer's name for a worker).
    pub name: String,
    /// Why it is not ready; empty when it is.
    pub reasons: Vec<String>,
}

impl SourceReport {
    /// Whether this source has no reason to refuse work.
    pub fn is_ready(&self) -> bool {
        self.reasons.is_empty()
    }
}

impl Report {
    /// Whether every source is ready (true with no source at all).
    pub fn is_ready(&self) -> bool {
        self.sources.iter().all(SourceReport::is_ready)
    }

    /// The JSON body of `/ready`:
    /// `{"ready":false,"reasons":["consumer billing: circuit breaker open: …"],"sources":[{"kind":"consumer","name":"billing","ready":false,"reasons":["circuit breaker open: …"]}]}`.
    /// The top-level `reasons` names each source in front of its own reasons.
    pub fn to_json(&self) -> String {
        let mut all = Vec::new();
        let mut sources = Vec::new();
        for s in &self.sources {
            for r in &s.reasons {
                all.push(json_string(&format!("{} {}: {r}", s.kind.as_str(), s.name)));
            }
            let reasons: Vec<String> = s.reasons.iter().map(|r| json_string(r)).collect();
            sources.push(format!(
                r#"{{"kind":"{}","name":{},"ready":{},"reasons":[{}]}}"#,
                s.kind.as_str(),
                json_string(&s.name),
                s.is_ready(),
                reasons.join(",")
            ));
        }
        format!(
            r#"{{"ready":{},"reasons":[{}],"sources":[{}]}}"#,
            self.is_ready(),
            all.join(","),
            sources.join(",")
        )
    }
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_each_reason_with_its_source_and_escapes() {
        let r = Readiness::new();
        let _a = r.register(SourceKind::Consumer, "bill\"ing", || {
            vec!["broker connection down".into()]
        });
        let _b = r.register(SourceKind::Relay, "outbox", Vec::new);
        let report = r.report();
        assert!(!report.is_ready());
        assert_eq!(
            report.to_json(),
            r#"{"ready":false,"reasons":["consumer bill\"ing: broker connection down"],"sources":[{"kind":"consumer","name":"bill\"ing","ready":false,"reasons":["broker connection down"]},{"kind":"relay","name":"outbox","ready":true,"reasons":[]}]}"#
        );
    }

    #[test]
    fn empty_registry_is_ready_and_dropped_sources_leave() {
        let r = Readiness::new();
        assert!(r.report().is_ready());
        let a = r.register(SourceKind::Other, "x", || vec!["no".into()]);
        let b = r.register(SourceKind::Other, "x", Vec::new);
        assert_eq!(r.report().sources.len(), 2);
        drop(a);
        assert!(r.report().is_ready());
        drop(b);
        assert!(r.report().sources.is_empty());
        assert_eq!(json_string("a\u{1}"), r#""a\u0001""#);
    }
}
