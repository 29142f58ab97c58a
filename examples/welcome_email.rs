//! Welcome e-mails, at-least-once: the case where a rare duplicate is acceptable.
//!
//! ```text
//! cargo run --example welcome_email [-- --users 20 --queue welcome-email]
//! ```
//!
//! A sign-up service publishes one message per new user; this worker sends the welcome
//! mail. The mail server fails now and then:
//! - for some users it refuses the connection before sending: a transient error, the
//!   message is retried after a delay (a message in the broker's delay queue), and the
//!   mail goes out once;
//! - for some users it times out *after* the mail went out: the handler cannot know, so
//!   the message is retried and the user gets the mail twice.
//!
//! No dedup store here (delivery mode at-least-once): a second welcome mail is a small
//! annoyance, not worth a store round trip per message. Nothing is lost: every user gets
//! the mail. Ends with `summary: users=N mails_sent=M duplicate_mails=D retries=R
//! dead_lettered=0`. The queues are declared at start (purged if they exist) and
//! deleted at the end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem::amqp::{Publisher, Topology, Worker};
use idem::{Attempt, Backoff, Consumer, DeliveryMode, Jitter, Json, Message, ResultExt, State};
use idem_examples::{describe, Finished};

#[derive(serde::Serialize, serde::Deserialize)]
struct SignedUp {
    user: u32,
    email: String,
}

/// A mail server that misbehaves for some users, the same way on every run.
#[derive(Clone, Default)]
struct Mailer {
    sent: Arc<Mutex<HashMap<String, u32>>>,
}

#[derive(Debug)]
struct MailError(&'static str);

impl std::fmt::Display for MailError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}
impl std::error::Error for MailError {}

impl Mailer {
    async fn send(&self, user: u32, email: &str, attempt: u32) -> Result<(), MailError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if user % 5 == 2 && attempt == 1 {
            return Err(MailError("mail server refused the connection"));
        }
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        *sent.entry(email.to_owned()).or_default() += 1;
        if user % 7 == 3 && attempt == 1 {
            return Err(MailError("mail server timed out after accepting the mail"));
        }
        Ok(())
    }
}

async fn send_welcome(
    State(mailer): State<Mailer>,
    Attempt(attempt): Attempt,
    Json(event): Json<SignedUp>,
) -> Result<(), idem::HandlerError> {
    mailer
        .send(event.user, &event.email, attempt)
        .await
        .transient()?;
    println!(
        "mail     user {:>2} <{}> welcome mail sent (attempt {attempt})",
        event.user, event.email
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let users: u32 = idem_examples::arg("--users")
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let queue = idem_examples::arg("--queue").unwrap_or_else(|| "welcome-email".to_owned());
    let url = idem_examples::amqp_url();
    let admin = idem_examples::rabbit().await?;
    let ch = admin.create_channel().await?;

    let tiers = idem::amqp::DelayTiers::new([Duration::from_secs(1), Duration::from_secs(3)])
        .ok_or("no tiers")?;
    let topology = Topology::new(queue.clone()).tiers(tiers);
    topology.delete_on(&ch).await?;
    topology.declare_on(&ch).await?;
    println!(
        "queue    {queue} (retry tiers 1s, 3s; dead letters in {})",
        topology.dlq()
    );

    let publisher = Publisher::connect(&url).await?;
    for user in 1..=users {
        let body = serde_json::to_vec(&SignedUp {
            user,
            email: format!("user{user}@example.com"),
        })?;
        let mut msg = Message::new(body)
            .with_message_id(format!("signup-{user}"))
            .with_content_type("application/json");
        publisher.publish("", &queue, &mut msg).await?;
    }
    println!("publish  {users} sign-up events (confirmed by the broker)");

    let mailer = Mailer::default();
    let consumer = Consumer::builder("welcome-email")
        .mode(DeliveryMode::AtLeastOnce)
        .backoff(
            Backoff::exponential(Duration::from_secs(1))
                .jitter(Jitter::None)
                .max_attempts(5),
        )
        .handler_with_state(send_welcome, mailer.clone())?;
    let finished = Finished::new(u64::from(users));
    let f = finished.clone();
    let worker = Worker::builder(&url, topology.clone(), consumer)
        .prefetch(10)
        .on_settle(move |s| {
            if !matches!(s.disposition, idem::Disposition::Ack { .. }) {
                println!("settle   {}", describe(&s));
            }
            f.record(&s);
        })
        .build()?;
    let stats =
        idem_examples::run_until_finished(worker.spawn(), &finished, Duration::from_secs(60))
            .await?;

    let sent = mailer
        .sent
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mails: u32 = sent.values().sum();
    let duplicates: u32 = sent.values().map(|n| n.saturating_sub(1)).sum();
    let missing = users as usize - sent.len();
    topology.delete_on(&ch).await?;
    let _ = admin.close(200, "bye".into()).await;
    println!("every user got the welcome mail: {}", missing == 0);
    println!(
        "summary: users={users} mails_sent={mails} duplicate_mails={duplicates} retries={} dead_lettered={}",
        stats.retries, stats.dead_lettered
    );
    Ok(())
}
