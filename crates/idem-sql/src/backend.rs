//! The databases idem-sql supports, and the little each one does differently.

use futures_util::future::BoxFuture;
use sqlx::pool::PoolConnection;
use sqlx::{Pool, Transaction};

mod sealed {
    pub trait Sealed {}
}

/// A database idem-sql can use: [`sqlx::Postgres`], [`sqlx::Sqlite`] or
/// [`sqlx::MySql`] (MariaDB 10.6+ / MySQL 8), each behind the cargo feature of the same
/// name (all on by default). Sealed: its methods are implementation details.
pub trait Backend: sqlx::Database + sealed::Sealed {
    #[doc(hidden)]
    const DIALECT: Dialect;

    #[doc(hidden)]
    fn execute<'a>(
        conn: &'a mut Self::Connection,
        sql: &'a str,
        args: Vec<Arg>,
    ) -> BoxFuture<'a, Result<u64, sqlx::Error>>;

    #[doc(hidden)]
    fn fetch_record<'a>(
        conn: &'a mut Self::Connection,
        sql: &'a str,
        args: Vec<Arg>,
    ) -> BoxFuture<'a, Result<Option<Record>, sqlx::Error>>;

    #[doc(hidden)]
    fn fetch_int<'a>(
        conn: &'a mut Self::Connection,
        sql: &'a str,
        args: Vec<Arg>,
    ) -> BoxFuture<'a, Result<Option<i64>, sqlx::Error>>;

    #[doc(hidden)]
    fn begin(pool: &Pool<Self>) -> BoxFuture<'_, Result<Transaction<'static, Self>, sqlx::Error>>;

    /// Begins a transaction on a connection already taken from the pool (the inbox
    /// records the start on it first, so one message costs one acquire).
    #[doc(hidden)]
    fn begin_on(
        conn: PoolConnection<Self>,
    ) -> BoxFuture<'static, Result<Transaction<'static, Self>, sqlx::Error>>;
}

/// SQL dialect of a [`Backend`].
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
    MySql,
}

/// A bind argument.
#[doc(hidden)]
#[derive(Clone, Debug)]
pub enum Arg {
    Text(String),
    OptText(Option<String>),
    Int(i64),
}

/// A dedup row: state, owner, fingerprint, milliseconds until it expires (<= 0: expired).
#[doc(hidden)]
pub(crate) type Record = (String, Option<String>, Option<String>, i64);

macro_rules! backend {
    ($feature:literal, $module:ident, $db:ty, $dialect:expr, $begin:expr) => {
        #[cfg(feature = $feature)]
        mod $module {
            use super::*;

            impl sealed::Sealed for $db {}

            fn bind_all<'q>(
                mut q: sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>>,
                args: Vec<Arg>,
            ) -> sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>> {
                for a in args {
                    q = match a {
                        Arg::Text(s) => q.bind(s),
                        Arg::OptText(s) => q.bind(s),
                        Arg::Int(i) => q.bind(i),
                    };
                }
                q
            }

            /// Runs `sql` and decodes its first row, if any, with `decode`.
            async fn fetch_row<T>(
                conn: &mut <$db as sqlx::Database>::Connection,
                sql: &str,
                args: Vec<Arg>,
                decode: impl FnOnce(&<$db as sqlx::Database>::Row) -> Result<T, sqlx::Error>,
            ) -> Result<Option<T>, sqlx::Error> {
                use sqlx::Executor as _;
                let q = bind_all(sqlx::query(sql), args);
                conn.fetch_optional(q)
                    .await?
                    .as_ref()
                    .map(decode)
                    .transpose()
            }

            impl Backend for $db {
                const DIALECT: Dialect = $dialect;

                fn execute<'a>(
                    conn: &'a mut Self::Connection,
                    sql: &'a str,
                    args: Vec<Arg>,
                ) -> BoxFuture<'a, Result<u64, sqlx::Error>> {
                    Box::pin(async move {
                        use sqlx::Executor as _;
                        if args.is_empty() {
                            // DDL and other argument-free statements: no prepared statement.
                            return Ok(conn.execute(sql).await?.rows_affected());
                        }
                        let q = bind_all(sqlx::query(sql), args);
                        Ok(conn.execute(q).await?.rows_affected())
                    })
                }

                fn fetch_record<'a>(
                    conn: &'a mut Self::Connection,
                    sql: &'a str,
                    args: Vec<Arg>,
                ) -> BoxFuture<'a, Result<Option<Record>, sqlx::Error>> {
                    use sqlx::Row as _;
                    Box::pin(fetch_row(conn, sql, args, |r| {
                        Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?))
                    }))
                }

                fn fetch_int<'a>(
                    conn: &'a mut Self::Connection,
                    sql: &'a str,
                    args: Vec<Arg>,
                ) -> BoxFuture<'a, Result<Option<i64>, sqlx::Error>> {
                    use sqlx::Row as _;
                    Box::pin(fetch_row(conn, sql, args, |r| r.try_get(0)))
                }

                fn begin(
                    pool: &Pool<Self>,
                ) -> BoxFuture<'_, Result<Transaction<'static, Self>, sqlx::Error>> {
                    let statement: Option<&'static str> = $begin;
                    match statement {
                        Some(s) => Box::pin(pool.begin_with(s)),
                        None => Box::pin(pool.begin()),
                    }
                }

                fn begin_on(
                    conn: PoolConnection<Self>,
                ) -> BoxFuture<'static, Result<Transaction<'static, Self>, sqlx::Error>> {
                    let statement: Option<&'static str> = $begin;
                    // What `Pool::begin` itself does with the connection it acquires.
                    Transaction::begin(conn, statement.map(std::borrow::Cow::Borrowed))
                }
            }
        }
    };
}

