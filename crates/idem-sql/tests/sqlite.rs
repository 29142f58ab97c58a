//! SQLite (a database file in a temp dir): the lease store and the inbox.
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design
#![cfg(feature = "sqlite")]

#[macro_use]
mod common;

use std::path::PathBuf;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::SqlitePool;

/// Removes the temp dir holding the database file.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn pool(tag: &str) -> (SqlitePool, TempDir) {
    let dir = std::env::temp_dir().join(common::unique(tag));
    std::fs::create_dir_all(&dir).unwrap();
    let opts = SqliteConnectOptions::new()
        .filename(dir.join("idem.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(std::time::Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(opts)
        .await
        .unwrap();
    (pool, TempDir(dir))
}

fn ph(_n: usize) -> String {
    "?".to_owned()
}

fn text(col: &str) -> String {
    col.to_owned()
}

sql_suite!(sqlx::Sqlite, pool, ph, text);
