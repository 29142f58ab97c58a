//! A batch handler over the Redis store: one batch of 20 messages with every
//! per-message outcome costs one claim call, one completion call and one release
//! call (`idem_testkit::lease_batch`). REDIS_URL, default redis://127.0.0.1:6379.

use std::sync::Arc;

use idem_testkit::{lease_batch, unique};

mod common;
use common::{cleanup, store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_claim_call_and_one_completion_call_per_batch() {
    let prefix = unique("lease-batch");
    let s = store(&prefix).await;
    lease_batch::check(Arc::new(s.clone()), &unique("batch")).await;
    cleanup(&s).await;
}
