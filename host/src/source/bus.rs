//! The in-process bus: the source and sink when no broker is configured, so the router and
//! its demo run anywhere. Events published by plugins come back through it.
//!
//! It keeps nothing on disk: events fed to it and not yet handled are lost if the process
//! dies (the outbox rows that plugins wrote are durable and are sent again on restart).

use std::path::Path;
use std::sync::Arc;

use crate::commit::Writer;
use crate::dispatch::dead_letter_undecodable;
use crate::envelope::{self, Transport};
use crate::event::{Event, Millis};
use crate::plugins::PluginSet;
use crate::source::{Ack, InFlight, Received, hand_to_subscribers};

/// Owner name of messages the bus could not decode.
pub const BUS_OWNER: &str = "bus";

/// The in-process bus.
pub struct Bus {
    plugins: PluginSet,
    writer: Writer,
    in_flight: Arc<InFlight>,
}

impl Bus {
    pub fn new(plugins: PluginSet, writer: Writer, in_flight: Arc<InFlight>) -> Self {
        Bus { plugins, writer, in_flight }
    }

    /// Hand an event to every plugin subscribed to its name; returns how many.
    pub async fn publish(&self, event: Event, received: Received) -> usize {
        hand_to_subscribers(&self.plugins, event, received, &self.in_flight).await
    }

    /// Decode and publish one message as a broker would have delivered it.
    pub async fn publish_bytes(&self, body: Vec<u8>) {
        let transport = Transport { origin: BUS_OWNER.into(), received_at: Millis::now(), ..Default::default() };
        let received = Received { body, transport };
        match envelope::decode(&received.body, &received.transport) {
            Ok(decoded) => {
                self.publish(decoded.event, received).await;
            }
            Err(e) => {
                let ack = Ack::local(self.in_flight.clone());
                dead_letter_undecodable(&self.writer, BUS_OWNER, received, ack, e.to_string()).await;
            }
        }
    }

    /// Publish every non-empty line of a JSONL file, each one envelope; returns the count.
    pub async fn feed_jsonl(&self, path: &Path) -> std::io::Result<usize> {
        let text = tokio::fs::read_to_string(path).await?;
        let mut count = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            self.publish_bytes(line.as_bytes().to_vec()).await;
            count += 1;
        }
        Ok(count)
    }
}
