//! The store conformance suite is usable from a project that is not this workspace,
//! the way docs/testing.md tells a store author to use it: a crate of its own, with
//! idem (here by path, as a published version would be) and only the `conformance`
//! feature in its dev-dependencies, whose own store (a wrapper around
//! `MemoryStore`) passes `idem::conformance::run`.
//!
//! The crate is written to a temporary directory and tested with `cargo test
//! --offline` (every crate it needs is already in the local registry, since this
//! workspace uses them). Its build goes to `target/out-of-tree`, so later runs reuse
//! it. The first run compiles idem-core and its dependencies once more (a minute or
//! two on a small machine).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

const MANIFEST: &str = r#"[package]
name = "my-store"
version = "0.1.0"
edition = "2021"
publish = false

[workspace]

[dependencies]
idem = { path = "IDEM", default-features = false }
async-trait = "0.1"

[dev-dependencies]
idem = { path = "IDEM", default-features = false, features = ["conformance"] }
tokio = { version = "1", features = ["rt-multi-thread", "macros"] }
"#;

/// A store of "someone else's": it delegates to `MemoryStore`, as a real one would
/// to its database.
const LIB: &str = r#"
use idem::dedup::{
    Claim, ClaimRequest, Completion, DedupStore, HeldClaim, StoreResult, Terms,
};
use idem::MemoryStore;

#[derive(Clone, Debug, Default)]
pub struct MyStore(MemoryStore);

#[async_trait::async_trait]
impl DedupStore for MyStore {
    async fn claim(&self, req: &ClaimRequest, terms: Terms) -> StoreResult<Claim> {
        self.0.claim(req, terms).await
    }
    async fn extend(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool> {
        self.0.extend(held, terms).await
    }
    async fn complete(&self, held: &HeldClaim, how: Completion, terms: Terms) -> StoreResult<bool> {
        self.0.complete(held, how, terms).await
    }
    async fn release(&self, held: &HeldClaim) -> StoreResult<bool> {
        self.0.release(held).await
    }
    async fn reopen_poisoned(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool> {
        self.0.reopen_poisoned(held, terms).await
    }
}
"#;

const TEST: &str = r#"
#[tokio::test]
async fn my_store_passes_the_conformance_suite() {
    let scope = format!("my-store-{}", std::process::id());
    idem::conformance::run(&my_store::MyStore::default(), &scope).await;
}
"#;

#[test]
fn conformance_suite_runs_from_a_crate_outside_the_workspace() {
    let root = workspace();
    let dir = std::env::temp_dir().join(format!("idem-out-of-tree-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::create_dir_all(dir.join("tests")).unwrap();
    let idem = root.join("crates/idem").canonicalize().unwrap();
    let manifest = MANIFEST.replace("IDEM", idem.to_str().unwrap());
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
    std::fs::write(dir.join("src/lib.rs"), LIB).unwrap();
    std::fs::write(dir.join("tests/conformance.rs"), TEST).unwrap();
    // The lock file of this workspace pins the versions it was tested with.
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();

    let out = Command::new(env!("CARGO"))
        .args(["test", "--offline", "--quiet"])
        .current_dir(&dir)
        .env("CARGO_TARGET_DIR", root.join("target/out-of-tree"))
        .env_remove("RUSTFLAGS")
        .output()
        .expect("cargo runs");
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the out-of-tree crate failed:\n{text}"
    );
    assert!(
        text.contains("1 passed"),
        "its conformance test did not run:\n{text}"
    );
}
