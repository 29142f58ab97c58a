//! Running the `idem dlq ...` commands: arguments checked before connecting, then the
//! [`dlq`](crate::dlq) operations, their output as tables or JSON.

use std::io::Write;

use crate::cli::{DlqCommand, FilterArgs};
use crate::dlq::{self, MoveReport, ReplayOptions, Selector};
use crate::error::CliError;
use crate::render::{terminal_width, Table};
use crate::{broker, json, json_or, or_dash, short_time, write_err};

/// The selector of a command's filters; `all` (replay and purge) must come alone, and
/// one of the two must be given when `required`.
fn selector(all: bool, filter: &FilterArgs, required: Option<&str>) -> Result<Selector, CliError> {
    let f = filter.to_filter()?;
    match (all, f.is_empty(), required) {
        (true, false, _) => Err(CliError::Usage(
            "--all selects every message: give either --all or filters, not both".to_owned(),
        )),
        (false, true, Some(cmd)) => Err(CliError::Usage(format!(
            "{cmd} needs --all or at least one filter (--id, --group, --error-type, --consumer, --since, --until, --match)"
        ))),
        (_, true, _) => Ok(Selector::All),
        (false, false, _) => Ok(Selector::Filter(Box::new(f))),
    }
}

/// An `import` file (`-`: stdin), read and checked whole.
fn read_import(file: &str) -> Result<Vec<dlq::wire::WireMessage>, CliError> {
    if file == "-" {
        return dlq::read_lines(std::io::stdin().lock());
    }
    let f = std::fs::File::open(file)
        .map_err(|e| CliError::Usage(format!("cannot open {file:?}: {e}")))?;
    dlq::read_lines(std::io::BufReader::new(f))
}

pub(crate) async fn run_dlq(
    target: broker::Target<'_>,
    cmd: DlqCommand,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    // Everything that can be refused is refused before connecting.
    let (prepared, write_token) = prepare(&cmd)?;
    if let DlqCommand::Serve {
        listen,
        mut queues,
        management_url,
        ..
    } = cmd
    {
        let conn = target.connect().await?;
        if queues.is_empty() {
            let m = crate::serve::discover::Management::new(target.url, management_url.as_deref())?;
            queues = crate::serve::discover::discover(&m).await?;
        }
        for q in &queues {
            dlq::resolve(&conn, q).await?;
        }
        writeln!(
            out,
            "serving the dead letters of {} on http://{listen}/ ({}) until SIGINT/SIGTERM",
            queues.join(", "),
            if write_token.is_some() {
                "writes allowed with the token"
            } else {
                "read-only"
            }
        )
        .map_err(write_err)?;
        out.flush().map_err(write_err)?;
        let config = crate::serve::ConsoleConfig {
            queues,
            write_token,
        };
        return crate::serve::serve(conn, config, listen, idem_amqp::shutdown::signal()).await;
    }
    target
        .with_connection(async |conn| run_dlq_on(conn, target.tls, cmd, prepared, out).await)
        .await
}

