//! The consumer outbox: a handler on idem-sql's PostgreSQL inbox publishes follow-up
//! messages in the transaction that holds its effect and its dedup row.
//!
//! [`Outbox::enqueue_follow_up`] writes the message into the outbox through the
//! handler's [`Tx`](idem_sql::Tx) (on its locked connection, [`TxConn`]), so the effect, the inbox row and the follow-ups commit together
//! or not at all: a rollback (an error, a crash before commit) publishes nothing.
//!
//! **Deterministic ids.** A follow-up's idempotency key (its AMQP `message_id`) is not
//! random: it is a UUIDv5 of the consumer name, the incoming message's key and the
//! follow-up's name, where the name is its position in the handler run (0, 1, ...,
//! see [`Tx::next_follow_up`](idem_sql::Tx::next_follow_up)) or one the handler chooses
//! ([`Outbox::enqueue_follow_up_named`]). A re-run of the handler after a crash before
//! commit therefore enqueues the *same* ids again instead of new ones, and the
//! outbox table's unique `message_id` refuses a second row with an id that already
//! committed. Downstream, a consumer's dedup absorbs a relay's re-publish of the same
//! id. Positions assume the handler publishes its follow-ups in a fixed order for a
//! given message; a handler whose follow-ups depend on data that may change between
//! runs should name them.
//!
//! The ids are scoped by consumer: two consumers handling the same message (fan-out)
//! publish distinct follow-ups. A key reused after the inbox forgot it (retention)
//! derives the same ids again: while the outbox still holds those rows (until
//! [`Outbox::cleanup`] removes published rows), the enqueue fails with a unique
//! violation instead of publishing a message the consumers downstream would take for
//! a duplicate.

use idem_sql::TxConn;
use sqlx::Postgres;
use uuid::Uuid;

use crate::error::OutboxError;
use crate::message::OutboxMessage;
use crate::schema::Outbox;

/// The UUIDv5 namespace of follow-up ids (fixed forever: changing it would give a
/// re-run after an upgrade different ids).
const FOLLOW_UP_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2b7e_9a3d_4c55_8e21_d0b4_7a96_e3f1);

/// How a follow-up is named within its handler run.
enum Name<'a> {
    Position(u32),
    Given(&'a str),
}

/// The id of follow-up `name` of the message with key `key` handled by consumer
/// `consumer`. Positions and given names are tagged apart, so position 0 and the
/// name "0" give different ids.
fn derive(consumer: &str, key: &str, name: Name<'_>) -> Uuid {
    // Length-prefixed parts: no two (consumer, key, name) triples share an input.
    let mut input = Vec::with_capacity(consumer.len() + key.len() + 48);
    for part in [consumer.as_bytes(), key.as_bytes()] {
        input.extend_from_slice(part.len().to_string().as_bytes());
        input.push(b':');
        input.extend_from_slice(part);
    }
    match name {
        Name::Position(n) => {
            input.extend_from_slice(b"p:");
            input.extend_from_slice(n.to_string().as_bytes());
        }
        Name::Given(name) => {
            input.extend_from_slice(b"n:");
            input.extend_from_slice(name.as_bytes());
        }
    }
    Uuid::new_v5(&FOLLOW_UP_NAMESPACE, &input)
}

/// The id [`Outbox::enqueue_follow_up_named`] gives the follow-up `name` of the
/// message with idempotency key `key` handled by consumer `consumer` (for tests and
/// for checking a downstream record against its source).
pub fn follow_up_id(consumer: &str, key: &str, name: &str) -> Uuid {
    derive(consumer, key, Name::Given(name))
}

/// The id [`Outbox::enqueue_follow_up`] gives the follow-up at `position` (0-based) of
/// the message with idempotency key `key` handled by consumer `consumer`.
pub fn follow_up_id_at(consumer: &str, key: &str, position: u32) -> Uuid {
    derive(consumer, key, Name::Position(position))
}

impl Outbox {
    /// Enqueues `msg` as the next follow-up of the message the handler is processing,
    /// in the handler's inbox transaction: published only if the handler returns
    /// `Ok` and the inbox commits. Its id replaces `msg`'s own: derived from the
    /// consumer, the incoming key and the follow-up's position in this run (see the
    /// [module docs](crate::follow_up)). Returns that id.
    ///
    /// ```no_run
    /// use idem_core::{HandlerError, State};
    /// use idem_outbox::{Outbox, OutboxMessage};
    /// use idem_sql::Tx;
    /// use sqlx::Postgres;
    ///
    /// async fn deposit(tx: Tx<Postgres>, State(outbox): State<Outbox>) -> Result<(), HandlerError> {
    ///     let mut conn = tx.conn().await?;
    ///     sqlx::query("UPDATE accounts SET cents = cents + 500 WHERE id = 2")
    ///         .execute(&mut *conn)
    ///         .await?;
    ///     let announce = OutboxMessage::new("", "deposits.applied", br#"{"to":2}"#.to_vec());
    ///     outbox.enqueue_follow_up(&mut conn, announce).await?;
    ///     Ok(())
    /// }
    /// ```
    ///
    /// It takes the locked transaction ([`Tx::conn`](idem_sql::Tx::conn)), the same
    /// guard the handler runs its own statements on, so a handler never waits on a
    /// lock it holds itself.
    pub async fn enqueue_follow_up(
        &self,
        conn: &mut TxConn<'_, Postgres>,
        msg: OutboxMessage,
    ) -> Result<Uuid, OutboxError> {
        let id = derive(
            conn.consumer(),
            conn.key(),
            Name::Position(conn.next_follow_up()),
        );
        self.enqueue(conn, msg.with_id(id)).await
    }

    /// Like [`enqueue_follow_up`](Self::enqueue_follow_up), with the id derived from
    /// `name` instead of the position: for handlers whose follow-ups are not always
    /// published in the same order. Each name may be used once per message: a second
    /// follow-up with the same name is refused by the outbox's unique id (a database
    /// error; the transaction is then aborted and the message is retried).
    pub async fn enqueue_follow_up_named(
        &self,
        conn: &mut TxConn<'_, Postgres>,
        name: &str,
        msg: OutboxMessage,
    ) -> Result<Uuid, OutboxError> {
        let id = derive(conn.consumer(), conn.key(), Name::Given(name));
        self.enqueue(conn, msg.with_id(id)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = follow_up_id_at("billing", "m-1", 0);
        assert_eq!(
            a,
            follow_up_id_at("billing", "m-1", 0),
            "same input, same id"
        );
        assert_eq!(a.get_version_num(), 5);
        let others = [
            follow_up_id_at("billing", "m-1", 1),
            follow_up_id_at("billing", "m-2", 0),
            follow_up_id_at("audit", "m-1", 0),
            follow_up_id("billing", "m-1", "0"),
            follow_up_id("billing", "m-1", "#0"),
            // Parts are length-prefixed: shifting a character between them changes the id.
            follow_up_id_at("billin", "gm-1", 0),
        ];
        for (i, o) in others.iter().enumerate() {
            assert_ne!(&a, o, "collision with case {i}");
        }
    }
}
