//! Error classification: transient (retry) or permanent (dead-letter at once).
//!
//! [`ClassifyLayer`] sits right around the handler stack. It catches panics (transient,
//! with the panic message), accepts any error that converts into a [`BoxError`](crate::BoxError) (so
//! tower's `Timeout` and friends can sit below it), and gives every error a definite
//! [`ErrorKind`]: the one set at the `?` site if any, else the [`Classify`] policy's.
//!
//! ```
//! use idem_core::classify::ClassifyLayer;
//! use idem_core::ErrorKind;
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("card declined")]
//! struct Declined;
//!
//! // Foreign errors are mapped by a closure; `None` falls through to the default policy.
//! let layer = ClassifyLayer::new(|e: &(dyn std::error::Error + 'static)| {
//!     e.is::<Declined>().then_some(ErrorKind::Permanent)
//! });
//! # let _ = layer;
//! ```

mod layer;

pub(crate) use layer::panic_message;
pub use layer::{ClassifyLayer, ClassifyService, PanicError};

use std::error::Error as StdError;

use crate::error::ErrorKind;

/// Decides the kind of an error the handler did not classify itself.
pub trait Classify: Send + Sync + 'static {
    /// The kind, or `None` to defer to [`DefaultClassifier`].
    fn classify(&self, error: &(dyn StdError + 'static)) -> Option<ErrorKind>;
}

impl<F> Classify for F
where
    F: Fn(&(dyn StdError + 'static)) -> Option<ErrorKind> + Send + Sync + 'static,
{
    fn classify(&self, error: &(dyn StdError + 'static)) -> Option<ErrorKind> {
        self(error)
    }
}

/// The default policy: content errors are permanent, everything else transient.
///
/// Permanent: `serde_json` syntax/data errors, UTF-8 errors, integer/float parse errors
/// (anywhere in the `source()` chain). Transient: all else, timeouts included: an
/// unknown error is assumed to be technical, so it is retried, never dropped. tower's
/// middleware errors fall in this class too: `Elapsed` from a timeout layer, and
/// `Overloaded` from a `LoadShedLayer` under the handler (a shed delivery is retried
/// after its backoff delay, spending an attempt; see
/// [Tower layers under the handler](crate::consumer#tower-layers-under-the-handler)).
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultClassifier;

impl Classify for DefaultClassifier {
    fn classify(&self, error: &(dyn StdError + 'static)) -> Option<ErrorKind> {
        let mut cur: Option<&(dyn StdError + 'static)> = Some(error);
        while let Some(e) = cur {
            if let Some(j) = e.downcast_ref::<serde_json::Error>() {
                if !j.is_io() {
                    return Some(ErrorKind::Permanent);
                }
            }
            if e.is::<std::str::Utf8Error>()
                || e.is::<std::string::FromUtf8Error>()
                || e.is::<std::num::ParseIntError>()
                || e.is::<std::num::ParseFloatError>()
            {
                return Some(ErrorKind::Permanent);
            }
            cur = e.source();
        }
        Some(ErrorKind::Transient)
    }
}

impl Classify for () {
    fn classify(&self, _error: &(dyn StdError + 'static)) -> Option<ErrorKind> {
        None
    }
}

pub(crate) fn resolve(policy: &dyn Classify, error: &(dyn StdError + 'static)) -> ErrorKind {
    policy
        .classify(error)
        .or_else(|| DefaultClassifier.classify(error))
        .unwrap_or(ErrorKind::Transient)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy() {
        let json = serde_json::from_str::<u32>("x").unwrap_err();
        assert_eq!(resolve(&(), &json), ErrorKind::Permanent);
        let io = std::io::Error::other("connection reset");
        assert_eq!(resolve(&(), &io), ErrorKind::Transient);
        let parse = "x".parse::<u8>().unwrap_err();
        assert_eq!(resolve(&(), &parse), ErrorKind::Permanent);
    }

    #[test]
    fn custom_policy_wins_and_falls_through() {
        let custom =
            |e: &(dyn StdError + 'static)| e.is::<std::io::Error>().then_some(ErrorKind::Permanent);
        let io = std::io::Error::other("x");
        assert_eq!(resolve(&custom, &io), ErrorKind::Permanent);
        let json = serde_json::from_str::<u32>("x").unwrap_err();
        assert_eq!(resolve(&custom, &json), ErrorKind::Permanent);
    }
}
