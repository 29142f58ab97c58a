//! Cross-crate integration tests of idem against real services.
