//! A bare HTTP/1.1 `GET` over TCP, for the tests of the metrics and readiness
//! listeners (no HTTP client in the test kit's dependencies).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The whole answer (status line, headers and body) to `GET path` at `addr`, or
/// `None` while nothing listens there (connection refused). Panics on any other
/// error.
pub async fn try_get_raw(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return None,
        Err(e) => panic!("connecting to the listener at {addr}: {e}"),
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    Some(out)
}

/// The whole answer to `GET path` at `addr`; panics if nothing listens there.
pub async fn get_raw(addr: SocketAddr, path: &str) -> String {
    try_get_raw(addr, path)
        .await
        .unwrap_or_else(|| panic!("nothing listens at {addr}"))
}

/// The status code and the body of the answer to `GET path` at `addr`, or `None`
/// while nothing listens there. Panics if the answer is not HTTP.
pub async fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let out = try_get_raw(addr, path).await?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {out}"));
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_owned()))
}

/// The status code and the body of the answer to `GET path` at `addr`; panics if
/// nothing listens there or the answer is not HTTP.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_get(addr, path)
        .await
        .unwrap_or_else(|| panic!("nothing listens at {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_the_status_and_the_body_and_none_where_nothing_listens() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = [0u8; 256];
            let n = s.read(&mut req).await.unwrap();
            assert!(req[..n].starts_with(b"GET /ready HTTP/1.1\r\n"));
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}")
                .await
                .unwrap();
        });
        assert_eq!(get(addr, "/ready").await, (503, "{}".to_owned()));
        server.await.unwrap();
        assert_eq!(try_get(addr, "/ready").await, None, "the listener is gone");
    }
}
