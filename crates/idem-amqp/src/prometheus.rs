//! The process's Prometheus and probe listener: `metrics` in the Prometheus text
//! format, liveness and readiness, over HTTP on one address per process.
//!
//! | path | answer |
//! |---|---|
//! | `GET /metrics` (and any path not below) | the rendered metrics, `200` |
//! | `GET /live` | `200 OK` while the process's tokio runtime serves requests (the liveness probe) |
//! | `GET /health` | the same as `/live` (its older name, kept) |
//! | `GET /ready` | `200` when every readiness source of [`Readiness::global`] is ready, else `503`; a JSON body either way (see [`Report::to_json`](crate::readiness::Report::to_json)) |
//!
//! Each scrape of `/metrics` and each `/ready` also sets the gauge
//! `idem_consumer_ready{consumer}` (1 ready, 0 not) of every worker registered, from
//! the same answer.
//!
//! **One listener per process.** The first [`Service`](crate::Service) started with
//! [`ServiceBuilder::listen`](crate::ServiceBuilder::listen), worker started with
//! [`WorkerBuilder::prometheus`](crate::WorkerBuilder::prometheus) (or the first
//! [`listen`]) installs the process-global `metrics` recorder and binds the address;
//! every later one given the *same* address joins that listener, and one given another
//! address fails with [`Error::Metrics`] naming the address in use. The listener stops
//! when the last worker (or [`Listener`]) using it is gone; the recorder stays
//! installed (the `metrics` crate cannot uninstall one), and a later `listen` binds
//! again with it. [`install_recorder`] shares the same recorder, so a test or an
//! application may render metrics itself and still run workers with a listener.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::error::Error;
use crate::readiness::{Readiness, Report, SourceKind};

/// How often histograms are drained into their summaries between scrapes.
const UPKEEP: Duration = Duration::from_secs(5);

#[derive(Default)]
struct State {
    /// The recorder idem installed, once it has.
    handle: Option<PrometheusHandle>,
    serving: Option<Serving>,
    generations: u64,
}

struct Serving {
    /// The address asked for and the one bound (they differ for port 0).
    asked: SocketAddr,
    bound: SocketAddr,
    users: usize,
    /// Which listener this is (a [`Listener`] of an earlier one must not count in it).
    generation: u64,
    task: tokio::task::JoinHandle<()>,
}

fn state() -> MutexGuard<'static, State> {
    static STATE: Mutex<State> = Mutex::new(State {
        handle: None,
        serving: None,
        generations: 0,
    });
    // Nothing panics while the lock is held; a poisoned lock still holds whole data.
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The recorder idem installed, installing it first if needed.
fn recorder(state: &mut State) -> Result<PrometheusHandle, Error> {
    if let Some(h) = &state.handle {
        return Ok(h.clone());
    }
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| {
        Error::Metrics(
            "another metrics recorder is already installed in this process; idem's Prometheus listener needs its own (install none, or render yours and drop `prometheus(addr)`)"
                .into(),
        )
    })?;
    state.handle = Some(handle.clone());
    Ok(handle)
}

/// Installs the Prometheus recorder as the global `metrics` recorder, without an HTTP
/// listener (render it yourself with [`PrometheusHandle::render`]). When idem already
/// installed it (a worker's listener, an earlier call), returns that recorder's handle.
/// Fails with [`Error::Metrics`] if another recorder is installed.
pub fn install_recorder() -> Result<PrometheusHandle, Error> {
    recorder(&mut state())
}

/// This process's use of the listener; the listener stops when the last one is
/// dropped. See the [module docs](self).
#[derive(Debug)]
pub struct Listener {
    addr: SocketAddr,
    generation: u64,
}

impl Listener {
    /// The address the listener is bound to (the actual port when port 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let mut st = state();
        if let Some(s) = st
            .serving
            .as_mut()
            .filter(|s| s.generation == self.generation)
        {
            s.users -= 1;
            if s.users == 0 {
                s.task.abort();
                tracing::info!(addr = %s.bound, "metrics listener stopped");
                st.serving = None;
            }
        }
    }
}

