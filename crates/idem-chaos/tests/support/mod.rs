//! Shared by the chaos tests: runs the chaos binary and reads its report lines; for
//! the restart tests, makes sure the restarted service is running again when a test
//! ends, pass or fail.

// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

/// The restart log: `IDEM_RESTART_LOG`, or `idem-restarts.log` in the temp dir.
/// The chaos binary appends a line before and after each restart, so that other
/// tests failing on the same services at that moment can be matched to it.
pub(crate) fn restart_log() -> PathBuf {
    std::env::var_os("IDEM_RESTART_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("idem-restarts.log"))
}

/// What a run printed.
pub(crate) struct Run {
    pub(crate) status: ExitStatus,
    /// Every `chaos:` line of stdout.
    pub(crate) lines: Vec<String>,
    /// The last line of stdout, whatever it is (the summary when the run finished).
    pub(crate) last: String,
    /// stdout and stderr, for failure messages.
    pub(crate) report: String,
}

impl Run {
    /// Field `key` (an integer) of the first line that starts with `prefix` and has
    /// it; panics with the report if there is none.
    pub(crate) fn get(&self, prefix: &str, key: &str) -> i64 {
        self.lines
            .iter()
            .filter(|l| l.starts_with(prefix))
            .flat_map(|l| l.split_whitespace())
            .filter_map(|f| f.split_once('='))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no line starting with {prefix:?} has {key}=<integer>\n{}",
                    self.report
                )
            })
    }
}

impl Run {
    /// Panics with the report unless the run exited 0 and its summary line says that
    /// all `total` messages were confirmed, none was lost or applied twice, only
    /// poison was dead-lettered, and each confirmed valid message had one effect.
    pub(crate) fn assert_exactly_once(&self, total: i64) {
        let report = &self.report;
        assert!(
            self.status.success(),
            "idem-chaos failed ({}); if a service is down, stderr says how to start it\n{report}",
            self.status
        );
        let last = "chaos: published=";
        assert_eq!(self.get(last, "confirmed"), total, "{report}");
        assert_eq!(self.get(last, "lost"), 0, "{report}");
        assert_eq!(self.get(last, "duplicates"), 0, "{report}");
        assert_eq!(
            self.get(last, "dead_lettered"),
            self.get(last, "poison"),
            "a valid message was dead-lettered\n{report}"
        );
        assert_eq!(
            self.get(last, "effects"),
            self.get(last, "confirmed") - self.get(last, "poison"),
            "one effect per confirmed valid message\n{report}"
        );
    }
}

impl Run {
    /// Panics with the report unless the run injected `fault` (`broker-restart`,
    /// `redis-restart`) once, no worker process exited on its own or was killed, and
    /// the workers applied effects after the service came back.
    pub(crate) fn assert_one_restart_kept_the_workers(&self, fault: &str) {
        let report = &self.report;
        let (injected, last) = ("chaos: faults injected:", "chaos: published=");
        assert_eq!(self.get(injected, fault), 1, "{report}");
        assert_eq!(self.get(injected, "unexpected-worker-exits"), 0, "{report}");
        assert_eq!(self.get(last, "kills"), 0, "{report}");
        let back = format!("chaos: back after {fault}:");
        assert!(
            self.get(&back, "effects") < self.get(last, "effects"),
            "the workers applied effects after the restart\n{report}"
        );
    }

    /// Field `key` of the summary line (`chaos: published=...`).
    pub(crate) fn total(&self, key: &str) -> i64 {
        self.get("chaos: published=", key)
    }

    /// [`Run::assert_exactly_once`], and the run included poison and made `kills`
    /// SIGKILLs.
    pub(crate) fn assert_exactly_once_with_poison(&self, total: i64, kills: i64) {
        self.assert_exactly_once(total);
        let report = &self.report;
        assert!(
            self.total("poison") > 0,
            "the run must include poison\n{report}"
        );
        assert_eq!(self.total("kills"), kills, "{report}");
    }
}

