//! `idem dlq serve` without `--queue` finds the queues through the RabbitMQ management
//! API; where that API cannot be reached (the plugin is off, or something else
//! answers), the command stops with exit 2 and tells the operator to pass `--queue`,
//! without showing the password. Real RabbitMQ (the console needs a broker
//! connection first). Discovery against a live management API is not tested here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{idem, text};

#[tokio::test]
async fn without_queue_and_without_a_management_api_serve_asks_for_queue() {
    // The broker must be there: the failure below is the management API's.
    let conn = common::connect().await;
    let _ = conn.close(200, "bye".into()).await;
    let unused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let refused = format!("http://127.0.0.1:{unused}");
    // Nothing listening; then a port that answers, but not in HTTP (the AMQP port).
    let amqp_port = common::url()
        .parse::<lapin::uri::AMQPUri>()
        .unwrap()
        .authority
        .port;
    for endpoint in [refused, format!("http://127.0.0.1:{amqp_port}")] {
        let out = idem(&[
            "dlq",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--management-url",
            &endpoint,
        ]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{endpoint}: {err}");
        assert!(
            err.contains("management API") && err.contains("--queue"),
            "{endpoint}: {err}"
        );
        assert!(!err.contains("guest:guest"), "{err}");
        assert!(text(&out.stdout).is_empty(), "nothing served");
    }
    // --queue and --management-url exclude each other.
    let out = idem(&[
        "dlq",
        "serve",
        "--queue",
        "q",
        "--management-url",
        "http://127.0.0.1:1",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
}