/// Serves this process's metrics, `/live` and `/ready` at `addr`, or joins the
/// listener already serving there. The listener runs on the tokio runtime of the call
/// that started it. Fails with [`Error::Metrics`] when the address
/// cannot be bound, when this process already serves at another address, or when a
/// metrics recorder other than idem's is installed.
///
/// # Panics
///
/// Outside a tokio runtime.
pub fn listen(addr: SocketAddr) -> Result<Listener, Error> {
    let mut st = state();
    // Served on the runtime of whoever started it: gone with that runtime.
    if st.serving.as_ref().is_some_and(|s| s.task.is_finished()) {
        st.serving = None;
    }
    if let Some(s) = &mut st.serving {
        if addr == s.asked || addr == s.bound {
            s.users += 1;
            return Ok(Listener {
                addr: s.bound,
                generation: s.generation,
            });
        }
        return Err(Error::Metrics(format!(
            "this process already serves its metrics at {}; every worker of a process must be given that address (asked for {addr})",
            s.bound
        )));
    }
    let handle = recorder(&mut st)?;
    let cannot = |e: std::io::Error| Error::Metrics(format!("cannot listen on {addr}: {e}"));
    let std_listener = std::net::TcpListener::bind(addr).map_err(cannot)?;
    std_listener.set_nonblocking(true).map_err(cannot)?;
    let bound = std_listener.local_addr().map_err(cannot)?;
    let listener = tokio::net::TcpListener::from_std(std_listener).map_err(cannot)?;
    let task = tokio::spawn(serve(listener, handle, Readiness::global()));
    tracing::info!(addr = %bound, "serving Prometheus metrics at /metrics, probes at /live and /ready");
    st.generations += 1;
    let generation = st.generations;
    st.serving = Some(Serving {
        asked: addr,
        bound,
        users: 1,
        generation,
        task,
    });
    Ok(Listener {
        addr: bound,
        generation,
    })
}

/// The listener's routes, serving `handle`'s metrics and `readiness`.
pub(crate) fn router(handle: PrometheusHandle, readiness: Readiness) -> Router {
    let metrics = {
        let readiness = readiness.clone();
        move || {
            let handle = handle.clone();
            let readiness = readiness.clone();
            async move {
                publish_ready_gauges(&readiness.report());
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    handle.render(),
                )
            }
        }
    };
    let ready = move || {
        let readiness = readiness.clone();
        async move {
            let report = readiness.report();
            publish_ready_gauges(&report);
            let status = if report.is_ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (
                status,
                [(header::CONTENT_TYPE, "application/json")],
                report.to_json(),
            )
                .into_response()
        }
    };
    Router::new()
        .route("/live", get(|| async { "OK" }))
        .route("/health", get(|| async { "OK" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics.clone()))
        .fallback(metrics)
}

async fn serve(listener: tokio::net::TcpListener, handle: PrometheusHandle, readiness: Readiness) {
    let upkeep = {
        let handle = handle.clone();
        async move {
            let mut every = tokio::time::interval(UPKEEP);
            loop {
                every.tick().await;
                handle.run_upkeep();
            }
        }
    };
    let app = router(handle, readiness);
    tokio::select! {
        r = axum::serve(listener, app) => if let Err(e) = r {
            tracing::warn!(error = %e, "metrics listener stopped");
        },
        () = upkeep => {}
    }
}

/// Sets `idem_consumer_ready{consumer}` for every consumer in `report` (a name
/// shared by several workers is ready when all of them are).
fn publish_ready_gauges(report: &Report) {
    let mut by_name: BTreeMap<&str, bool> = BTreeMap::new();
    for s in report
        .sources
        .iter()
        .filter(|s| s.kind == SourceKind::Consumer)
    {
        *by_name.entry(&s.name).or_insert(true) &= s.is_ready();
    }
    for (name, ready) in by_name {
        metrics::gauge!("idem_consumer_ready", "consumer" => name.to_owned()).set(if ready {
            1.0
        } else {
            0.0
        });
    }
}

#[cfg(test)]
mod tests;
