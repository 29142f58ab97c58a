//! Criterion benchmark of the full stack (filled in below).
fn main() {}
