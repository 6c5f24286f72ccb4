//! Delivery: the one place that turns a publication into the frame a subscriber
//! gets, and hands it to this node's subscribers.
//!
//! A publication's frame is built once per node, whichever way it came (live from
//! the broker, repaired from history by the broker's tracker, or replayed by a
//! recovery in the hub), and the same bytes go to every local subscriber. A frame
//! fanned out is [shared](Frame::shared): its compressed form, when a connection
//! negotiated compression, is built once too, by the first writer that needs it,
//! and every other one writes the same bytes. The
//! broker only carries publications: it calls [`Delivery::deliver`] and
//! [`Delivery::gap`] and never builds a frame itself. Requests that other nodes
//! forward to this node's streaming sessions arrive beside them (`streams`), and
//! the server API's commands on users (`users`).

use std::sync::Arc;

use crate::frame::Frame;
use crate::metrics::Metrics;
use crate::protocol;
use crate::publication::{Kind, Position, Publication};
use crate::registry::Registry;
use crate::streams::Streams;
use crate::telemetry::Tracing;
use crate::users::Users;

/// The frame clients get for one publication of `channel`: a message, or a presence
/// `join`/`leave`.
pub fn frame(channel: &str, publication: &Publication) -> Frame {
    let frame = match publication.kind {
        Kind::Message => protocol::encode_publication(channel, publication),
        Kind::Join | Kind::Leave => protocol::encode_presence_event(channel, publication),
    };
    match &publication.position {
        Some(position) => frame.with_positions(vec![(channel.to_owned(), position.clone())]),
        None => frame,
    }
}

/// Where a broker hands the publications that reach this node.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Where the subscribers are.
    pub registry: Registry,
    /// Where deliveries are counted.
    pub metrics: Arc<Metrics>,
    /// Where delivery spans go.
    pub tracing: Tracing,
    /// This node's streaming sessions, where requests forwarded from other nodes go.
    pub streams: Streams,
    /// This node's connections by user, where the server API's commands go.
    pub users: Arc<Users>,
}

impl Delivery {
    /// A node's delivery over `registry`, with fresh metrics and no traces: what
    /// unit tests of the broker and the tracker deliver through.
    #[cfg(test)]
    pub(crate) fn for_tests(registry: Registry) -> Delivery {
        Delivery {
            registry,
            metrics: Arc::new(Metrics::new()),
            tracing: Tracing::disabled(),
            streams: Default::default(),
            users: Default::default(),
        }
    }

    /// Builds the frame of one publication (once for this node) and hands it to the
    /// local subscribers of `channel`, inside a delivery span when the publication
    /// is traced. Never waits. Returns the frame, for the node's cache of recent
    /// history to keep (a replay from it sends these bytes again).
    pub fn deliver(&self, channel: &str, publication: &Publication) -> Frame {
        let frame = frame(channel, publication).shared();
        let delivered = self.tracing.deliver(channel, &publication.traceparent, || {
            let delivered = self
                .registry
                .fanout(channel, &frame, publication.position.as_ref());
            self.metrics
                .bytes_sent
                .inc_by((delivered * frame.len()) as u64);
            delivered
        });
        self.metrics.messages_delivered.inc_by(delivered as u64);
        frame
    }

    /// Tells the local subscribers of `channel` that publications up to `position`
    /// were lost (the history no longer holds them): they reload their state.
    pub fn gap(&self, channel: &str, position: &Position) {
        let frame = protocol::encode_gap(channel, position)
            .with_positions(vec![(channel.to_owned(), position.clone())]);
        self.registry.fanout_gap(channel, &frame, position);
        self.metrics.history_gap("lost");
        tracing::warn!(channel, epoch = %position.epoch, offset = position.offset, "history gap: subscribers told to reload");
    }
}
