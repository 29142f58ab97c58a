//! Connection URLs: defaults and credential redaction.
//!
//! Every URL idem prints (logs, errors, `Debug`) goes through [`redact_url`] first, so
//! a password never reaches a log line.

/// The URL used when neither the caller nor `AMQP_URL` gives one.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// `AMQP_URL` from the environment, else [`DEFAULT_AMQP_URL`].
pub fn amqp_url_from_env() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned())
}

/// Replaces the password of a `scheme://user:password@host/...` URL with `***`.
///
/// URLs without a password are returned unchanged.
///
/// ```
/// use idem_amqp::redact_url;
/// assert_eq!(redact_url("amqp://app:s3cret@mq:5672/%2f"), "amqp://app:***@mq:5672/%2f");
/// assert_eq!(redact_url("amqp://mq:5672"), "amqp://mq:5672");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let start = scheme_end + 3;
    let rest = &url[start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    match authority[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..start],
            &authority[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// Removes the URL's password (raw or percent-encoded) from a free-form error text.
pub(crate) fn scrub(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &redact_url(url));
    if let Some(password) = password_of(url) {
        if !password.is_empty() {
            out = out.replace(password, "***");
        }
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
    use super::*;

    #[test]
    fn redacts_password_only() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("amqps://u:p%40ss@host/vh?heartbeat=10"),
            "amqps://u:***@host/vh?heartbeat=10"
        );
        // An '@' in the path is not userinfo.
        assert_eq!(redact_url("amqp://host/v@h"), "amqp://host/v@h");
        assert_eq!(redact_url("amqp://user@host"), "amqp://user@host");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(redact_url("amqp://:pw@h"), "amqp://:***@h");
    }

    #[test]
    fn scrub_removes_password_from_text() {
        let url = "amqp://app:hunter2@mq/%2f";
        let text = format!("failed to reach {url}: auth hunter2 refused");
        let clean = scrub(&text, url);
        assert!(!clean.contains("hunter2"), "{clean}");
        assert!(clean.contains("amqp://app:***@mq/%2f"));
    }
}
