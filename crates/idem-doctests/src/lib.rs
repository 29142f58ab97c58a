//! Doc tests of the workspace's Markdown: every Rust code block of the README and of
//! the guides under `docs/` is compiled by `cargo test --workspace` (blocks marked
//! `no_run` are compiled only; the others also run), with warnings denied as in the
//! facade crate's own doc tests. A snippet that no longer matches the API fails the
//! build here instead of misleading a reader.
//!
//! To check them alone: `cargo test -p idem-doctests --doc`.

#![doc(test(attr(deny(warnings), allow(dead_code, unused_variables))))]

/// The README's snippets.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct Readme;

/// The snippets of `docs/operations.md`.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/operations.md")]
pub struct Operations;

/// The snippets of `docs/batch.md`.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/batch.md")]
pub struct Batch;

/// The snippets of `docs/stores.md`.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/stores.md")]
pub struct Stores;

/// The snippets of `docs/transport.md`.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/transport.md")]
pub struct Transport;

/// The snippets of `docs/ordering.md`.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/ordering.md")]
pub struct Ordering;

/// The snippets of `docs/testing.md`.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/testing.md")]
pub struct Testing;
