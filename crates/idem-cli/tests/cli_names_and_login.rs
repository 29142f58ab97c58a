//! The real `idem` binary: which DLQ a name designates, and exit codes that tell a
//! refused login (4) from an unreachable broker (2). Needs the local RabbitMQ
//! (see the README section "Running the tests").

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{dead, exit_json, ids, text, Fixture};
use idem_core::ErrorKind::Transient;

/// The binary against `url`, in a terminal 100 characters wide.
fn idem_at(url: &str, args: &[&str]) -> std::process::Output {
    common::idem_at(url, 100, args)
}

#[tokio::test]
async fn dlq_commands_accept_the_dlq_name_and_suggest_one_when_nothing_matches() {
    let f = Fixture::new("bin-names").await;
    f.bury_each(&["a", "b"], "boom", Transient).await;
    let url = common::url();

    // The work queue and the DLQ's own name read the same queue.
    for name in [f.queue.clone(), f.dlq()] {
        let v = exit_json(&idem_at(&url, &["dlq", "list", &name, "--json"]), 0);
        assert_eq!(v.as_array().unwrap().len(), 2, "{name}");
        let v = exit_json(&idem_at(&url, &["dlq", "stats", &name, "--json"]), 0);
        assert_eq!(v["dlq"], f.dlq().as_str());
    }
    // A replay by the DLQ's name sends messages back to the work queue.
    let out = idem_at(&url, &["dlq", "replay", &f.dlq(), "--id", "a"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(ids(&f.drain(&f.queue, 1).await), ["a"]);

    // Neither NAME.dlq nor NAME exists: exit 1 with a suggestion.
    let stem = format!("idem-cli-test-nowhere-{}", uuid::Uuid::new_v4().simple());
    let out = idem_at(&url, &["dlq", "list", &format!("{stem}.dlq")]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("did you mean the work queue `{stem}`")),
        "{err}"
    );
    let out = idem_at(&url, &["dlq", "list", &stem]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("does not exist") && err.contains(&format!("idem topology declare {stem}")),
        "{err}"
    );
    f.cleanup().await;
}

#[tokio::test]
async fn wrong_password_exits_4_and_an_unused_port_exits_2() {
    // The broker must be up for the first half to mean anything.
    let conn = common::connect().await;
    let _ = conn.close(200, "bye".into()).await;
    // The test URL with its password replaced.
    let good = common::url();
    let (scheme, rest) = good.split_once("://").unwrap();
    let (userinfo, host) = rest.rsplit_once('@').expect("AMQP_URL with user:password@");
    let user = userinfo.split(':').next().unwrap();
    let wrong = format!("{scheme}://{user}:not-the-password-7f3a@{host}");
    // A vhost that does not exist is refused too (NOT_ALLOWED).
    let (base, _vhost) = good.rsplit_once('/').unwrap();
    let no_vhost = format!(
        "{base}/idem-no-such-vhost-{}",
        uuid::Uuid::new_v4().simple()
    );
    // A port nothing listens on: a listener is bound, its port read, then closed.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let unused = format!("amqp://guest:s3cret-9b1@127.0.0.1:{port}/%2f");
    // (URL, exit code, what stderr says, what it must not say).
    let cases: [(&str, i32, &str, &[&str]); 3] = [
        (
            &wrong,
            4,
            "refused the connection",
            &["is the broker running", "not-the-password-7f3a"],
        ),
        (&no_vhost, 4, "vhost", &[]),
        (&unused, 2, "is the broker running", &["s3cret-9b1"]),
    ];
    for (url, code, says, hides) in cases {
        let out = idem_at(url, &["dlq", "list", "q"]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{err}");
        assert!(err.contains(says), "{err}");
        assert!(!hides.iter().any(|h| err.contains(h)), "{err}");
    }
}

#[tokio::test]
async fn a_url_list_skips_a_dead_first_broker_and_an_all_dead_list_exits_2() {
    let f = Fixture::new("bin-endpoints").await;
    f.bury_all(&[dead("a", "boom", Transient)]).await;
    let dead_url = "amqp://guest:s3cret-4c2@127.0.0.1:1/%2f";
    let list = format!("{dead_url},{}", common::url());
    let v = exit_json(&idem_at(&list, &["dlq", "list", &f.queue, "--json"]), 0);
    assert_eq!(v.as_array().unwrap().len(), 1);

    let out = idem_at(
        &format!("{dead_url}, amqp://guest:s3cret-4c2@127.0.0.1:2/%2f"),
        &["dlq", "list", &f.queue],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("none of the 2 RabbitMQ endpoints"), "{err}");
    assert!(
        err.contains("127.0.0.1:1/") && err.contains("127.0.0.1:2/"),
        "{err}"
    );
    assert!(!err.contains("s3cret-4c2"), "{err}");
    f.cleanup().await;
}