/// Parses and checks what `cmd` needs before connecting: its selector, rate, edit,
/// import file, rules, and the console's write token.
fn prepare(cmd: &DlqCommand) -> Result<(Prepared, Option<String>), CliError> {
    let selector = match cmd {
        DlqCommand::List { filter, .. }
        | DlqCommand::Stats { filter, .. }
        | DlqCommand::Export { filter, .. } => selector(false, filter, None)?,
        DlqCommand::Show { filter, .. } => selector(false, filter, Some("show"))?,
        DlqCommand::Replay { all, filter, .. } => selector(*all, filter, Some("replay"))?,
        DlqCommand::Purge {
            queue,
            all,
            filter,
            yes,
            dry_run,
            ..
        } => {
            let s = selector(*all, filter, Some("purge"))?;
            if !yes && !dry_run {
                return Err(CliError::Usage(format!(
                    "refusing to delete messages from the DLQ of {queue} without --yes (use --dry-run to see what would be deleted)"
                )));
            }
            s
        }
        DlqCommand::Import { .. }
        | DlqCommand::Edit { .. }
        | DlqCommand::Redrive { .. }
        | DlqCommand::Serve { .. } => Selector::All,
    };
    let rate = match cmd {
        DlqCommand::Replay { rate: Some(r), .. } => Some(dlq::parse_rate(r)?),
        _ => None,
    };
    let edit = match cmd {
        DlqCommand::Edit {
            json_set,
            body_file,
            ..
        } => Some(match body_file {
            Some(f) => dlq::Edit::Body(
                std::fs::read(f)
                    .map_err(|e| CliError::Usage(format!("cannot read --body-file {f:?}: {e}")))?,
            ),
            None => dlq::Edit::JsonSet(
                json_set
                    .iter()
                    .map(|a| dlq::parse_json_set(a))
                    .collect::<Result<_, _>>()?,
            ),
        }),
        _ => None,
    };
    let import = match cmd {
        DlqCommand::Import { file, .. } => Some(read_import(file)?),
        _ => None,
    };
    let rules = match cmd {
        DlqCommand::Redrive {
            rules, interval, ..
        } => {
            dlq::parse_age(interval).ok_or_else(|| {
                CliError::Usage(format!(
                    "--interval {interval:?}: expected an age such as 30s or 5m"
                ))
            })?;
            Some(dlq::redrive::Rules::load(rules)?)
        }
        _ => None,
    };
    let write_token = match cmd {
        DlqCommand::Serve {
            allow_writes: true, ..
        } => match std::env::var("IDEM_DLQ_TOKEN") {
            Ok(t) if t.trim().len() >= 16 => Some(t.trim().to_owned()),
            _ => return Err(CliError::Usage(
                "--allow-writes needs a bearer token of at least 16 characters in IDEM_DLQ_TOKEN"
                    .to_owned(),
            )),
        },
        _ => None,
    };
    let prepared = Prepared {
        selector,
        rate,
        edit,
        import,
        rules,
    };
    Ok((prepared, write_token))
}

/// What was parsed and checked before connecting.
struct Prepared {
    selector: Selector,
    rate: Option<f64>,
    edit: Option<dlq::Edit>,
    import: Option<Vec<dlq::wire::WireMessage>>,
    rules: Option<dlq::redrive::Rules>,
}

async fn run_dlq_on(
    conn: &lapin::Connection,
    tls: &idem_core::TlsConfig,
    cmd: DlqCommand,
    p: Prepared,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let selector = p.selector;
    match cmd {
        DlqCommand::List {
            queue,
            limit,
            json: as_json,
            ..
        } => {
            let entries = dlq::list_where(conn, &queue, limit, &selector).await?;
            json_or(out, as_json, &entries, |out| {
                print_list(out, &queue, &entries)
            })
        }
        DlqCommand::Stats {
            queue,
            limit,
            json: as_json,
            ..
        } => {
            let stats = dlq::stats_where(conn, &queue, limit, &selector).await?;
            json_or(out, as_json, &stats, |out| print_stats(out, &stats))
        }
        DlqCommand::Show {
            queue,
            max_bytes,
            limit,
            json: as_json,
            ..
        } => {
            let shown = dlq::show(conn, &queue, &selector, max_bytes, limit).await?;
            json_or(out, as_json, &shown, |out| print_shown(out, &queue, &shown))
        }
        DlqCommand::Export { queue, .. } => export(conn, &queue, &selector, out).await,
        DlqCommand::Import {
            queue,
            json: as_json,
            ..
        } => {
            let messages = p.import.unwrap_or_default();
            import(conn, &queue, &messages, as_json, out).await
        }
        DlqCommand::Edit {
            queue,
            id,
            json: as_json,
            ..
        } => {
            let change = p
                .edit
                .ok_or_else(|| CliError::Usage("nothing to edit".to_owned()))?;
            let report = dlq::edit(conn, &queue, &id, &change).await?;
            json_or(out, as_json, &report, |out| print_edit(out, &report))
        }
        DlqCommand::Replay {
            queue,
            dry_run,
            json: as_json,
            dedup,
            ..
        } => {
            let options = ReplayOptions {
                dry_run,
                rate: p.rate,
            };
            let report = replay(conn, &queue, &selector, &options, &dedup, tls).await?;
            print_report(out, &report, as_json, "replay")?;
            partial(&report, "replayed")
        }
        DlqCommand::Redrive {
            dry_run,
            watch,
            interval,
            json: as_json,
            ..
        } => {
            let rules = p
                .rules
                .ok_or_else(|| CliError::Usage("no rules".to_owned()))?;
            if !watch {
                let reports = dlq::redrive::redrive(conn, &rules, dry_run).await?;
                return print_redrive(out, &reports, as_json, dry_run);
            }
            watch_redrive(conn, &rules, &interval, as_json, out).await
        }
        DlqCommand::Serve { .. } => Ok(()),
        DlqCommand::Purge {
            queue,
            dry_run,
            json: as_json,
            ..
        } => {
            let report = dlq::purge(conn, &queue, &selector, dry_run).await?;
            print_report(out, &report, as_json, "purge")?;
            partial(&report, "purged")
        }
    }
}

