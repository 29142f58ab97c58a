//! MariaDB / MySQL (MYSQL_URL, default mysql://root@127.0.0.1:3306/test).
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design
#![cfg(feature = "mysql")]

#[macro_use]
mod common;

use sqlx::mysql::MySqlPoolOptions;
use sqlx::MySqlPool;

async fn pool(_tag: &str) -> (MySqlPool, ()) {
    let url =
        std::env::var("MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    match MySqlPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(&url)
        .await
    {
        Ok(p) => (p, ()),
        Err(e) => panic!(
            "MariaDB not reachable at {} (set MYSQL_URL): start it with `service mariadb start`: {e}",
            url.split('@').next_back().unwrap_or("")
        ),
    }
}

fn ph(_n: usize) -> String {
    "?".to_owned()
}

fn text(col: &str) -> String {
    format!("CONVERT({col} USING utf8mb4)")
}

sql_suite!(sqlx::MySql, pool, ph, text);