/// How many messages a restart run publishes.
pub(crate) const RESTART_MESSAGES: i64 = 2000;

/// Runs the chaos binary for one restart of a service: [`RESTART_MESSAGES`] messages
/// published at 100 a second to worker processes on `store`, no kill, one round of
/// `fault`, up to 60 s to drain, and the arguments `extra` on top.
pub(crate) fn run_restart(store: &str, fault: &str, extra: &[&str]) -> Run {
    let messages = RESTART_MESSAGES.to_string();
    let mut args = vec![
        "--messages",
        &messages,
        "--store",
        store,
        "--kills",
        "0",
        "--faults",
        fault,
        "--rounds",
        "1",
        "--publish-rate",
        "100",
        "--drain-timeout",
        "60",
    ];
    args.extend_from_slice(extra);
    run_chaos(&args)
}

/// Runs the chaos binary with `args`, prints its `chaos:` lines (shown with
/// `--nocapture`, and on failure) and returns them.
pub(crate) fn run_chaos(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_idem-chaos"))
        .args(args)
        .env("IDEM_RESTART_LOG", restart_log())
        .output()
        .expect("run idem-chaos");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<String> = stdout
        .lines()
        .filter(|l| l.starts_with("chaos:"))
        .map(str::to_owned)
        .collect();
    for line in &lines {
        println!("{line}");
    }
    Run {
        status: out.status,
        lines,
        last: stdout.lines().last().unwrap_or_default().to_owned(),
        report: format!("--- stdout\n{stdout}\n--- stderr\n{stderr}"),
    }
}

/// [`run_chaos`] as the status, the last line of stdout and the report for failure
/// messages.
pub(crate) fn run(args: &[&str]) -> (ExitStatus, String, String) {
    let run = run_chaos(args);
    (run.status, run.last, run.report)
}

/// The integer `key=value` fields of a `chaos:` summary line.
pub(crate) fn fields(line: &str) -> HashMap<&str, i64> {
    line.trim_start_matches("chaos:")
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect()
}

fn listening(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

fn wait_listening(port: u16, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if listening(port) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    listening(port)
}

fn note(line: &str) {
    use std::io::Write;
    let now = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(restart_log())
    {
        let _ = writeln!(f, "{now} {line}");
    }
}

/// The service a test restarts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Service {
    /// RabbitMQ on 127.0.0.1:5672, restarted with `rabbitmqctl stop_app; start_app`.
    RabbitMq,
    /// Redis on 127.0.0.1:6379, restarted without saving.
    Redis,
}

/// Restarts the service in `Drop` if it is not listening, so a test that fails (or a
/// chaos run that dies) between the stop and the start never leaves it down for the
/// tests that follow: `rabbitmqctl start_app` for RabbitMQ, the machine's start
/// command (`.ci/services`) for Redis.
pub(crate) struct KeepRunning(pub(crate) Service);

impl Drop for KeepRunning {
    fn drop(&mut self) {
        let (port, name) = match self.0 {
            Service::RabbitMq => (5672, "rabbitmq"),
            Service::Redis => (6379, "redis"),
        };
        // A restart just finished: give the listener a moment before deciding.
        if wait_listening(port, Duration::from_secs(10)) {
            return;
        }
        eprintln!("{name} is not listening on 127.0.0.1:{port} after the test; starting it");
        note(&format!("restarting {name} (idem-chaos test guard)"));
        if let Service::RabbitMq = self.0 {
            let _ = Command::new("rabbitmqctl")
                .args(["-q", "start_app"])
                .status();
        }
        if !wait_listening(port, Duration::from_secs(30)) {
            let services = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.ci/services");
            let _ = Command::new("bash").arg(services).status();
        }
        if wait_listening(port, Duration::from_secs(30)) {
            note("back up");
        } else {
            eprintln!("{name} is still down: start it with `bash .ci/services`");
        }
    }
}
