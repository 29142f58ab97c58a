//! The controller: sets up a run, starts the worker processes, publishes, injects
//! faults, waits for the queues to drain, then checks every message.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_amqp::failpoints::{AFTER_COMMIT_BEFORE_ACK, AFTER_RETRY_PUBLISH_BEFORE_ACK};
use idem_core::WorkerHandle;
use idem_outbox::{Outbox, Relay};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::args::{Fault, RunArgs};
use crate::common::{self, BoxError, Names, Store};
use crate::faults;
use crate::fleet::Fleet;
use crate::produce::{produce, replay_completed, Published};
use crate::setup::{cleanup, create_tables, undrained, Admin};
use crate::verify::{verify, FollowUps};
/// What happens at a point of the run's progress.
#[derive(Clone, Copy, Debug)]
enum Event {
    Kill,
    Fault(Fault),
}

pub(crate) async fn run(mut args: RunArgs) -> Result<bool, BoxError> {
    if args.consume.ordered && args.keys == 0 {
        return Err("--ordered needs --keys".into());
    }
    if args.keys > 0 && args.outbox {
        return Err("--keys cannot be combined with --outbox (the relay's batches are not published in key order)".into());
    }
    if args.keys > 0 {
        args.messages = args.keys.saturating_mul(args.per_key.max(1));
    }
    let started = Instant::now();
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let names = Names::new(&run_id);
    if args.cluster {
        common::use_cluster()?;
    }
    let faults: Vec<Fault> = args.faults.clone().unwrap_or_else(|| {
        let mut f = vec![Fault::ConnClose, Fault::PgTerminate, Fault::Failpoints];
        if args.cluster {
            f.extend([Fault::RabbitNodeKill, Fault::RedisMasterKill]);
        } else if args.store == Store::Redis {
            f.push(Fault::RedisKill);
        }
        f
    });
    if args.consume.follow_ups && args.store != Store::Postgres {
        return Err("--follow-ups needs --store postgres: the consumer outbox writes through the inbox transaction".into());
    }
    let single_node_only = [Fault::RedisKill, Fault::RedisRestart, Fault::BrokerRestart];
    let node_kills = [Fault::RabbitNodeKill, Fault::RedisMasterKill];
    if let Some(f) = faults.iter().find(|f| {
        (args.cluster && single_node_only.contains(f)) || (!args.cluster && node_kills.contains(f))
    }) {
        return Err(format!(
            "--faults {} needs {}",
            f.name(),
            if args.cluster {
                "single nodes (drop --cluster)"
            } else {
                "--cluster"
            }
        )
        .into());
    }
    let needs_redis = !args.cluster
        && (args.store == Store::Redis
            || faults.contains(&Fault::RedisKill)
            || faults.contains(&Fault::RedisRestart));
    let log_dir = std::env::temp_dir().join(format!("idem-chaos-{run_id}"));
    std::fs::create_dir_all(&log_dir)?;
    println!(
        "chaos: run={run_id} store={}{} messages={} workers={} kills={} faults={} seed={seed} logs={}",
        args.store.as_str(),
        if args.cluster { " cluster" } else { "" },
        args.messages,
        args.workers,
        args.kills,
        faults.iter().map(|f| f.name()).collect::<Vec<_>>().join(","),
        log_dir.display()
    );

    let db = common::database_url();
    let mut admin = Admin {
        pg: common::pg_pool(&db, &format!("idem-chaos-admin-{run_id}"), 4).await?,
        amqp: None,
        redis: None,
        name: format!("idem-chaos-admin-{run_id}"),
    };
    if needs_redis {
        admin.redis = Some(common::redis_conn(&common::redis_url()).await?);
    }
    create_tables(&admin.pg, &names, args.outbox).await?;
    let topology = common::topology_for(&names.queue(), args.consume.ordered);
    {
        let ch = admin.channel().await?;
        topology.declare_on(&ch).await?;
    }

    let outcome = drive(&args, &names, &faults, &mut admin, &mut rng, &log_dir).await;
    let (fleet, fired, drained, windows) = match outcome {
        Ok(v) => v,
        Err(e) => {
            if !args.keep {
                let _ = cleanup(&mut admin, &names).await;
            }
            return Err(e);
        }
    };
    let totals = verify(
        &mut admin,
        &names,
        &fleet,
        args.store,
        &windows,
        args.consume.follow_ups,
        args.keys,
    )
    .await;
    let totals = match totals {
        Ok(t) => t,
        Err(e) => {
            if !args.keep {
                let _ = cleanup(&mut admin, &names).await;
            }
            return Err(e);
        }
    };
    let fault_count: u32 = fired.values().sum::<u32>() + fleet.failpoint_aborts();
    let node_kills: u32 = fired
        .iter()
        .filter(|(f, _)| f.kills_a_node())
        .map(|(_, n)| n)
        .sum();
    let ok = drained
        && totals.verdict.lost == 0
        && totals.verdict.duplicates == 0
        && totals.verdict.dead_lettered == totals.poison
        && totals.verdict.dlq_foreign == 0
        && totals.verdict.poison_applied == 0
        && (!args.consume.ordered || totals.reordered == Some(0))
        && totals.follow_ups.as_ref().is_none_or(FollowUps::exact);
    if args.keep {
        println!(
            "chaos: kept tables chaos_*_{run_id}, queues {}*, logs in {}",
            names.queue(),
            log_dir.display()
        );
    } else {
        cleanup(&mut admin, &names).await?;
        if ok {
            let _ = std::fs::remove_dir_all(&log_dir);
        }
    }
    let mut fired_list: Vec<String> = fired
        .iter()
        .map(|(f, n)| format!("{}={n}", f.name()))
        .collect();
    fired_list.sort();
    println!(
        "chaos: faults injected: {} failpoint-aborts={} (after-commit-before-ack={}, after-retry-publish-before-ack={}, {}={}) unexpected-worker-exits={}",
        fired_list.join(" "),
        fleet.failpoint_aborts(),
        fleet.aborts.get(AFTER_COMMIT_BEFORE_ACK).copied().unwrap_or(0),
        fleet.aborts.get(AFTER_RETRY_PUBLISH_BEFORE_ACK).copied().unwrap_or(0),
        crate::worker::BETWEEN_SAVEPOINTS,
        fleet.aborts.get(crate::worker::BETWEEN_SAVEPOINTS).copied().unwrap_or(0),
        fleet.unexpected.len(),
    );
    println!(
        "chaos: drained={drained} dlq_copies={} dlq_foreign={} poison_applied={} unconfirmed_effects={} reruns_after_crash={} reruns_after_durability_fault={} elapsed={:.1}s",
        totals.dlq_copies,
        totals.verdict.dlq_foreign,
        totals.verdict.poison_applied,
        totals.verdict.stray_effects,
        totals.verdict.reruns_after_crash,
        totals.verdict.reruns_after_durability_fault,
        started.elapsed().as_secs_f64()
    );
    if let Some(f) = &totals.follow_ups {
        println!(
            "chaos: follow_ups={} follow_ups_lost={} follow_ups_unexpected={}",
            f.rows, f.lost, f.unexpected
        );
    }
    if !drained {
        println!(
            "chaos: FAILED: the queues did not drain within {} s",
            args.drain_timeout
        );
    }
    println!(
        "chaos: published={} confirmed={} effects={} invocations={} lost={} duplicates={} dead_lettered={} poison={} kills={} faults={fault_count} node_kills={node_kills}",
        args.messages,
        totals.confirmed,
        totals.effects,
        totals.invocations,
        totals.verdict.lost,
        totals.verdict.duplicates,
        totals.verdict.dead_lettered,
        totals.poison,
        fleet.kills,
    );
    if let Some(reordered) = totals.reordered {
        println!(
            "chaos: ordered={} keys={} per_key={} lost={} duplicates={} reordered={reordered}",
            args.consume.ordered,
            args.keys,
            args.per_key,
            totals.verdict.lost,
            totals.verdict.duplicates,
        );
    }
    Ok(ok)
}