backend!("postgres", pg, sqlx::Postgres, Dialect::Postgres, None);
// Take SQLite's write lock up front: a deferred transaction that reads first and
// writes later can fail with SQLITE_BUSY that the busy timeout cannot resolve.
backend!(
    "sqlite",
    sqlite,
    sqlx::Sqlite,
    Dialect::Sqlite,
    Some("BEGIN IMMEDIATE")
);
backend!("mysql", mysql, sqlx::MySql, Dialect::MySql, None);

impl Dialect {
    /// The database clock in milliseconds since the Unix epoch.
    pub(crate) fn now_ms(self) -> &'static str {
        match self {
            Dialect::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
            Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
            // UTC_TIMESTAMP is independent of the session time zone.
            Dialect::MySql => {
                "CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000 AS SIGNED)"
            }
        }
    }

    /// The record columns as text. MariaDB reports binary-collated columns as
    /// VARBINARY, which sqlx will not decode into `String`.
    pub(crate) fn record_columns(self) -> &'static str {
        match self {
            Dialect::MySql => {
                "CONVERT(state USING utf8mb4), CONVERT(owner USING utf8mb4), CONVERT(fingerprint USING utf8mb4)"
            }
            _ => "state, owner, fingerprint",
        }
    }

    /// MariaDB's `INSERT IGNORE` would silently truncate values longer than their
    /// columns (turning distinct keys into one): refuse them instead.
    pub(crate) fn check_lengths(
        self,
        consumer: &str,
        key: &str,
        owner: Option<&str>,
        fingerprint: Option<&str>,
    ) -> Result<(), String> {
        if self != Dialect::MySql {
            return Ok(());
        }
        let limits = [
            ("consumer name", Some(consumer), 200),
            ("idempotency key", Some(key), 512),
            ("owner token", owner, 255),
            ("fingerprint", fingerprint, 255),
        ];
        for (what, value, max) in limits {
            if let Some(v) = value {
                if v.chars().count() > max {
                    return Err(format!("{what} longer than {max} characters"));
                }
            }
        }
        Ok(())
    }

    pub(crate) fn int_cast(self, expr: &str) -> String {
        match self {
            Dialect::Postgres => format!("CAST({expr} AS BIGINT)"),
            Dialect::Sqlite => format!("CAST({expr} AS INTEGER)"),
            Dialect::MySql => format!("CAST({expr} AS SIGNED)"),
        }
    }

    /// `INSERT ... VALUES (...)` that does nothing when the key exists.
    pub(crate) fn insert_ignore(self, table: &str, columns: &str, values: &str) -> String {
        match self {
            Dialect::MySql => format!("INSERT IGNORE INTO {table} ({columns}) VALUES ({values})"),
            _ => {
                format!("INSERT INTO {table} ({columns}) VALUES ({values}) ON CONFLICT DO NOTHING")
            }
        }
    }

    pub(crate) fn for_update(self) -> &'static str {
        match self {
            Dialect::Sqlite => "",
            _ => " FOR UPDATE",
        }
    }

    /// Rewrites `?` placeholders to `$1, $2, ...` for PostgreSQL. The SQL idem-sql
    /// builds contains no `?` other than placeholders.
    pub(crate) fn placeholders(self, sql: &str) -> String {
        if self != Dialect::Postgres {
            return sql.to_owned();
        }
        let mut out = String::with_capacity(sql.len() + 8);
        let mut n = 0;
        for ch in sql.chars() {
            if ch == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(ch);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_placeholders_for_postgres() {
        assert_eq!(
            Dialect::Postgres.placeholders("a = ? AND b = ?"),
            "a = $1 AND b = $2"
        );
        assert_eq!(Dialect::MySql.placeholders("a = ?"), "a = ?");
    }

    #[test]
    fn mariadb_refuses_values_insert_ignore_would_truncate() {
        let long = "k".repeat(513);
        assert!(Dialect::MySql
            .check_lengths("c", &long, None, None)
            .is_err());
        assert!(Dialect::MySql
            .check_lengths("c", &"k".repeat(512), None, None)
            .is_ok());
        assert!(Dialect::MySql
            .check_lengths(&"c".repeat(201), "k", None, None)
            .is_err());
        assert!(Dialect::Postgres
            .check_lengths("c", &long, None, None)
            .is_ok());
    }
}
