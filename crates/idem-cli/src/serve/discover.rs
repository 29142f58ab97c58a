//! `idem dlq serve` without `--queue`: the queues to serve, found through the RabbitMQ
//! management HTTP API.
//!
//! The console asks `GET /api/queues/{vhost}?columns=name` of the management API
//! (plain HTTP; by default on port 15672 of the first broker host of the AMQP URL,
//! with the AMQP URL's user and password and virtual host; `--management-url
//! http://host:port[/prefix]` says otherwise) and serves every queue whose name ends
//! in `.dlq`: as its work queue `Q` when `Q` exists too, else under the DLQ's own
//! name. The management plugin is off on many brokers; then the command stops with an
//! error telling the operator to name the queues with `--queue`. HTTPS management
//! endpoints are not supported (name the queues instead). Errors never show the
//! password.

use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::CliError;

/// The default port of the RabbitMQ management plugin.
pub const DEFAULT_MANAGEMENT_PORT: u16 = 15672;

const TIMEOUT: Duration = Duration::from_secs(5);

/// Where the management API is and how to log in (no password in its `Debug`).
#[derive(Clone)]
pub struct Management {
    host: String,
    port: u16,
    prefix: String,
    user: String,
    password: String,
    vhost: String,
}

impl std::fmt::Debug for Management {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Management")
            .field("endpoint", &self.endpoint())
            .field("user", &self.user)
            .field("vhost", &self.vhost)
            .finish()
    }
}

const HINT: &str = "name the queues to serve with --queue Q (repeatable)";

impl Management {
    /// The management API for the broker at `amqp_url` (the first of a
    /// comma-separated list): `management_url` when given (`http://host:port[/prefix]`,
    /// optionally with `user:password@`), else `http://<broker host>:15672`; the
    /// AMQP URL's credentials and virtual host unless the management URL has
    /// credentials.
    pub fn new(amqp_url: &str, management_url: Option<&str>) -> Result<Self, CliError> {
        let first = amqp_url.split(',').next().unwrap_or(amqp_url).trim();
        let uri: lapin::uri::AMQPUri = first.parse().map_err(|_| {
            CliError::Usage(format!(
                "cannot read the broker URL to find its management API; {HINT}"
            ))
        })?;
        let mut m = Management {
            host: uri.authority.host.clone(),
            port: DEFAULT_MANAGEMENT_PORT,
            prefix: String::new(),
            user: uri.authority.userinfo.username.clone(),
            password: uri.authority.userinfo.password.clone(),
            vhost: uri.vhost.clone(),
        };
        if let Some(url) = management_url {
            m.apply(url)?;
        }
        Ok(m)
    }