/// The table of `dlq list`.
fn print_list(out: &mut dyn Write, queue: &str, entries: &[dlq::DlqEntry]) -> Result<(), CliError> {
    let mut t = Table::new(
        &[
            "#",
            "MESSAGE ID",
            "KEY",
            "KIND",
            "ATT",
            "FIRST FAILED",
            "LAST FAILED",
            "ERROR",
        ],
        &[6, 36, 36, 9, 4, 19, 19],
    );
    for e in entries {
        t.row(vec![
            e.position.to_string(),
            or_dash(e.message_id.as_deref()),
            or_dash(e.key.as_deref()),
            e.kind(),
            e.count().map_or_else(|| "-".to_owned(), |a| a.to_string()),
            short_time(e.first_time().as_deref()),
            short_time(e.last_time().as_deref()),
            or_dash(e.error_text().as_deref()),
        ]);
    }
    t.write(out, terminal_width()).map_err(write_err)?;
    writeln!(
        out,
        "{} message(s) of the DLQ of {queue} listed; every message stays in the DLQ",
        entries.len()
    )
    .map_err(write_err)
}

/// The table of `dlq stats`.
fn print_stats(out: &mut dyn Write, stats: &dlq::DlqStats) -> Result<(), CliError> {
    let mut t = Table::new(
        &[
            "GROUP",
            "COUNT",
            "KIND",
            "FIRST SEEN",
            "LAST SEEN",
            "ERROR (normalised)",
        ],
        &[10, 8, 9, 19, 19],
    );
    for g in &stats.groups {
        t.row(vec![
            g.id.clone(),
            g.count.to_string(),
            g.error_kind.clone(),
            short_time(g.first_seen.as_deref()),
            short_time(g.last_seen.as_deref()),
            g.error.clone(),
        ]);
    }
    t.write(out, terminal_width()).map_err(write_err)?;
    writeln!(
        out,
        "{} message(s) of {} in {} group(s); every message stays in the DLQ (select a group with --group GROUP)",
        stats.scanned,
        stats.dlq,
        stats.groups.len()
    )
    .map_err(write_err)
}

/// `dlq redrive --watch`: a round every `interval` until SIGINT/SIGTERM.
async fn watch_redrive(
    conn: &lapin::Connection,
    rules: &dlq::redrive::Rules,
    interval: &str,
    as_json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let every = dlq::parse_age(interval).unwrap_or(std::time::Duration::from_secs(30));
    let mut failed = None;
    dlq::redrive::redrive_every(conn, rules, every, idem_amqp::shutdown::signal(), |round| {
        let r = round.and_then(|reports| print_redrive(out, &reports, as_json, false));
        if let Err(e) = r {
            eprintln!("error: {e}");
            failed = Some(e);
        }
    })
    .await;
    match failed {
        Some(e) if matches!(e, CliError::Failed(_)) => Err(e),
        _ => Ok(()),
    }
}

/// What `dlq edit` did.
fn print_edit(out: &mut dyn Write, report: &dlq::EditReport) -> Result<(), CliError> {
    writeln!(
        out,
        "edited {} ({} cop{}) in {}: body sha256 {} (x-idem-original-sha256 {}); it is at the tail of the DLQ",
        report.message_id,
        report.edited,
        if report.edited == 1 { "y" } else { "ies" },
        report.dlq,
        report.edited_sha256,
        report.original_sha256
    )
    .map_err(write_err)
}

/// `dlq replay`, predicting duplicates from a dedup store when `dedup` names one.
async fn replay(
    conn: &lapin::Connection,
    queue: &str,
    selector: &Selector,
    options: &ReplayOptions,
    dedup: &crate::cli::DedupArgs,
    tls: &idem_core::TlsConfig,
) -> Result<MoveReport, CliError> {
    match dedup.lookup(tls).await? {
        Some(lookup) => dlq::replay_predicting(conn, queue, selector, options, &lookup).await,
        None => dlq::replay_with(conn, queue, selector, options).await,
    }
}

/// The messages `dlq show` found; none is an error.
fn print_shown(
    out: &mut dyn Write,
    queue: &str,
    shown: &[dlq::ShownMessage],
) -> Result<(), CliError> {
    for m in shown {
        dlq::write_shown(out, m).map_err(write_err)?;
        writeln!(out).map_err(write_err)?;
    }
    if shown.is_empty() {
        return Err(CliError::NotFound(format!(
            "no message of the DLQ of {queue} matches"
        )));
    }
    Ok(())
}

