//! The worker processes of a run: spawned, killed, reaped when they die on their own,
//! replaced, and stopped at the end.

use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use idem_amqp::failpoints::{AFTER_COMMIT_BEFORE_ACK, AFTER_RETRY_PUBLISH_BEFORE_ACK};
use tokio::process::{Child, ChildStdin, Command};

use crate::args::ConsumeArgs;
use crate::common::{BoxError, Names, Store};

/// The crash points armed on workers 0, 1 and (with `--batch`) 2 (small
/// probabilities, `--*-failpoint-p`), each until it has fired `ABORTS_PER_FAILPOINT`
/// times (a re-spawned worker is re-armed until then).
pub(crate) const FAILPOINTS: [&str; 3] = [
    AFTER_COMMIT_BEFORE_ACK,
    AFTER_RETRY_PUBLISH_BEFORE_ACK,
    crate::worker::BETWEEN_SAVEPOINTS,
];
pub(crate) const ABORTS_PER_FAILPOINT: u32 = 1;

pub(crate) struct WorkerProc {
    pub(crate) slot: usize,
    pub(crate) name: String,
    pub(crate) child: Child,
    pub(crate) stdin: Option<ChildStdin>,
    pub(crate) armed: Option<&'static str>,
}

pub(crate) struct Fleet {
    pub(crate) exe: PathBuf,
    pub(crate) names: Names,
    pub(crate) store: Store,
    pub(crate) log_dir: PathBuf,
    pub(crate) procs: Vec<WorkerProc>,
    pub(crate) generation: u32,
    pub(crate) failpoints: bool,
    /// How the workers consume (their prefetch, batch, follow-ups, ordering and
    /// transient failures), passed to each one.
    pub(crate) consume: ConsumeArgs,
    /// Probability of each of [`FAILPOINTS`].
    pub(crate) failpoint_p: [f64; 3],
    /// Names of workers that died (SIGKILL, crash point, anything else).
    pub(crate) dead: HashSet<String>,
    pub(crate) aborts: HashMap<&'static str, u32>,
    pub(crate) kills: u32,
    pub(crate) unexpected: Vec<String>,
    /// On the cluster: worker `slot` prefers node `slot % nodes` (its AMQP URL first).
    pub(crate) cluster: bool,
}

impl Fleet {
    pub(crate) fn arm_for(&self, slot: usize) -> Option<(&'static str, String)> {
        if !self.failpoints {
            return None;
        }
        let point = *FAILPOINTS.get(slot)?;
        // The savepoint crash point is inside a batch handler only.
        if point == crate::worker::BETWEEN_SAVEPOINTS && self.consume.batch.is_none() {
            return None;
        }
        let fired = self.aborts.get(point).copied().unwrap_or(0);
        (fired < ABORTS_PER_FAILPOINT)
            .then(|| (point, format!("{point}={}", self.failpoint_p[slot])))
    }

    pub(crate) fn spawn(&mut self, slot: usize) -> Result<WorkerProc, BoxError> {
        self.generation += 1;
        let name = format!("{}{slot}g{}", self.names.worker_prefix(), self.generation);
        let log = std::fs::File::create(self.log_dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("worker")
            .args(["--run", &self.names.run, "--name", &name])
            .args(["--store", self.store.as_str()])
            .args(self.consume.worker_flags())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .env_remove(idem_amqp::failpoints::ENV)
            .kill_on_drop(true);
        if self.cluster {
            let urls = crate::common::amqp_urls();
            let first = slot % urls.len().max(1);
            let rotated: Vec<&str> = urls[first..]
                .iter()
                .chain(&urls[..first])
                .map(String::as_str)
                .collect();
            cmd.arg("--cluster")
                .env("AMQP_CLUSTER_URL", rotated.join(","));
        }
        let arm = self.arm_for(slot);
        if let Some((_, spec)) = &arm {
            cmd.env(idem_amqp::failpoints::ENV, spec);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start worker {}: {e}", self.exe.display()))?;
        Ok(WorkerProc {
            slot,
            name,
            stdin: child.stdin.take(),
            child,
            armed: arm.map(|(point, _)| point),
        })
    }

    /// SIGKILLs a random worker and starts its replacement.
    pub(crate) async fn kill_random(
        &mut self,
        rng: &mut fastrand::Rng,
    ) -> Result<String, BoxError> {
        if self.procs.is_empty() {
            return Err("no worker to kill".into());
        }
        let i = rng.usize(..self.procs.len());
        let mut victim = self.procs.swap_remove(i);
        victim.child.start_kill()?;
        let _ = victim.child.wait().await;
        self.kills += 1;
        self.dead.insert(victim.name.clone());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let replacement = self.spawn(victim.slot)?;
        self.procs.push(replacement);
        Ok(victim.name)
    }

    /// Notices workers that died on their own (crash points) and replaces them.
    pub(crate) fn reap(&mut self) -> Result<(), BoxError> {
        let mut i = 0;
        while i < self.procs.len() {
            let status = self.procs[i].child.try_wait()?;
            let Some(status) = status else {
                i += 1;
                continue;
            };
            let gone = self.procs.swap_remove(i);
            self.dead.insert(gone.name.clone());
            match (status.signal(), gone.armed) {
                (Some(6), Some(point)) => {
                    *self.aborts.entry(point).or_insert(0) += 1;
                    println!("chaos: worker {} aborted at crash point {point}", gone.name);
                }
                _ => {
                    let log = self.log_dir.join(format!("{}.log", gone.name));
                    let last = std::fs::read_to_string(&log)
                        .ok()
                        .and_then(|t| {
                            t.lines()
                                .rev()
                                .find(|l| !l.trim().is_empty())
                                .map(str::to_owned)
                        })
                        .unwrap_or_default();
                    println!(
                        "chaos: worker {} exited unexpectedly ({status}); log {}: {last}",
                        gone.name,
                        log.display()
                    );
                    self.unexpected.push(gone.name.clone());
                    if self.unexpected.len() > 10 {
                        return Err(
                            "more than 10 unexpected worker exits; see the worker logs".into()
                        );
                    }
                }
            }
            let replacement = self.spawn(gone.slot)?;
            self.procs.push(replacement);
        }
        Ok(())
    }

    /// Stops every worker gracefully (closes its stdin), SIGKILL after 20 s.
    pub(crate) async fn stop(&mut self) {
        for p in &mut self.procs {
            p.stdin = None;
        }
        for p in &mut self.procs {
            match tokio::time::timeout(Duration::from_secs(20), p.child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    println!("chaos: worker {} did not stop in 20 s; killing it", p.name);
                    let _ = p.child.kill().await;
                }
            }
        }
        self.procs.clear();
    }

    pub(crate) fn failpoint_aborts(&self) -> u32 {
        self.aborts.values().sum()
    }
}
