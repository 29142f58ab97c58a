//! The test clusters of `.ci/cluster`: a 3-node RabbitMQ cluster (AMQP on
//! 127.0.0.1:5701-5703) and a Redis Cluster (127.0.0.1:7001-7006).
//!
//! They are not default services, so the tests that need them start them on first use,
//! as the TLS tests do with `.ci/tls`. The clusters stay up afterwards for the next
//! test run; `bash .ci/cluster down` removes them.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Starts the test clusters unless they are up (`bash .ci/cluster up` is idempotent and
/// takes about 20 s from nothing). Runs the script once per test binary; panics with
/// the script's output when it fails.
pub fn ensure_up() {
    static UP: OnceLock<Result<(), String>> = OnceLock::new();
    let outcome = UP.get_or_init(|| {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.ci/cluster");
        let run = |arg: &str| Command::new("bash").arg(&script).arg(arg).output();
        if run("status").is_ok_and(|o| o.status.success()) {
            return Ok(());
        }
        // `up` repairs missing nodes; a cluster left in a state it cannot repair (e.g. a
        // Redis node that lost its cluster identity mid-failover) is rebuilt once from
        // nothing: it only ever holds test data.
        let mut why = String::new();
        for attempt in ["up", "rebuild"] {
            if attempt == "rebuild" {
                let _ = run("down");
            }
            match run("up") {
                Ok(o) if o.status.success() => return Ok(()),
                Ok(o) => why.push_str(&format!(
                    "{attempt}: {}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )),
                Err(e) => why.push_str(&format!("{attempt}: {e}\n")),
            }
        }
        Err(why)
    });
    if let Err(why) = outcome {
        panic!(
            "the test clusters could not be started by `bash .ci/cluster up` (README, \"Running on a cluster\"):\n{why}"
        );
    }
}
