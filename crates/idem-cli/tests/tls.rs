//! The `idem` binary over TLS: `--tls-ca`/`--tls-cert`/`--tls-key` (and their
//! environment variables) for amqps:// and PostgreSQL, and exit code 6 for a TLS
//! failure, distinct from an unreachable host (2). Uses the listeners of `.ci/tls`
//! (started on first use; `bash .ci/tls down` removes them).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

const AMQPS: &str = "amqps://guest:guest@localhost:5681/%2f";
const PG: &str = "postgres://postgres@localhost:5442/postgres?sslmode=verify-full";

fn tls_dir() -> PathBuf {
    std::env::var_os("IDEM_TLS_DIR").map_or_else(|| PathBuf::from("/tmp/idem-tls"), PathBuf::from)
}

fn cert(name: &str) -> String {
    tls_dir().join("certs").join(name).display().to_string()
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    )
    .is_ok()
}

fn services() {
    static UP: OnceLock<Result<(), String>> = OnceLock::new();
    let result = UP.get_or_init(|| {
        if [5681, 6390, 6391, 5442].into_iter().all(port_open)
            && tls_dir().join("certs/expired.pem").exists()
        {
            return Ok(());
        }
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.ci/tls");
        let out = Command::new("bash")
            .arg(&script)
            .arg("up")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = result {
        panic!("the TLS test listeners are not up ({e}); start them with `bash .ci/tls up` (README, section TLS)");
    }
}

fn idem(args: &[&str], env: &[(&str, String)]) -> Output {
    services();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_idem"));
    cmd.args(args)
        .env_remove("AMQP_URL")
        .env_remove("DATABASE_URL")
        .env_remove("IDEM_TLS_CA")
        .env_remove("IDEM_TLS_CERT")
        .env_remove("IDEM_TLS_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run the idem binary")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn client(ca: &str) -> Vec<String> {
    vec![
        "--tls-ca".into(),
        cert(ca),
        "--tls-cert".into(),
        cert("client.pem"),
        "--tls-key".into(),
        cert("client.key"),
    ]
}

fn run(base: &[&str], tls: &[String]) -> Output {
    let mut args: Vec<&str> = base.to_vec();
    args.extend(tls.iter().map(String::as_str));
    idem(&args, &[])
}

#[test]
fn amqps_with_flags_and_env_and_tls_failures_exit_6() {
    let queue = format!("idem-tls-cli-{}", uuid::Uuid::new_v4().simple());
    let url = |u: &str| format!("--url={u}");
    let good = client("ca.pem");

    // Flags: declare, then show the topology over TLS.
    let out = run(
        &["topology", "declare", &queue, &url(AMQPS), "--tiers", "1s"],
        &good,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The environment variables work the same.
    let out = idem(
        &["topology", "show", &queue, &url(AMQPS), "--tiers", "1s"],
        &[
            ("IDEM_TLS_CA", cert("ca.pem")),
            ("IDEM_TLS_CERT", cert("client.pem")),
            ("IDEM_TLS_KEY", cert("client.key")),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let secret = "amqps://guest:s3cr3tpw@localhost:5681/%2f";
    let cases = [
        (
            run(
                &["topology", "show", &queue, &url(secret)],
                &client("other-ca.pem"),
            ),
            "unknown CA",
        ),
        (
            run(&["topology", "show", &queue, &url(secret)], &[]),
            "unknown CA",
        ),
        (
            run(
                &[
                    "topology",
                    "show",
                    &queue,
                    &url("amqps://guest:s3cr3tpw@127.0.0.1:5681/%2f"),
                ],
                &good,
            ),
            "not valid for this host name",
        ),
        (
            run(
                &[
                    "topology",
                    "show",
                    &queue,
                    &url(secret),
                    "--tls-ca",
                    &cert("ca.pem"),
                ],
                &[],
            ),
            // TLS 1.3: the server's alert or the reset that follows it.
            "client certificate refused",
        ),
    ];
    for (out, want) in &cases {
        let err = stderr(out);
        assert_eq!(out.status.code(), Some(6), "{err}");
        assert!(
            err.contains(want)
                || *want == "client certificate refused"
                    && err.contains("connection closed during the TLS handshake"),
            "{err}"
        );
        assert!(!err.contains("s3cr3tpw"), "{err}");
    }

    // A refused login over a good TLS connection is not a TLS failure either.
    let out = run(&["topology", "show", &queue, &url(secret)], &good);
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(6), "{err}");
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        !err.contains("s3cr3tpw") && !err.contains("TLS handshake"),
        "{err}"
    );

    // Unreachable is not a TLS failure.
    let out = run(
        &[
            "topology",
            "show",
            &queue,
            &url("amqps://guest:guest@localhost:1/%2f"),
        ],
        &good,
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // A bad TLS file is named, and is a TLS error too.
    let out = run(
        &[
            "topology",
            "show",
            &queue,
            &url(AMQPS),
            "--tls-ca",
            &cert("client.key"),
        ],
        &[],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(
        err.contains("client.key") && !err.contains("PRIVATE KEY-----\n"),
        "{err}"
    );
    // Verification cannot be turned off for RabbitMQ.
    let mut insecure = good.clone();
    insecure.push("--tls-danger-accept-invalid-certs".into());
    let out = run(&["topology", "show", &queue, &url(AMQPS)], &insecure);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot be turned off"),
        "{}",
        stderr(&out)
    );

    // Clean up the queues through the TLS listener.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let tls = idem_core::TlsConfig::from_files(
            Some(cert("ca.pem").as_ref()),
            Some(cert("client.pem").as_ref()),
            Some(cert("client.key").as_ref()),
        )
        .unwrap();
        let conn = idem_amqp::connect_tls(AMQPS, "idem-tls-cli-cleanup", &tls)
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let topo = idem_amqp::Topology::new(queue.as_str())
            .tiers(idem_amqp::DelayTiers::new([Duration::from_secs(1)]).unwrap());
        topo.delete_on(&ch).await.unwrap();
        let _ = conn.close(200, "bye".into()).await;
    });
}

#[test]
fn postgres_tls_with_flags_and_tls_failures_exit_6() {
    let table = format!("idem_tls_missing_{}", uuid::Uuid::new_v4().simple());
    let db = format!("--database-url={PG}");
    let by_ip = format!("--database-url={}", PG.replace("localhost", "127.0.0.1"));
    let no_client_cert = vec!["--tls-ca".to_owned(), cert("ca.pem")];
    // Connected and verified: the table is simply missing (exit 1, not 2 or 6); then
    // the TLS failures (exit 6).
    let cases = [
        (&db, client("ca.pem"), 1, "does not exist"),
        (&db, client("other-ca.pem"), 6, "unknown CA"),
        (&by_ip, client("ca.pem"), 6, "host name"),
        (&db, no_client_cert, 6, "client certificate refused"),
    ];
    for (url, tls, code, want) in &cases {
        let out = run(&["outbox", "status", url, "--table", &table], tls);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(*code), "{err}");
        assert!(err.contains(want), "{err}");
    }
}
