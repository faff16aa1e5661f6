//! Acknowledgements of one Redis Streams consumer group, sent in batches: one `XACK` names
//! every entry settled since the last one.
//!
//! An `XACK` per entry costs a round trip and a Redis command each, as much as the read of
//! the entry. Unlike RabbitMQ's tags, entries are acknowledged by id, in any order, so a batch
//! is simply what gathered. One task at a time sends, started by the first settlement while
//! none is sending; it lets settlements gather for [`ACK_LINGER`] before each `XACK`. An entry
//! counts as in flight until the `XACK` that names it is answered; one that fails stays
//! pending in the group and is claimed again, then recognised by its processed-marker.

use std::sync::{Arc, Mutex};

use redis::aio::MultiplexedConnection;
use tokio::sync::oneshot;

use super::{ACK_LINGER, Done, SETTLE_TIMEOUT};

/// The entries of one (stream, group) settled and not acknowledged yet.
pub(crate) struct StreamAcks {
    conn: MultiplexedConnection,
    stream: String,
    group: String,
    gathered: Mutex<Gathered>,
}

#[derive(Default)]
struct Gathered {
    ids: Vec<String>,
    done: Vec<Done>,
    /// A sender is gathering or sending; it also sends what gathers meanwhile.
    sending: bool,
}

impl StreamAcks {
    pub(crate) fn new(conn: MultiplexedConnection, stream: String, group: String) -> Self {
        StreamAcks { conn, stream, group, gathered: Mutex::new(Gathered::default()) }
    }

    /// Acknowledge entry `id` with the next batch; `done` is dropped once that `XACK` is
    /// answered (or failed).
    pub(crate) fn ack(self: &Arc<Self>, id: String, done: Done) {
        let start = {
            let mut gathered = self.lock();
            gathered.ids.push(id);
            gathered.done.push(done);
            !std::mem::replace(&mut gathered.sending, true)
        };
        if start && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(self.clone().send());
        }
    }

    /// Acknowledge entry `id` and wait until the `XACK` that names it is answered.
    pub(crate) async fn ack_and_wait(self: &Arc<Self>, id: String) {
        let (done, sent) = oneshot::channel::<()>();
        self.ack(id, Box::new(done));
        // Dropping `done` ends the wait: the XACK was answered, or failed.
        let _ = sent.await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Gathered> {
        self.gathered.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Let settlements gather, acknowledge them, and go on while more gather.
    async fn send(self: Arc<Self>) {
        loop {
            tokio::time::sleep(ACK_LINGER).await;
            let (ids, done) = {
                let mut gathered = self.lock();
                if gathered.ids.is_empty() {
                    gathered.sending = false;
                    return;
                }
                (std::mem::take(&mut gathered.ids), std::mem::take(&mut gathered.done))
            };
            let mut conn = self.conn.clone();
            let acked = tokio::time::timeout(
                SETTLE_TIMEOUT,
                redis::AsyncCommands::xack::<_, _, _, i64>(&mut conn, &self.stream, &self.group, &ids),
            );
            let (stream, entries) = (&self.stream, ids.len());
            match acked.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, stream, entries, "XACK failed; the entries will be claimed again")
                }
                Err(_) => tracing::warn!(stream, entries, "XACK timed out; the entries will be claimed again"),
            }
            drop(done);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::AsyncCommands;

    /// Calls of `command` Redis has served, from `INFO commandstats`.
    async fn calls(conn: &mut MultiplexedConnection, command: &str) -> u64 {
        let info: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await.unwrap();
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    }

    /// Against the real Redis on loopback (`scripts/services` starts it).
    #[tokio::test]
    async fn entries_settled_together_are_acknowledged_by_one_xack() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let stream = format!("stream-acks-{}", uuid::Uuid::new_v4().simple());
        let () = conn.xgroup_create_mkstream(&stream, "g", "0").await.unwrap();
        for i in 0..200 {
            let _: String = conn.xadd(&stream, "*", &[("n", i)]).await.unwrap();
        }
        let options = redis::streams::StreamReadOptions::default().group("g", "c").count(200);
        let read: redis::streams::StreamReadReply = conn.xread_options(&[&stream], &[">"], &options).await.unwrap();
        let ids: Vec<String> = read.keys.into_iter().flat_map(|k| k.ids).map(|e| e.id).collect();
        assert_eq!(ids.len(), 200);

        let before = calls(&mut conn, "xack").await;
        let acks = Arc::new(StreamAcks::new(conn.clone(), stream.clone(), "g".into()));
        let mut sent = Vec::new();
        for id in ids {
            let (done, acked) = oneshot::channel::<()>();
            acks.ack(id, Box::new(done));
            sent.push(acked);
        }
        for acked in sent {
            let _ = acked.await;
        }
        let pending: redis::streams::StreamPendingReply = conn.xpending(&stream, "g").await.unwrap();
        assert_eq!(pending.count(), 0, "every entry is acknowledged once its done is dropped");
        let xacks = calls(&mut conn, "xack").await - before;
        assert!((1..10).contains(&xacks), "200 entries settled at once take one XACK, not {xacks}");
        let _: i64 = conn.del(&stream).await.unwrap();
    }
}
