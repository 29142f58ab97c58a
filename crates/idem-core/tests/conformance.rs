//! The in-memory store against the store conformance suite (`idem_testkit::conformance`),
//! as the Redis and SQL stores are in their own crates' tests.

use std::sync::Arc;

use idem_core::MemoryStore;

#[tokio::test]
async fn memory_store_passes_conformance() {
    let store = MemoryStore::new();
    idem_testkit::conformance::run(&store, "mem").await;
    idem_testkit::conformance::race(Arc::new(store), "mem", 16).await;
}