/// The stopped fleet, the faults fired, whether the queues drained, and the
/// durability windows (database time before and after each Redis restart).
type Driven = (Fleet, HashMap<Fault, u32>, bool, Vec<(String, String)>);

/// Starts the workers and the producer, fires the scheduled faults as the effects
/// progress, and waits for the queues to drain. With `--outbox` a relay runs in this
/// process meanwhile.
async fn drive(
    args: &RunArgs,
    names: &Names,
    faults: &[Fault],
    admin: &mut Admin,
    rng: &mut fastrand::Rng,
    log_dir: &std::path::Path,
) -> Result<Driven, BoxError> {
    let poison: Vec<bool> = (0..args.messages)
        .map(|_| rng.f64() * 100.0 < args.poison_percent)
        .collect();
    let expected_effects = poison.iter().filter(|p| !**p).count().max(1) as f64;

    let mut schedule: Vec<(f64, Event)> = (0..args.kills)
        .map(|_| (0.05 + rng.f64() * 0.85, Event::Kill))
        .collect();
    for fault in faults.iter().filter(|f| **f != Fault::Failpoints) {
        for _ in 0..args.rounds {
            schedule.push((0.05 + rng.f64() * 0.85, Event::Fault(*fault)));
        }
    }
    schedule.sort_by(|a, b| a.0.total_cmp(&b.0));

    let mut fleet = Fleet {
        exe: std::env::current_exe()?,
        names: names.clone(),
        store: args.store,
        log_dir: log_dir.to_owned(),
        procs: Vec::new(),
        generation: 0,
        failpoints: faults.contains(&Fault::Failpoints),
        consume: args.consume.clone(),
        failpoint_p: [
            args.commit_failpoint_p,
            args.retry_failpoint_p,
            args.savepoint_failpoint_p,
        ],
        dead: HashSet::new(),
        aborts: HashMap::new(),
        kills: 0,
        unexpected: Vec::new(),
        cluster: args.cluster,
    };
    for slot in 0..args.workers.max(1) as usize {
        let p = fleet.spawn(slot)?;
        fleet.procs.push(p);
    }

    let outbox = if args.outbox {
        Some(Outbox::new(&names.table("outbox"))?)
    } else {
        None
    };
    let (relay, relay_run) = match &outbox {
        Some(outbox) => {
            let pool = common::pg_pool(
                &common::database_url(),
                &format!("{}relay", names.conn_prefix()),
                3,
            )
            .await?;
            let relay = Arc::new(
                Relay::builder(pool, outbox.clone(), common::amqp_url())
                    .poll_interval(Duration::from_millis(200))
                    .build(),
            );
            let running = relay.clone();
            let handle = WorkerHandle::spawn(|stop| async move { running.run(stop.wait()).await });
            (Some(relay), Some(handle))
        }
        None => (None, None),
    };
    let relayed = |relay: &Option<Arc<Relay>>| relay.as_ref().map_or(0, |r| r.stats().published);

    let published = Arc::new(Published::default());
    let mut producer = Some(tokio::spawn(produce(
        names.clone(),
        admin.pg.clone(),
        Arc::new(poison),
        published.clone(),
        outbox,
        args.publish_rate,
        args.keys,
    )));
    let mut windows = Vec::new();

    let effects_sql = format!("SELECT count(*) FROM {}", names.table("effects"));
    let dlq = common::topology(&names.queue()).dlq();
    let mut fired: HashMap<Fault, u32> = HashMap::new();
    let mut next = 0;
    let mut deadline: Option<Instant> = None;
    let mut valid_confirmed: Option<i64> = None;
    let mut empty_checks = 0;
    let mut drained = false;
    // A node kill runs in the background (its restart takes seconds) while messages
    // keep flowing; the next node kill waits for it.
    let mut pending: Option<NodeKill> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        fleet.reap()?;
        if pending.as_ref().is_some_and(|p| p.task.is_finished()) {
            if let Some(p) = pending.take() {
                p.finish(&mut fired, &mut windows).await;
            }
        }
        if producer.as_ref().is_some_and(|p| p.is_finished()) {
            if let Some(p) = producer.take() {
                p.await??;
            }
            deadline = Some(Instant::now() + Duration::from_secs(args.drain_timeout));
            valid_confirmed = Some(
                admin
                    .count(&format!(
                        "SELECT count(*) FROM {} WHERE NOT poison",
                        names.table("published")
                    ))
                    .await?,
            );
        }
        let effects = match admin.count(&effects_sql).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot count effects");
                continue;
            }
        };
        let progress = effects as f64 / expected_effects;
        while next < schedule.len() && progress >= schedule[next].0 {
            let (at, event) = schedule[next];
            if let Event::Fault(fault) = event {
                if fault.kills_a_node() {
                    if pending.is_some() {
                        break;
                    }
                    next += 1;
                    pending = Some(NodeKill::start(fault, at, admin.pg.clone(), rng)?);
                    continue;
                }
            }
            next += 1;
            let what = match event {
                Event::Kill => fleet
                    .kill_random(rng)
                    .await
                    .map(|victim| format!("SIGKILL {victim}")),
                Event::Fault(fault) => {
                    let restart = matches!(fault, Fault::BrokerRestart | Fault::RedisRestart);
                    let before = if restart {
                        db_now(admin).await.ok()
                    } else {
                        None
                    };
                    let done = inject(fault, admin, names).await.inspect(|_| {
                        *fired.entry(fault).or_insert(0) += 1;
                    });
                    if restart {
                        let after = db_now(admin).await.ok();
                        if let (Fault::RedisRestart, Some(t0), Some(t1)) = (fault, before, after) {
                            windows.push((t0, t1));
                        }
                        if fault == Fault::RedisRestart && args.replay_after_restart > 0 {
                            match replay_completed(names, admin, args.replay_after_restart).await {
                                Ok(n) => println!(
                                    "chaos: replayed={n} messages completed before the redis-restart"
                                ),
                                Err(e) => println!("chaos: replay after redis-restart failed: {e}"),
                            }
                        }
                        // Where the run stood when the service was back: what is left
                        // was done by clients that reconnected on their own.
                        println!(
                            "chaos: back after {}: effects={} confirmed={} direct={} outbox={} relayed={}",
                            fault.name(),
                            admin.count(&effects_sql).await.unwrap_or(-1),
                            published.total(),
                            published.direct.load(Ordering::Relaxed),
                            published.outbox.load(Ordering::Relaxed),
                            relayed(&relay),
                        );
                    }
                    done
                }
            };
            match what {
                Ok(detail) => println!("chaos: at {:>3.0}% {detail}", at * 100.0),
                Err(e) => println!("chaos: at {:>3.0}% {event:?} failed: {e}", at * 100.0),
            }
        }
        let Some(deadline) = deadline else { continue };
        if Instant::now() > deadline {
            println!(
                "chaos: drain timeout: effects={effects} of {} confirmed valid messages",
                valid_confirmed.unwrap_or(0)
            );
            break;
        }
        if next < schedule.len()
            || pending.is_some()
            || valid_confirmed.is_some_and(|v| effects < v)
        {
            continue;
        }
        // Effects complete: wait until no message is ready or unacked in the work and
        // retry queues (redeliveries and retry copies settled), twice in a row.
        match undrained(names, &dlq).await {
            Ok(0) => {
                empty_checks += 1;
                if empty_checks >= 2 {
                    drained = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(_) => empty_checks = 0,
            Err(e) => {
                empty_checks = 0;
                tracing::warn!(error = %e, "cannot list queues");
            }
        }
    }
    if let Some(p) = producer.take() {
        p.abort();
    }
    if let Some(p) = pending.take() {
        // Never leave a node down for the next run.
        p.finish(&mut fired, &mut windows).await;
    }
    fleet.stop().await;
    if let Some(handle) = relay_run {
        if let Err(e) = handle.shutdown_and_join().await {
            println!("chaos: the relay stopped with an error: {e}");
        }
    }
    println!(
        "chaos: publishing direct={} outbox={} relayed={}",
        published.direct.load(Ordering::Relaxed),
        published.outbox.load(Ordering::Relaxed),
        relayed(&relay),
    );
    // The queue depth of the DLQ, for the log.
    if let Ok(ch) = admin.channel().await {
        if let Ok(q) = ch
            .queue_declare(
                dlq.as_str().into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
        {
            println!(
                "chaos: drained={drained}; {} messages in {dlq}",
                q.message_count()
            );
        }
    }
    Ok((fleet, fired, drained, windows))
}

/// The database clock, as text (the effects' and duplicates' timestamps use it).
async fn db_now(admin: &Admin) -> Result<String, BoxError> {
    db_clock(&admin.pg).await
}

async fn db_clock(pg: &sqlx::PgPool) -> Result<String, BoxError> {
    Ok(sqlx::query_scalar("SELECT clock_timestamp()::text")
        .fetch_one(pg)
        .await?)
}

/// The outcome of a node kill: what happened, and the database time before the kill
/// and after the node was back.
type NodeKillOutcome = (Result<String, String>, Option<String>, Option<String>);

/// A node kill (`--cluster`) under way in the background.
struct NodeKill {
    fault: Fault,
    at: f64,
    task: tokio::task::JoinHandle<NodeKillOutcome>,
}

impl NodeKill {
    fn start(
        fault: Fault,
        at: f64,
        pg: sqlx::PgPool,
        rng: &mut fastrand::Rng,
    ) -> Result<Self, BoxError> {
        let cluster = common::cluster().ok_or("node kills need --cluster")?;
        let mut rng = fastrand::Rng::with_seed(rng.u64(..));
        let task = tokio::spawn(async move {
            let before = db_clock(&pg).await.ok();
            let done = match fault {
                Fault::RabbitNodeKill => crate::cluster::kill_rabbit_node(cluster, &mut rng).await,
                _ => crate::cluster::kill_redis_master(cluster, &mut rng).await,
            };
            let after = db_clock(&pg).await.ok();
            (done.map_err(|e| e.to_string()), before, after)
        });
        Ok(NodeKill { fault, at, task })
    }

    /// Waits for the kill (and the node's return), records it and prints it.
    async fn finish(self, fired: &mut HashMap<Fault, u32>, windows: &mut Vec<(String, String)>) {
        let (done, before, after) = match self.task.await {
            Ok(outcome) => outcome,
            Err(e) => (Err(format!("the node kill task failed: {e}")), None, None),
        };
        match done {
            Ok(detail) => {
                *fired.entry(self.fault).or_insert(0) += 1;
                // A failover loses what the master had not replicated yet: a
                // durability fault for the Redis store.
                if let (Fault::RedisMasterKill, Some(t0), Some(t1)) = (self.fault, before, after) {
                    windows.push((t0, t1));
                }
                println!("chaos: at {:>3.0}% {detail}", self.at * 100.0);
            }
            Err(e) => println!(
                "chaos: at {:>3.0}% {} failed: {e}",
                self.at * 100.0,
                self.fault.name()
            ),
        }
    }
}

async fn inject(fault: Fault, admin: &mut Admin, names: &Names) -> Result<String, BoxError> {
    match fault {
        Fault::ConnClose => {
            let n = faults::close_amqp_connections(&names.conn_prefix()).await?;
            Ok(format!("closed {n} AMQP connections"))
        }
        Fault::PgTerminate => {
            let n = faults::terminate_pg_backends(&admin.pg, &names.worker_prefix()).await?;
            Ok(format!("terminated {n} PostgreSQL backends"))
        }
        Fault::RedisKill => {
            let conn = admin.redis.as_mut().ok_or("no Redis connection")?;
            let n = faults::kill_redis_clients(conn, &names.conn_prefix()).await?;
            Ok(format!("killed {n} Redis clients"))
        }
        Fault::BrokerRestart => {
            admin.amqp = None;
            let down = faults::restart_broker().await?;
            Ok(format!(
                "restarted the RabbitMQ app (down {:.1} s)",
                down.as_secs_f64()
            ))
        }
        Fault::RedisRestart => {
            let conn = admin.redis.as_mut().ok_or("no Redis connection")?;
            let down = faults::restart_redis(conn).await?;
            Ok(format!(
                "restarted Redis without saving (down {:.1} s)",
                down.as_secs_f64()
            ))
        }
        Fault::Failpoints => Ok("failpoints are armed at spawn".to_owned()),
        Fault::RabbitNodeKill | Fault::RedisMasterKill => {
            Err("node kills run in the background (NodeKill)".into())
        }
    }
}
