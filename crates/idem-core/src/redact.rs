//! Credentials never appear in logs or errors: URLs are redacted before printing.

/// Replaces the password of a URL (`scheme://user:password@host/...`) with `***`.
/// Strings that are not URLs with credentials are returned unchanged.
///
/// ```
/// assert_eq!(
///     idem_core::redact_url("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
///     "amqp://guest:***@127.0.0.1:5672/%2f"
/// );
/// assert_eq!(idem_core::redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    // The userinfo ends at the last '@' of the authority (passwords may contain '@').
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let redacted_userinfo = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => userinfo.to_owned(),
    };
    format!(
        "{}://{}@{}{}",
        &url[..scheme_end],
        redacted_userinfo,
        &authority[at + 1..],
        &rest[authority_end..]
    )
}

/// Removes `url` and its password (as it appears in the URL) from a free-form text,
/// such as a driver's error message that may quote the connection string.
///
/// ```
/// let url = "postgres://app:hunter2@db/x";
/// assert_eq!(
///     idem_core::redact_in(&format!("cannot connect to {url}: auth hunter2 rejected"), url),
///     "cannot connect to postgres://app:***@db/x: auth *** rejected"
/// );
/// ```
pub fn redact_in(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &redact_url(url));
    if let Some(password) = password_of(url).filter(|p| !p.is_empty()) {
        out = out.replace(password, "***");
    }
    out
}

fn password_of(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    Some(&userinfo[userinfo.find(':')? + 1..])
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("postgres://u:p@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(redact_url("redis://:pw@h"), "redis://:***@h");
        assert_eq!(redact_url("amqp://a:b@c@host/vh"), "amqp://a:***@host/vh");
        assert_eq!(
            redact_url("postgres://postgres@h/db"),
            "postgres://postgres@h/db"
        );
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
    }
}
