//! The in-memory store against the store conformance suite (`idem_testkit::conformance`),
//! as the Redis and SQL stores are in their own crates' tests.

use std::sync::Arc;

use idem_core::MemoryStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_passes_conformance() {
    let store = MemoryStore::new();
    idem_testkit::conformance::run(&store, "mem").await;
    idem_testkit::conformance::race(Arc::new(store.clone()), "mem", 16).await;
    idem_testkit::conformance::concurrent(Arc::new(store), "mem", 64).await;
}