/// `dlq import`: publishes the file's messages to the DLQ and says how many.
async fn import(
    conn: &lapin::Connection,
    queue: &str,
    messages: &[dlq::wire::WireMessage],
    as_json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let report = dlq::import(conn, queue, messages).await?;
    json_or(out, as_json, &report, |out| {
        writeln!(
            out,
            "imported {} of {} message(s) into {}",
            report.imported, report.read, report.dlq
        )
        .map_err(write_err)
    })
}

/// `dlq export`: the JSON lines on `out`, the count on stderr (stdout is the file).
async fn export(
    conn: &lapin::Connection,
    queue: &str,
    selector: &Selector,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let n = dlq::export(conn, queue, selector, out).await?;
    eprintln!("exported {n} message(s) of the DLQ of {queue}; every message stays in the DLQ");
    Ok(())
}

fn partial(report: &MoveReport, verb: &str) -> Result<(), CliError> {
    if report.failed == 0 {
        return Ok(());
    }
    let first = report
        .messages
        .iter()
        .find(|m| m.outcome.starts_with("failed"))
        .map(|m| m.outcome.clone())
        .unwrap_or_default();
    Err(CliError::Partial(format!(
        "{} of {} selected message(s) could not be {verb}; they stay in {} ({first})",
        report.failed, report.matched, report.dlq
    )))
}

fn print_report(
    out: &mut dyn Write,
    report: &MoveReport,
    as_json: bool,
    what: &str,
) -> Result<(), CliError> {
    if as_json {
        return json(out, report);
    }
    if !report.messages.is_empty() {
        let mut t = Table::new(&["#", "MESSAGE ID", "TARGET", "OUTCOME"], &[6, 36, 60]);
        for m in &report.messages {
            t.row(vec![
                m.position.to_string(),
                or_dash(m.message_id.as_deref()),
                or_dash(m.target.as_deref()),
                m.outcome.clone(),
            ]);
        }
        t.write(out, terminal_width()).map_err(write_err)?;
    }
    let id = report
        .replay_id
        .as_deref()
        .map_or_else(String::new, |id| format!(" (x-idem-replay: {id})"));
    let summary = if report.dry_run {
        format!(
            "dry run: {} of {} message(s) of {} would be affected by {what}; nothing was changed",
            report.matched, report.scanned, report.dlq
        )
    } else {
        format!(
            "{what}: {} of {} message(s) of {} done, {} failed{id}",
            report.done, report.scanned, report.dlq, report.failed
        )
    };
    let summary = match report.duplicates {
        Some(n) => format!(
            "{summary}; {n} of them will be acked as duplicates (their key is already done in the consumer's dedup store)"
        ),
        None => summary,
    };
    writeln!(out, "{summary}").map_err(write_err)
}

fn print_redrive(
    out: &mut dyn Write,
    reports: &[dlq::redrive::RuleReport],
    as_json: bool,
    dry_run: bool,
) -> Result<(), CliError> {
    if as_json {
        return json(out, &reports);
    }
    for r in reports {
        let what = match (r.action, dry_run) {
            (dlq::redrive::Action::Replay, true) => "would replay",
            (dlq::redrive::Action::Replay, false) => "replayed",
            (dlq::redrive::Action::Move, true) => "would move",
            (dlq::redrive::Action::Move, false) => "moved",
        };
        let n = if dry_run {
            r.report.matched
        } else {
            r.report.done
        };
        let targets: std::collections::BTreeSet<&str> = r
            .report
            .messages
            .iter()
            .filter_map(|m| m.target.as_deref())
            .collect();
        writeln!(
            out,
            "rule {}: {what} {n} message(s) of {} to {}; {} held for a person (max replays reached); {} failed",
            r.rule,
            r.report.dlq,
            if targets.is_empty() { "-".to_owned() } else { targets.into_iter().collect::<Vec<_>>().join(", ") },
            r.held,
            r.report.failed,
        )
        .map_err(write_err)?;
    }
    if dry_run {
        writeln!(out, "dry run: nothing was changed").map_err(write_err)?;
    }
    let failed: u64 = reports.iter().map(|r| r.report.failed).sum();
    if failed > 0 {
        return Err(CliError::Partial(format!(
            "{failed} message(s) could not be redriven; they stay in their DLQ"
        )));
    }
    Ok(())
}
