//! SQL identifier validation shared by the crates that splice a configured table
//! name into SQL (idem-sql's dedup tables, idem-outbox's outbox table). Not part of
//! the public API.

/// Longest identifier accepted: PostgreSQL's limit (MariaDB allows 64).
pub(crate) const MAX_IDENTIFIER_LEN: usize = 63;

/// Whether `part` is a plain SQL identifier: `[A-Za-z_][A-Za-z0-9_]*`, at most
/// [`MAX_IDENTIFIER_LEN`] bytes. Such a name needs no quoting in any supported
/// database and cannot carry SQL.
pub(crate) fn is_identifier(part: &str) -> bool {
    let mut chars = part.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && part.len() <= MAX_IDENTIFIER_LEN
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Splits a table name, `name` or `schema.name`, into its schema and table parts if
/// each is an identifier (`[A-Za-z_][A-Za-z0-9_]*`, at most 63 bytes).
pub fn split_table_name(name: &str) -> Option<(Option<&str>, &str)> {
    let (schema, table) = match name.split_once('.') {
        Some((s, t)) => (Some(s), t),
        None => (None, name),
    };
    (is_identifier(table) && schema.is_none_or(is_identifier)).then_some((schema, table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_and_qualified_names_only() {
        assert_eq!(split_table_name("idem_inbox"), Some((None, "idem_inbox")));
        assert_eq!(split_table_name("app.t_1"), Some((Some("app"), "t_1")));
        assert!(split_table_name(&"a".repeat(63)).is_some());
        for bad in [
            "",
            "1abc",
            "a-b",
            "a b",
            "t; DROP TABLE x",
            "a.b.c",
            ".t",
            "s.",
            "\"quoted\"",
            "é",
            &"a".repeat(64),
        ] {
            assert!(split_table_name(bad).is_none(), "{bad:?}");
        }
    }
}
