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

/// Replaces the password of a `scheme://user:password@host/...` URL (or a lone user
/// name, which may be a token) with `***`
/// (re-exported from `idem_core`, so every idem crate redacts the same way).
///
/// ```
/// use idem_amqp::redact_url;
/// assert_eq!(redact_url("amqp://app:s3cret@mq:5672/%2f"), "amqp://app:***@mq:5672/%2f");
/// assert_eq!(redact_url("amqp://mq:5672"), "amqp://mq:5672");
/// ```
pub use idem_core::redact::redact_url;

/// Removes the URL's password from a free-form error text.
pub(crate) fn scrub(text: &str, url: &str) -> String {
    idem_core::redact::redact_in(text, url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_password_from_text() {
        let url = "amqp://app:hunter2@mq/%2f";
        let text = format!("failed to reach {url}: auth hunter2 refused");
        let clean = scrub(&text, url);
        assert!(!clean.contains("hunter2"), "{clean}");
        assert!(clean.contains("amqp://app:***@mq/%2f"));
    }
}
