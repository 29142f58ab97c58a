//! An optional Prometheus endpoint: the process's `metrics` in the text exposition
//! format over HTTP, served by `metrics-exporter-prometheus`'s own listener
//! (`PrometheusBuilder::with_http_listener`, hyper underneath) rather than by code of
//! ours.
//!
//! What the listener answers (the exporter's behaviour): `GET /health` is `OK`; every
//! other path, `/metrics` included, is the rendered metrics. A worker started with
//! [`WorkerBuilder::prometheus`](crate::WorkerBuilder::prometheus) installs the
//! recorder as the process-global `metrics` recorder (once per process: a second
//! install is [`Error::Metrics`]), serves while it runs and stops serving when it
//! returns.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::error::Error;

/// Installs the Prometheus recorder as the global `metrics` recorder, without an HTTP
/// listener (render it yourself with [`PrometheusHandle::render`]).
pub fn install_recorder() -> Result<PrometheusHandle, Error> {
    PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| Error::Metrics(e.to_string()))
}

/// Stops the endpoint when dropped.
pub(crate) struct Endpoint(tokio::task::JoinHandle<()>);

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds `addr`, installs the global recorder and serves it there.
pub(crate) async fn spawn_endpoint(addr: SocketAddr) -> Result<Endpoint, Error> {
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(addr)
        .build()
        .map_err(|e| Error::Metrics(format!("cannot listen on {addr}: {e}")))?;
    metrics::set_global_recorder(recorder).map_err(|e| Error::Metrics(e.to_string()))?;
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(Endpoint(tokio::spawn(async move {
        if let Err(e) = exporter.await {
            tracing::warn!(error = ?e, "metrics endpoint stopped");
        }
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    #[tokio::test]
    async fn serves_rendered_metrics() {
        let addr = {
            let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
            probe.local_addr().unwrap()
        };
        let (recorder, exporter) = PrometheusBuilder::new()
            .with_http_listener(addr)
            .build()
            .unwrap();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("idem_test_total").increment(3);
        });
        let server = tokio::spawn(exporter);
        let get = |path: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains("idem_test_total 3"), "{ok}");
        let health = get("/health").await;
        assert!(
            health.starts_with("HTTP/1.1 200") && health.ends_with("OK"),
            "{health}"
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_busy_port_is_an_error_naming_it() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = spawn_endpoint(addr).await.err().unwrap();
        assert!(matches!(err, Error::Metrics(_)), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
