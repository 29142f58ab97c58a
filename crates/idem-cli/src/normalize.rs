//! Folding error texts into "the same problem": ids, numbers and quoted values become
//! placeholders, so `timeout after 1234 ms` and `timeout after 99 ms` group together.

use std::sync::LazyLock;

use regex::{Captures, Regex};

#[allow(clippy::expect_used)] // constant patterns, checked by the unit tests
fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("valid constant regex")
}

static QUOTED: LazyLock<Regex> =
    LazyLock::new(|| re(r#""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`"#));
static UUID: LazyLock<Regex> = LazyLock::new(|| {
    re(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")
});
static HEX: LazyLock<Regex> = LazyLock::new(|| re(r"\b(?:0x[0-9a-fA-F]+|[0-9a-fA-F]{8,})\b"));
// A number not glued to a preceding letter (`utf8`, `v2`, `sha256` stay as they are).
static NUMBER: LazyLock<Regex> = LazyLock::new(|| re(r"(^|[^A-Za-z0-9_<.])[-+]?\d+(?:\.\d+)?"));
static SPACES: LazyLock<Regex> = LazyLock::new(|| re(r"\s+"));

/// The normalised form of an error text: quoted strings become `<str>`, UUIDs `<uuid>`,
/// hex ids (`0x...` or 8+ hex digits with at least one digit) `<hex>`, numbers `<n>`,
/// and whitespace runs one space.
///
/// ```
/// use idem_cli::normalize::normalize_error;
/// assert_eq!(normalize_error("timeout after 1234 ms"), "timeout after <n> ms");
/// assert_eq!(
///     normalize_error("order 'A-17' not found (id 0b4c6a2e-5f1d-4e8a-9c3b-2d7e8f9a0b1c)"),
///     "order <str> not found (id <uuid>)"
/// );
/// ```
pub fn normalize_error(text: &str) -> String {
    let s = QUOTED.replace_all(text, "<str>");
    let s = UUID.replace_all(&s, "<uuid>");
    let s = HEX.replace_all(&s, |c: &Captures<'_>| {
        let m = &c[0];
        if m.starts_with("0x") || m.bytes().any(|b| b.is_ascii_digit()) {
            "<hex>".to_owned()
        } else {
            m.to_owned()
        }
    });
    let s = NUMBER.replace_all(&s, "${1}<n>");
    SPACES.replace_all(s.trim(), " ").into_owned()
}

#[cfg(test)]
mod tests {
    use super::normalize_error as n;

    #[test]
    fn folds_variable_parts() {
        assert_eq!(n("timeout after 1234 ms"), n("timeout after 99 ms"));
        for (text, folded) in [
            ("timeout after 1234ms", "timeout after <n>ms"),
            (
                "decode: expected value at line 1 column 5",
                "decode: expected value at line <n> column <n>",
            ),
            (r#"user "bob" missing"#, "user <str> missing"),
            (r#"user "b\"ob" missing"#, "user <str> missing"),
            ("tx deadbeef01 failed", "tx <hex> failed"),
            ("ptr 0xFF", "ptr <hex>"),
            ("the acceptable feedface", "the acceptable feedface"),
            ("utf8 and sha256 stay", "utf8 and sha256 stay"),
            ("  a \n\t b  ", "a b"),
            ("took 1.5s, retry -3", "took <n>s, retry <n>"),
            (
                "id 0B4C6A2E-5F1D-4E8A-9C3B-2D7E8F9A0B1C gone",
                "id <uuid> gone",
            ),
        ] {
            assert_eq!(n(text), folded, "{text:?}");
        }
    }
}
