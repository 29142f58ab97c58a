//! Runnable examples of idem: see `cargo run --example NAME`.
