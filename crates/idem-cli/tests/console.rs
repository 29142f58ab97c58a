//! The dead-letter console against the real RabbitMQ: the JSON API end to end (reads,
//! replay with and without the token) and the page in a real browser (headless
//! Chromium, Debian package `chromium`): groups and a body rendered, a `<script>` body
//! shown as text and never run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;

use common::{dead, ids, Fixture};
use idem_cli::serve::{router, ConsoleConfig};
use idem_core::ErrorKind::{Permanent, Transient};
use idem_core::Message;

const TOKEN: &str = "test-token-0123456789abcdef";
const HOSTILE: &str = r#"<script>document.title='PWNED'</script><img src=x onerror="document.body.dataset.pwned='yes'">"#;

/// One HTTP/1.1 request; returns the status and the body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    // Chunked bodies: keep the JSON between the first '[' or '{' and the last ']' or '}'.
    let start = body.find(['{', '[']).unwrap_or(0);
    let end = body.rfind(['}', ']']).map_or(body.len(), |e| e + 1);
    (status, body[start..end].to_owned())
}

/// [`http`] on a blocking thread.
async fn send(
    addr: SocketAddr,
    method: &'static str,
    path: String,
    token: Option<&'static str>,
    body: &'static str,
) -> (u16, String) {
    tokio::task::spawn_blocking(move || http(addr, method, &path, token, body))
        .await
        .unwrap()
}

/// The body of a GET of `path` without a token, asserting status 200.
async fn get_ok(addr: SocketAddr, path: String) -> String {
    let (code, body) = send(addr, "GET", path, None, "").await;
    assert_eq!(code, 200, "{body}");
    body
}

async fn start(f: &Fixture, writes: bool) -> SocketAddr {
    let conn = common::connect().await;
    let config = ConsoleConfig {
        queues: vec![f.queue.clone()],
        write_token: writes.then(|| TOKEN.to_owned()),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(conn, config)).await });
    addr
}

async fn bury_some(f: &Fixture) {
    let mut hostile = Message::new(HOSTILE).with_message_id("hostile");
    hostile.headers.insert(
        idem_core::outcome::headers::ERROR.into(),
        "rendering failed".into(),
    );
    f.publish_raw("", &f.dlq(), hostile).await;
    f.bury_all(&[
        dead("t1", "gateway timeout after 30 s", Transient),
        dead("v1", "ValidationError: cents must be positive", Permanent),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_reads_without_changing_and_writes_only_with_the_token() {
    let f = Fixture::new("api").await;
    bury_some(&f).await;
    let ro = start(&f, false).await;
    let rw = start(&f, true).await;
    let q = f.queue.clone();

    let body = get_ok(ro, "/api/queues".to_owned()).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["queues"][0]["depth"], 3);
    assert!(!body.contains("guest"), "no credentials in the API: {body}");

    let body = get_ok(ro, format!("/api/queues/{q}/groups")).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["groups"].as_array().unwrap().len(), 3);

    let body = get_ok(ro, format!("/api/queues/{q}/messages?id=hostile")).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[0]["body"]["text"], HOSTILE);

    let (code, _) = send(ro, "GET", "/api/queues/not-served/groups".into(), None, "").await;
    assert_eq!(code, 404);

    // Writes: refused read-only, without a token, with a wrong one.
    let replay = format!("/api/queues/{q}/replay");
    let req = r#"{"ids":["t1"]}"#;
    for (addr, token, want) in [
        (ro, Some(TOKEN), 403),
        (rw, None, 401),
        (rw, Some("wrong-token-0123456789"), 403),
    ] {
        let (code, body) = send(addr, "POST", replay.clone(), token, req).await;
        assert_eq!(code, want, "{body}");
    }
    assert_eq!(
        f.depth(&f.queue).await,
        0,
        "a refused write changes nothing"
    );
    let (code, body) = send(rw, "POST", replay, Some(TOKEN), req).await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["done"], 1);
    assert_eq!(ids(&f.drain(&f.queue, 1).await), ["t1"]);
    assert_eq!(ids(&f.drain(&f.dlq(), 2).await), ["hostile", "v1"]);
    f.cleanup().await;
}

fn chromium() -> String {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c.to_owned();
        }
    }
    panic!("headless Chromium is needed for this test: install the Debian package `chromium` (apt-get install -y chromium; .ci/run does it when missing)");
}

fn browse(addr: SocketAddr, q: &str, what: &str, out: Option<&std::path::Path>) -> String {
    let profile = std::env::temp_dir().join(format!("idem-chromium-{}", uuid::Uuid::new_v4()));
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--virtual-time-budget=10000",
        "--window-size=1400,900",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    if let Some(path) = out {
        cmd.arg(format!("--screenshot={}", path.display()));
    } else {
        cmd.arg(what);
    }
    let o = cmd
        .arg(format!("http://{addr}/?queue={q}"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        o.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_renders_groups_and_a_body_as_text_in_a_real_browser() {
    let f = Fixture::new("page").await;
    bury_some(&f).await;
    let addr = start(&f, false).await;
    let stats = idem_cli::dlq::stats(&f.conn, &f.queue, None).await.unwrap();
    let q = f.queue.clone();
    let dom = tokio::task::spawn_blocking(move || browse(addr, &q, "--dump-dom", None))
        .await
        .unwrap();
    for g in &stats.groups {
        assert!(dom.contains(&g.id), "group {} not rendered:\n{dom}", g.id);
    }
    // The first message's body, shown as text: its markup escaped, never run.
    assert!(
        dom.contains("&lt;script&gt;document.title='PWNED'&lt;/script&gt;"),
        "body not rendered as text:\n{dom}"
    );
    assert!(!dom.contains("data-pwned"), "the body's markup ran:\n{dom}");
    assert!(
        !dom.contains("<title>PWNED"),
        "the body's script ran:\n{dom}"
    );
    assert!(dom.contains("read-only"), "{dom}");

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dlq-console.png");
    let q = f.queue.clone();
    let path = shot.clone();
    tokio::task::spawn_blocking(move || browse(addr, &q, "", Some(&path)))
        .await
        .unwrap();
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG"),
        "no screenshot at {}",
        shot.display()
    );
    // Every message is still there, in order.
    assert_eq!(ids(&f.drain(&f.dlq(), 3).await), ["hostile", "t1", "v1"]);
    f.cleanup().await;
}
