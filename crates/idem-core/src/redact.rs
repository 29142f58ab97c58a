//! Credentials never appear in logs or errors: URLs are redacted before printing.
//!
//! Every idem crate prints URLs through [`redact_url`] and scrubs driver messages with
//! [`redact_in`]. The userinfo part of a URL is treated as follows:
//!
//! | userinfo | printed as |
//! |---|---|
//! | `user:password` | `user:***` (the user name stays, it helps operators) |
//! | `:password` | `:***` |
//! | a lone `name` (`redis://token@host`) | `***`: many drivers read a lone name as a password or token, so it is treated as one |
//! | none | unchanged |

/// Replaces the secret part of a URL's userinfo with `***`: the password of
/// `scheme://user:password@host/...`, or the whole userinfo when it has no `:`
/// (`redis://token@host`), since a lone name is often a password or token. Strings
/// that are not URLs with a userinfo part are returned unchanged.
///
/// ```
/// use idem_core::redact::redact_url;
///
/// assert_eq!(
///     redact_url("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
///     "amqp://guest:***@127.0.0.1:5672/%2f"
/// );
/// assert_eq!(redact_url("redis://s3cret@cache:6379/0"), "redis://***@cache:6379/0");
/// assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((start, userinfo)) = userinfo(url) else {
        return url.to_owned();
    };
    let redacted = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => "***".to_owned(),
    };
    format!(
        "{}{}{}",
        &url[..start],
        redacted,
        &url[start + userinfo.len()..]
    )
}

/// Removes `url` and its secret (as it appears in the URL: the password, or a lone
/// user name) from a free-form text, such as a driver's error message that may quote
/// the connection string. Occurrences of `url` are replaced by its
/// [redacted](redact_url) form; the secret is replaced by `***` everywhere else.
///
/// ```
/// use idem_core::redact::redact_in;
///
/// let url = "postgres://app:hunter2@db/x";
/// assert_eq!(
///     redact_in(&format!("cannot connect to {url}: auth hunter2 rejected"), url),
///     "cannot connect to postgres://app:***@db/x: auth *** rejected"
/// );
/// ```
pub fn redact_in(text: &str, url: &str) -> String {
    let secret = secret_of(url).filter(|s| !s.is_empty());
    let scrub = |part: &str| match secret {
        Some(s) => part.replace(s, "***"),
        None => part.to_owned(),
    };
    if url.is_empty() {
        return scrub(text);
    }
    let redacted = redact_url(url);
    text.split(url)
        .map(scrub)
        .collect::<Vec<_>>()
        .join(&redacted)
}

/// The userinfo of `url` and where it starts: between `://` and the last `@` of the
/// authority (passwords may contain `@`).
fn userinfo(url: &str) -> Option<(usize, &str)> {
    let start = url.find("://")? + 3;
    let rest = &url[start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    Some((start, &authority[..authority.rfind('@')?]))
}

/// The part of the userinfo that [`redact_url`] hides.
fn secret_of(url: &str) -> Option<&str> {
    let (_, userinfo) = userinfo(url)?;
    Some(match userinfo.find(':') {
        Some(colon) => &userinfo[colon + 1..],
        None => userinfo,
    })
}

#[cfg(test)]
mod tests {
    use super::{redact_in, redact_url};

    #[test]
    fn redacts_passwords() {
        for (url, redacted) in [
            (
                "postgres://u:p@h:5432/db?x=1",
                "postgres://u:***@h:5432/db?x=1",
            ),
            ("redis://:pw@h", "redis://:***@h"),
            ("amqp://:pw@h", "amqp://:***@h"),
            ("amqp://a:b@c@host/vh", "amqp://a:***@host/vh"),
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
            (
                "amqps://u:p%40ss@host/vh?heartbeat=10",
                "amqps://u:***@host/vh?heartbeat=10",
            ),
            // An '@' in the path or the query is not userinfo.
            ("amqp://host/v@h", "amqp://host/v@h"),
            ("rediss://u:p@h/0?x=@", "rediss://u:***@h/0?x=@"),
            ("not a url", "not a url"),
            ("sqlite://data/x.db", "sqlite://data/x.db"),
            // A lone user name may be a token: it is hidden too.
            ("redis://alice@host", "redis://***@host"),
            ("amqp://user@host", "amqp://***@host"),
            ("postgres://postgres@h/db", "postgres://***@h/db"),
            ("rediss://tok@h/0?x=@", "rediss://***@h/0?x=@"),
        ] {
            assert_eq!(redact_url(url), redacted);
        }
    }

    #[test]
    fn a_lone_user_name_is_secret() {
        assert_eq!(
            redact_in(
                "redis://alice@host refused: WRONGPASS alice",
                "redis://alice@host"
            ),
            "redis://***@host refused: WRONGPASS ***"
        );
    }

    #[test]
    fn scrubbing_keeps_the_redacted_url_intact() {
        // The secret equals the scheme: the redacted URL must still read as a URL.
        let url = "redis://redis@h:6379";
        assert_eq!(
            redact_in(&format!("{url}: redis said no"), url),
            "redis://***@h:6379: *** said no"
        );
        assert_eq!(redact_in("no url here", "not a url"), "no url here");
    }
}
