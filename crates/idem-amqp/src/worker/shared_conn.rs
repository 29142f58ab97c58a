//! A connection several workers of a [`Service`](crate::Service) open their channels
//! on: connected on first use, and again by the first worker that needs it after a
//! loss (the others then use that new connection).

use std::sync::Arc;

use idem_core::TlsConfig;
use lapin::Connection;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::endpoints::Endpoints;
use crate::error::Error;

/// One AMQP connection shared by several workers. See the [module docs](self).
pub(crate) struct SharedConnection {
    endpoints: Endpoints,
    tls: TlsConfig,
    name: String,
    /// The connection and the task logging its events.
    current: Mutex<Option<(Arc<Connection>, JoinHandle<()>)>>,
}

impl Drop for SharedConnection {
    fn drop(&mut self) {
        if let Some((_, events)) = self.current.get_mut().take() {
            events.abort();
        }
    }
}

impl SharedConnection {
    pub(crate) fn new(endpoints: Endpoints, tls: TlsConfig, name: String) -> Self {
        SharedConnection {
            endpoints,
            tls,
            name,
            current: Mutex::new(None),
        }
    }

    /// The connection, connected now if there is none or it was lost.
    pub(crate) async fn get(&self) -> Result<Arc<Connection>, Error> {
        let mut current = self.current.lock().await;
        if let Some((conn, _)) = current.as_ref().filter(|(c, _)| c.status().connected()) {
            return Ok(conn.clone());
        }
        if let Some((_, events)) = current.take() {
            events.abort();
        }
        let (conn, url) = self
            .endpoints
            .connect_indexed(&self.name, &self.tls)
            .await?;
        let events = tokio::spawn(super::session::log_events(conn.events_listener(), url));
        let conn = Arc::new(conn);
        *current = Some((conn.clone(), events));
        Ok(conn)
    }

    /// Closes the connection (once every worker on it has stopped).
    pub(crate) async fn close(&self) {
        if let Some((conn, events)) = self.current.lock().await.take() {
            events.abort();
            if conn.status().connected() {
                if let Err(e) = conn.close(200, "bye".into()).await {
                    tracing::debug!(error = %e, "closing a shared connection");
                }
            }
        }
    }
}