    fn apply(&mut self, url: &str) -> Result<(), CliError> {
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(CliError::Usage(format!(
                "--management-url must be an http:// URL (https is not supported); or {HINT}"
            )));
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host_port = match authority.rsplit_once('@') {
            Some((userinfo, host_port)) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                self.user = user.to_owned();
                self.password = password.to_owned();
                host_port
            }
            None => authority,
        };
        let port_of = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| CliError::Usage(format!("--management-url: bad port {p:?}")))
        };
        let (host, port) = if let Some(rest) = host_port.strip_prefix('[') {
            let Some((h, after)) = rest.split_once(']') else {
                return Err(CliError::Usage("--management-url: unclosed [".to_owned()));
            };
            match after.strip_prefix(':') {
                Some(p) => (h, port_of(p)?),
                None => (h, DEFAULT_MANAGEMENT_PORT),
            }
        } else {
            match host_port.rsplit_once(':') {
                Some((h, p)) => (h, port_of(p)?),
                None => (host_port, DEFAULT_MANAGEMENT_PORT),
            }
        };
        if host.is_empty() {
            return Err(CliError::Usage("--management-url has no host".to_owned()));
        }
        self.host = host.to_owned();
        self.port = port;
        self.prefix = path.trim_end_matches('/').to_owned();
        if !self.prefix.is_empty() {
            self.prefix.insert(0, '/');
        }
        Ok(())
    }

    /// `http://host:port[/prefix]`, without credentials.
    pub fn endpoint(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("http://{host}:{}{}", self.port, self.prefix)
    }

    /// The names of the queues of the virtual host.
    pub async fn queue_names(&self) -> Result<Vec<String>, CliError> {
        let endpoint = self.endpoint();
        let unreachable = |why: String| {
            CliError::Unreachable(format!(
                "cannot list queues through the RabbitMQ management API at {endpoint}: {why}; {HINT}"
            ))
        };
        let path = format!(
            "{}/api/queues/{}?columns=name",
            self.prefix,
            percent_encode(&self.vhost)
        );
        let credentials = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.user, self.password));
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {}:{}\r\nAuthorization: Basic {credentials}\r\nAccept: application/json\r\n\r\n",
            self.host, self.port
        );
        let exchange = async {
            let mut stream =
                tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
            stream.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = match tokio::time::timeout(TIMEOUT, exchange).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Err(_) => {
                return Err(unreachable(format!(
                    "no answer within {}s",
                    TIMEOUT.as_secs()
                )))
            }
        };
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        match status {
            200 => {}
            401 | 403 => {
                return Err(unreachable(format!(
                    "HTTP {status}: the user {:?} may not list queues there (a management tag is needed)",
                    self.user
                )))
            }
            0 => return Err(unreachable("not an HTTP answer".to_owned())),
            s => return Err(unreachable(format!("HTTP {s}"))),
        }
        #[derive(Deserialize)]
        struct Named {
            name: String,
        }
        let queues: Vec<Named> = serde_json::from_str(body)
            .map_err(|e| unreachable(format!("unexpected answer ({e})")))?;
        Ok(queues.into_iter().map(|q| q.name).collect())
    }
}

/// The queues to serve among `names` (every queue of a virtual host): each `X.dlq`,
/// as `X` when `X` is among them too, else as `X.dlq`; sorted.
pub fn queues_to_serve(names: &[String]) -> Vec<String> {
    let mut out: Vec<String> = names
        .iter()
        .filter_map(|n| {
            let work = n.strip_suffix(".dlq")?;
            Some(if names.iter().any(|m| m == work) {
                work.to_owned()
            } else {
                n.clone()
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Finds the queues to serve through the management API (module docs). None found is
/// [`CliError::NotFound`].
pub async fn discover(m: &Management) -> Result<Vec<String>, CliError> {
    let names = m.queue_names().await?;
    let queues = queues_to_serve(&names);
    if queues.is_empty() {
        return Err(CliError::NotFound(format!(
            "no dead-letter queue (a name ending in .dlq) in virtual host {:?} according to {}; {HINT}",
            m.vhost,
            m.endpoint()
        )));
    }
    Ok(queues)
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dlq_is_served_under_its_work_queue_when_there_is_one() {
        let names: Vec<String> = [
            "orders",
            "orders.dlq",
            "orphan.dlq",
            "billing",
            "orders.retry.1s",
        ]
        .map(str::to_owned)
        .to_vec();
        assert_eq!(queues_to_serve(&names), ["orders", "orphan.dlq"]);
        assert!(queues_to_serve(&["a".to_owned()]).is_empty());
    }

    #[test]
    fn the_endpoint_comes_from_the_broker_url_or_the_flag_and_hides_the_password() {
        let m = Management::new("amqp://app:s3cret@rabbit.internal:5672/prod", None).unwrap();
        assert_eq!(m.endpoint(), "http://rabbit.internal:15672");
        assert_eq!((m.user.as_str(), m.vhost.as_str()), ("app", "prod"));
        assert!(!format!("{m:?}").contains("s3cret"));
        let m = Management::new(
            "amqp://app:s3cret@a:5672/%2f,amqp://b:5672",
            Some("http://ops:pw@mgmt:8080/rabbit/"),
        )
        .unwrap();
        assert_eq!(m.endpoint(), "http://mgmt:8080/rabbit");
        assert_eq!((m.user.as_str(), m.password.as_str()), ("ops", "pw"));
        assert_eq!(percent_encode(&m.vhost), "%2F");
        assert!(Management::new("amqp://a", Some("https://mgmt")).is_err());
        let m = Management::new("amqp://a", Some("http://[::1]:9999")).unwrap();
        assert_eq!(m.endpoint(), "http://[::1]:9999");
    }
}
