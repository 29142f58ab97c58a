//! MariaDB / MySQL (MYSQL_URL, default mysql://root@127.0.0.1:3306/test).
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design
#![cfg(feature = "mysql")]

#[macro_use]
mod common;

use sqlx::mysql::MySqlPoolOptions;
use sqlx::MySqlPool;

async fn pool(_tag: &str) -> (MySqlPool, ()) {
    (
        idem_testkit::mariadb(MySqlPoolOptions::new().max_connections(8)).await,
        (),
    )
}

fn ph(_n: usize) -> String {
    "?".to_owned()
}

fn text(col: &str) -> String {
    format!("CONVERT({col} USING utf8mb4)")
}

sql_suite!(sqlx::MySql, pool, ph, text);
