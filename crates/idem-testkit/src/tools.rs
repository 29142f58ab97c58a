//! What the workspace's own tools, the idem-bench and idem-chaos binaries, and their
//! tests share: where they log, and how they clean up the Redis keys a run wrote.

/// Sends the process's logs to stderr, filtered by `RUST_LOG` (warnings and errors
/// when it is unset), so that stdout carries nothing but the tool's report.
pub fn log_to_stderr() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Deletes every key of the node behind `conn` that matches `pattern` (a `SCAN`
/// pattern) and returns how many went.
///
/// It walks the keyspace with `SCAN` (never `KEYS`, which blocks the server) and
/// sends one `UNLINK` per key, pipelined per page: on a cluster node the keys of one
/// page live in different slots, and a multi-key `UNLINK` would be refused.
#[cfg(feature = "redis")]
pub async fn unlink_matching<C>(conn: &mut C, pattern: &str) -> ::redis::RedisResult<u64>
where
    C: ::redis::aio::ConnectionLike,
{
    let mut deleted = 0;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        if !keys.is_empty() {
            let mut pipe = ::redis::pipe();
            for key in &keys {
                pipe.cmd("UNLINK").arg(key);
            }
            let counts: Vec<u64> = pipe.query_async(conn).await?;
            deleted += counts.iter().sum::<u64>();
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}
