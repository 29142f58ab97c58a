//! `Publisher::publish_each`: one result per message, in order, against the real local
//! RabbitMQ (`AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`; see the README
//! section "Set-up"). Unique queue names, deleted at the end.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use idem_amqp::{Error, Outgoing, Publisher};
use idem_core::Message;
use idem_testkit::broker::declare_queue;
use lapin::options::{BasicGetOptions, QueueDeleteOptions};

#[tokio::test]
async fn publish_each_reports_every_message_on_its_own_and_keeps_the_order() {
    let url = idem_amqp::amqp_url_from_env();
    let admin = idem_amqp::connect(&url, "idem-test-publish-each")
        .await
        .unwrap_or_else(|e| {
            panic!("RabbitMQ not reachable: {e}. See the README section Set-up, or set AMQP_URL")
        });
    let ch = admin.create_channel().await.unwrap();
    let queue = format!("idem-test-publish-each-{}", uuid::Uuid::new_v4().simple());
    declare_queue(&ch, &queue).await;
    let missing = format!("{queue}-missing");
    let publisher = Publisher::builder(url.as_str())
        .connection_name("idem-test-publish-each-publisher")
        .build(); // connects on the first publish
    let mut batch = vec![
        Outgoing::new("", queue.as_str(), Message::new("one")),
        Outgoing::new("", missing.as_str(), Message::new("unroutable")),
        Outgoing::new(
            "",
            queue.as_str(),
            Message::new("bad header").with_header("h".repeat(256), "v"),
        ),
        Outgoing::new("", queue.as_str(), Message::new("two")),
    ];
    let results = publisher.publish_each(&mut batch).await.unwrap();
    assert_eq!(results.len(), 4);
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(
        matches!(&results[1], Err(Error::Returned { routing_key, .. }) if *routing_key == missing),
        "{:?}",
        results[1]
    );
    assert!(
        matches!(&results[2], Err(Error::NameTooLong(_))),
        "{:?}",
        results[2]
    );
    assert!(results[3].is_ok(), "{:?}", results[3]);
    // Every message got its id before the first try: a re-publish reuses it.
    assert!(batch
        .iter()
        .all(|o| o.message.properties.message_id.is_some()));

    // A confirmed publish can take a moment to show on another connection: read until
    // both are there (or 5 s passed), then whatever else came.
    let mut bodies = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(m) => bodies.push(String::from_utf8(m.delivery.data).unwrap()),
            None if bodies.len() >= 2 || tokio::time::Instant::now() > deadline => break,
            None => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    assert_eq!(bodies, ["one", "two"]);
    publisher.close().await;
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}
