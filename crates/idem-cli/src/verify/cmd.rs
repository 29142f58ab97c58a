//! `idem verify` on the command line: the options turned into [`VerifyOptions`],
//! the connections, the output and the exit code.

use std::io::{Read, Write};
use std::time::{Duration, SystemTime};

use super::{verify, write_text, Limits, Records, Source, VerifyOptions};
use crate::cli::VerifyArgs;
use crate::dlq::{parse_age, time_arg};
use crate::error::CliError;

fn duration_arg(option: &str, text: &str) -> Result<Duration, CliError> {
    parse_age(text.trim()).ok_or_else(|| {
        CliError::Usage(format!(
            "{option} {text:?}: expected an age such as 0s, 30s, 5m, 2h or 7d"
        ))
    })
}

fn read_ids_file(path: &str) -> Result<Vec<String>, CliError> {
    let mut text = String::new();
    let read = if path == "-" {
        std::io::stdin().read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut text))
    };
    read.map_err(|e| CliError::Usage(format!("cannot read --ids {path:?}: {e}")))?;
    Ok(super::read_ids(&text))
}

/// The options `args` describe (times counted from now).
pub(crate) fn options(args: &VerifyArgs) -> Result<VerifyOptions, CliError> {
    let now = SystemTime::now();
    let mut opts = VerifyOptions::new(args.queue.as_str(), args.consumer.as_str());
    if let Some(list) = &args.tiers {
        opts.tiers = crate::topology::parse_tiers(list)?;
    }
    opts.since = time_arg("--since", &args.since, now)?;
    opts.until = match &args.until {
        Some(t) => time_arg("--until", t, now)?,
        None => now,
    };
    if opts.until < opts.since {
        return Err(CliError::Usage(
            "--until is before --since: the window is empty".to_owned(),
        ));
    }
    opts.grace = duration_arg("--grace", &args.grace)?;
    opts.stuck_after = duration_arg("--stuck-after", &args.stuck_after)?;
    opts.recheck_after = duration_arg("--recheck-after", &args.recheck_after)?;
    opts.limits = Limits {
        retention: duration_arg("--retention", &args.retention)?,
        max_attempts: args.max_attempts.max(1),
        horizon: args
            .horizon
            .as_deref()
            .map(|h| duration_arg("--horizon", h))
            .transpose()?,
        crash_limit: args.crash_limit,
        delivery_limit: args.delivery_limit,
        pool_size: args.pool_size,
        concurrency: args.concurrency,
    };
    Ok(opts)
}

/// Runs `idem verify`: prints the report, then fails with exit 5 if it found
/// anything.
pub(crate) async fn run_verify(
    target: crate::broker::Target<'_>,
    args: VerifyArgs,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let tls = target.tls;
    let opts = options(&args)?;
    let source = match &args.ids {
        Some(path) => Source::Ids(read_ids_file(path)?),
        None => Source::Outbox {
            table: args.outbox_table.clone(),
        },
    };
    let needs_db = matches!(source, Source::Outbox { .. })
        || (args.dedup_redis.is_none()
            && args.dedup_postgres.is_none()
            && args.dedup_mysql.is_none());
    let db = if needs_db {
        let hint = "set DATABASE_URL or --database-url";
        Some(crate::outbox::connect_pool(&args.database.database_url, tls, 2, hint).await?)
    } else {
        None
    };
    let records = match (
        &args.dedup_mysql,
        &args.dedup_redis,
        &args.dedup_postgres,
        &db,
    ) {
        (Some(url), _, _, _) => Records::mysql(url, tls, &args.dedup_table).await?,
        (None, Some(redis), _, _) => Records::redis(redis, &args.dedup_prefix).await?,
        (None, None, Some(pg), _) => {
            let hint = "check --dedup-postgres";
            let pool = crate::outbox::connect_pool(pg, tls, 2, hint).await?;
            Records::postgres(pool, &args.dedup_table).await?
        }
        (None, None, None, Some(pool)) => {
            Records::postgres(pool.clone(), &args.dedup_table).await?
        }
        (None, None, None, None) => return Err(CliError::Usage(
            "no dedup store: give --database-url, --dedup-postgres, --dedup-mysql or --dedup-redis"
                .to_owned(),
        )),
    };
    let result = target
        .with_connection(async |conn| verify(conn, db.as_ref(), &source, &records, &opts).await)
        .await;
    if let Some(pool) = &db {
        pool.close().await;
    }
    let report = result?;
    crate::json_or(out, args.json, &report, |out| write_text(out, &report))?;
    if report.is_clean() {
        return Ok(());
    }
    let c = &report.counts;
    Err(CliError::Findings(format!(
        "verify found lost={} stuck={} at_risk={} hazards={}",
        c.lost, c.stuck, c.at_risk, c.hazards
    )))
}
