//! The smallest real set-up: a RabbitMQ consumer with Redis dedup.
//!
//! ```text
//! cargo run --example rabbitmq_redis [-- --queue charges]
//! ```
//!
//! Publishes one charge twice (as a publisher retry or a redelivery would) to the queue
//! `charges` (declared if missing), consumes both copies with a worker whose consumer
//! `billing` keeps its dedup records in Redis (under the key prefix of the queue's name),
//! and stops once both are settled. The handler runs once; the second copy is acked as
//! a duplicate. Ends with `summary: processed=1 duplicates=1 retries=0 dead_lettered=0`.
//! Needs RabbitMQ (`AMQP_URL`) and Redis (`REDIS_URL`); the README says how to run them.
//! The queues are left in place, as a consumer's would be.

use idem::amqp::{Publisher, Topology, Worker};
use idem::redis::RedisStore;
use idem::{Consumer, IdempotencyKey, Json, Message};

#[derive(serde::Deserialize)]
struct Charge {
    cents: u64,
}

async fn charge(key: IdempotencyKey, Json(c): Json<Charge>) {
    println!("charging {} cents for {key}", c.cents);
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let amqp = idem::amqp::amqp_url_from_env();
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let queue = idem_examples::arg("--queue").unwrap_or_else(|| "charges".into());

    // Declare the queues first, so that the messages published below are routed.
    let topology = Topology::new(queue.as_str());
    let admin = idem::amqp::connect(&amqp, "rabbitmq-redis-example").await;
    let admin = admin.map_err(|e| missing("RabbitMQ", e))?;
    topology.declare_on(&admin.create_channel().await?).await?;

    let publisher = Publisher::connect(&amqp).await?;
    let id = format!("charge-{}", uuid::Uuid::now_v7());
    for _ in 0..2 {
        let mut msg = Message::new(r#"{"cents":500}"#).with_message_id(&id);
        publisher.publish("", &queue, &mut msg).await?; // confirmed by the broker
    }

    let store = RedisStore::builder(&redis)
        .prefix(queue.as_str())
        .connect()
        .await;
    let store = store.map_err(|e| missing("Redis", e))?;
    let consumer = Consumer::builder("billing").store(store).handler(charge)?;
    let (settled, mut settles) = tokio::sync::mpsc::unbounded_channel();
    let worker = Worker::builder(&amqp, topology, consumer)
        .concurrency(1) // one at a time: the copy finds the first one done, not running
        .on_settle(move |_| {
            let _ = settled.send(());
        })
        .build()?;
    let both_settled = async move {
        for _ in 0..2 {
            settles.recv().await;
        }
    };
    let stats = worker.run(both_settled).await?; // then a graceful stop
    println!("summary: {stats}");
    Ok(())
}

/// The error for a service that cannot be reached.
fn missing(service: &str, error: impl std::fmt::Display) -> String {
    format!("{service} is not reachable: {error}\n(see \"Running the tests\" in the README: it lists the services and how to start them)")
}
