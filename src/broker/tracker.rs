//! Node-side gap repair: per channel with history and local subscribers, the last
//! offset this node delivered, so that publications reach local subscribers in offset
//! order, each once, even when the Redis pub/sub connection dropped some.
//!
//! The tracker decides and delivers; it does no I/O. The Redis broker feeds it live
//! publications ([`Tracker::on_live`]), positions read from Redis after a (re)subscribe
//! or by the periodic position check ([`Tracker::on_position`]), and the result of the
//! repair reads it asked for ([`Tracker::on_repaired`]). While a repair is in flight,
//! later live publications of the channel wait in a bounded buffer; one that does not
//! fit is dropped, and found again in the stream by the next repair.
//!
//! Why positions read on the subscriber connection need no special care: Redis writes
//! a command's reply and the pushes of other clients' PUBLISHes into the connection
//! in execution order, so the pushes before a position reply have offsets at or
//! below it, and those after it follow it consecutively.

use std::collections::VecDeque;

use dashmap::DashMap;

use super::Local;
use crate::publication::{Epoch, Position, Publication};

/// A range of offsets the tracker needs read from the channel's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Repair {
    /// The channel.
    pub(super) channel: String,
    /// The epoch the range belongs to.
    pub(super) epoch: Epoch,
    /// The last offset delivered: the repair reads from the next one.
    pub(super) after: u64,
    /// The last offset wanted.
    pub(super) upto: u64,
}

#[derive(Debug)]
struct Track {
    epoch: Epoch,
    /// The last offset delivered to local subscribers.
    last: u64,
    /// Created by a live publication before the subscribe's position read: the read
    /// then only raises `last`, since the node was not subscribed before.
    provisional: bool,
    /// A repair read is in flight; live publications wait in `buffer`.
    repairing: bool,
    buffer: VecDeque<Publication>,
    /// The highest offset dropped because the buffer was full (0: none): repaired
    /// from the stream once the buffer is replayed.
    overflow: u64,
    /// Something was delivered since the last position check (so the channel is not
    /// quiet and needs no check).
    active: bool,
}

/// The positions of this node's history channels.
#[derive(Debug)]
pub(super) struct Tracker {
    /// Why a `DashMap`: a delivery holds its channel's entry (that is what orders a
    /// repair's replay before later live publications), and other channels go on.
    tracks: DashMap<String, Track>,
    local: Local,
    /// Most live publications kept per channel while a repair is in flight.
    max_buffer: usize,
    /// Largest gap repaired (`--max-recovery`): subscribers that missed more reload
    /// their state, as a client would after a failed recovery.
    max_repair: u64,
}

impl Tracker {
    pub(super) fn new(local: Local, max_buffer: usize, max_repair: u64) -> Self {
        Tracker {
            tracks: DashMap::new(),
            local,
            max_buffer,
            max_repair,
        }
    }

    /// Starts repairing `track` up to `upto`, or, when that is more than a repair may
    /// replay, reports the gap and moves on.
    fn repair_to(&self, channel: &str, track: &mut Track, upto: u64) -> Option<Repair> {
        if upto - track.last > self.max_repair {
            let position = Position {
                epoch: track.epoch.clone(),
                offset: upto,
            };
            self.local.gap(channel, &position);
            track.last = upto;
            return None;
        }
        track.repairing = true;
        Some(Repair {
            channel: channel.to_owned(),
            epoch: track.epoch.clone(),
            after: track.last,
            upto,
        })
    }

    /// A publication from pub/sub. Returns the repair to start, if it revealed a gap.
    pub(super) fn on_live(&self, channel: &str, publication: Publication) -> Option<Repair> {
        let Some(position) = publication.position.clone() else {
            self.local.deliver(channel, &publication);
            return None;
        };
        let mut track = match self.tracks.get_mut(channel) {
            Some(track) => track,
            None => {
                let mut entry = self.tracks.entry(channel.to_owned()).or_insert(Track {
                    epoch: position.epoch.clone(),
                    last: position.offset.saturating_sub(1),
                    provisional: true,
                    repairing: false,
                    buffer: VecDeque::new(),
                    overflow: 0,
                    active: false,
                });
                return self.advance(channel, &mut entry, publication);
            }
        };
        if track.repairing {
            let stale = position.epoch == track.epoch && position.offset <= track.last;
            if stale {
                self.local.metrics.history_duplicates.inc();
            } else if track.buffer.len() < self.max_buffer {
                track.buffer.push_back(publication);
            } else {
                // It is in the stream: a repair reads it once the buffer is replayed.
                track.overflow = track.overflow.max(position.offset);
            }
            return None;
        }
        self.advance(channel, &mut track, publication)
    }

    /// Delivers `publication` if it is the next one; drops it if it was delivered
    /// already; otherwise starts a repair (the publication waits in the buffer).
    fn advance(
        &self,
        channel: &str,
        track: &mut Track,
        publication: Publication,
    ) -> Option<Repair> {
        let Some(position) = publication.position.clone() else {
            self.local.deliver(channel, &publication);
            return None;
        };
        if position.epoch != track.epoch {
            // The history was lost and started again: what came before this
            // publication in the new epoch may be readable, but the subscribers'
            // positions in the old epoch mean nothing any more.
            self.local.gap(
                channel,
                &Position {
                    epoch: position.epoch.clone(),
                    offset: position.offset - 1,
                },
            );
            track.epoch = position.epoch;
            track.last = position.offset;
            track.active = true;
            self.local.deliver(channel, &publication);
            return None;
        }
        if position.offset <= track.last {
            self.local.metrics.history_duplicates.inc();
            return None;
        }
        if position.offset == track.last + 1 {
            track.last = position.offset;
            track.active = true;
            self.local.deliver(channel, &publication);
            return None;
        }
        match self.repair_to(channel, track, position.offset - 1) {
            Some(repair) => {
                track.buffer.push_front(publication);
                Some(repair)
            }
            None => {
                // Too far behind to repair: reported, and delivery goes on from here.
                track.last = position.offset;
                track.active = true;
                self.local.deliver(channel, &publication);
                None
            }
        }
    }

    /// The channel's position as read from Redis. Returns the repair to start when
    /// the node is behind it.
    pub(super) fn on_position(&self, channel: &str, top: Position) -> Option<Repair> {
        let mut track = self.tracks.entry(channel.to_owned()).or_insert(Track {
            epoch: top.epoch.clone(),
            last: top.offset,
            provisional: false,
            repairing: false,
            buffer: VecDeque::new(),
            overflow: 0,
            active: false,
        });
        if track.provisional {
            track.provisional = false;
            if track.epoch == top.epoch {
                track.last = track.last.max(top.offset);
            }
            return None;
        }
        if track.repairing {
            return None;
        }
        if track.epoch != top.epoch {
            self.local.gap(channel, &top);
            track.epoch = top.epoch;
            track.last = top.offset;
            return None;
        }
        if top.offset <= track.last {
            return None;
        }
        self.repair_to(channel, &mut track, top.offset)
    }

    /// The channel's position read on a new subscriber connection, right after it
    /// subscribed (so every push received before it is at or below it). Like
    /// [`on_position`](Self::on_position), and one more case: a position *below*
    /// what was delivered, in the same epoch, means the history went back — a
    /// failover to a replica that had not received the last writes. Its next
    /// offsets will be given to other publications, which must not be dropped as
    /// duplicates: the subscribers are told with a `gap` at the new position.
    pub(super) fn on_resubscribed(&self, channel: &str, top: Position) -> Option<Repair> {
        if let Some(mut track) = self.tracks.get_mut(channel)
            && !track.provisional
            && !track.repairing
            && track.epoch == top.epoch
            && top.offset < track.last
        {
            tracing::warn!(
                channel,
                delivered = track.last,
                history = top.offset,
                "the history is behind what was delivered (writes lost in a failover)"
            );
            self.local.gap(channel, &top);
            track.last = top.offset;
            track.buffer.clear();
            return None;
        }
        self.on_position(channel, top)
    }

    /// The publications a repair read (oldest first) and the channel's position at
    /// the time. Delivers what is missing, reports what the history no longer holds,
    /// then replays the buffer; returns the next repair if the buffer has a gap again.
    pub(super) fn on_repaired(
        &self,
        repair: &Repair,
        top: Position,
        publications: Vec<Publication>,
    ) -> Option<Repair> {
        let mut track = self.tracks.get_mut(&repair.channel)?;
        if !track.repairing || track.epoch != repair.epoch {
            return None;
        }
        let channel = repair.channel.as_str();
        if top.epoch != track.epoch {
            self.local.gap(channel, &top);
            track.epoch = top.epoch;
            track.last = top.offset;
        } else {
            let mut repaired = false;
            for publication in publications {
                let Some(offset) = publication.offset() else {
                    continue;
                };
                if offset <= track.last || offset > repair.upto {
                    continue;
                }
                if offset > track.last + 1 {
                    // Trimmed or expired out of the stream.
                    self.local.gap(
                        channel,
                        &Position {
                            epoch: track.epoch.clone(),
                            offset: offset - 1,
                        },
                    );
                }
                track.last = offset;
                track.active = true;
                self.local.deliver(channel, &publication);
                self.local.metrics.history_repaired_messages.inc();
                repaired = true;
            }
            if track.last < repair.upto {
                self.local.gap(
                    channel,
                    &Position {
                        epoch: track.epoch.clone(),
                        offset: repair.upto,
                    },
                );
                track.last = repair.upto;
            } else if repaired {
                self.local.metrics.history_gap("repaired");
            }
        }
        track.repairing = false;
        while let Some(publication) = track.buffer.pop_front() {
            if let Some(next) = self.advance(channel, &mut track, publication) {
                return Some(next);
            }
        }
        let overflow = std::mem::take(&mut track.overflow);
        if overflow > track.last {
            return self.repair_to(channel, &mut track, overflow);
        }
        None
    }

    /// Whether a repair of this range is still wanted (the channel may have lost its
    /// subscribers, or been repaired otherwise, while the read was failing).
    pub(super) fn still_wanted(&self, repair: &Repair) -> bool {
        self.tracks
            .get(&repair.channel)
            .is_some_and(|t| t.repairing && t.epoch == repair.epoch)
    }

    /// Keeps only the channels `keep` says the node still serves.
    pub(super) fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.tracks.retain(|channel, _| keep(channel));
    }

    /// Stops tracking a channel the node no longer subscribes to.
    pub(super) fn forget(&self, channel: &str) {
        self.tracks.remove(channel);
    }

    /// Channels that delivered nothing since the last call (and are not being
    /// repaired), with the last offset delivered; marks every channel quiet again.
    pub(super) fn quiet_channels(&self) -> Vec<(String, Epoch, u64)> {
        let mut quiet = Vec::new();
        for mut track in self.tracks.iter_mut() {
            if !track.active && !track.repairing && !track.provisional {
                quiet.push((track.key().clone(), track.epoch.clone(), track.last));
            }
            track.active = false;
        }
        quiet
    }

    /// The last offset delivered on a channel (for tests and logs).
    #[cfg(test)]
    fn last(&self, channel: &str) -> Option<u64> {
        self.tracks.get(channel).map(|t| t.last)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::client::ClientQueue;
    use crate::publication::Kind;
    use crate::registry::Registry;

    fn epoch(e: &str) -> Epoch {
        Epoch::parse(e).unwrap()
    }

    fn pos(e: &str, offset: u64) -> Position {
        Position {
            epoch: epoch(e),
            offset,
        }
    }

    fn publication(e: &str, offset: u64) -> Publication {
        Publication {
            kind: Kind::Message,
            data: Bytes::from(offset.to_string()),
            from: None,
            position: Some(Position {
                epoch: epoch(e),
                offset,
            }),
            traceparent: Bytes::new(),
            published_at_us: 0,
        }
    }

    fn setup() -> (Tracker, ClientQueue) {
        let registry = Registry::new();
        let (client, queue) = registry.register(1024);
        registry.subscribe(&client, "c");
        let local = Local {
            registry,
            metrics: Arc::new(crate::metrics::Metrics::new()),
            tracing: crate::telemetry::Tracing::disabled(),
        };
        (Tracker::new(local, 4, 100), queue)
    }

    /// What the client got: offsets of messages, and `gap@N` for gaps.
    fn received(queue: &mut ClientQueue) -> Vec<String> {
        queue
            .take_all()
            .into_iter()
            .map(|frame| {
                let v: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
                match v["op"].as_str().unwrap() {
                    "gap" => format!("gap@{}", v["offset"]),
                    _ => v["offset"].to_string(),
                }
            })
            .collect()
    }

    #[test]
    fn in_order_duplicates_dropped() {
        let (t, mut q) = setup();
        assert_eq!(t.on_position("c", pos("e", 3)), None);
        for o in [4, 5, 5, 3, 6] {
            assert_eq!(t.on_live("c", publication("e", o)), None);
        }
        assert_eq!(received(&mut q), ["4", "5", "6"]);
    }

    #[test]
    fn a_gap_is_repaired_before_later_messages() {
        let (t, mut q) = setup();
        t.on_position("c", pos("e", 3));
        let repair = t.on_live("c", publication("e", 6)).expect("gap 4..5");
        assert_eq!((repair.after, repair.upto), (3, 5));
        assert_eq!(t.on_live("c", publication("e", 7)), None, "buffered");
        assert!(received(&mut q).is_empty());
        let top = pos("e", 7);
        let next = t.on_repaired(&repair, top, vec![publication("e", 4), publication("e", 5)]);
        assert_eq!(next, None);
        assert_eq!(received(&mut q), ["4", "5", "6", "7"]);
        assert_eq!(t.last("c"), Some(7));
    }

    #[test]
    fn what_the_stream_lost_is_reported_as_a_gap() {
        let (t, mut q) = setup();
        t.on_position("c", pos("e", 3));
        let repair = t.on_live("c", publication("e", 9)).unwrap();
        // The stream was trimmed: only 7 and 8 are left of 4..8.
        let top = pos("e", 9);
        t.on_repaired(&repair, top, vec![publication("e", 7), publication("e", 8)]);
        assert_eq!(received(&mut q), ["gap@6", "7", "8", "9"]);
    }

    #[test]
    fn a_quiet_channel_behind_the_stream_is_repaired() {
        let (t, mut q) = setup();
        t.on_position("c", pos("e", 3));
        assert_eq!(t.quiet_channels(), vec![("c".into(), epoch("e"), 3)]);
        let repair = t.on_position("c", pos("e", 5)).expect("behind");
        let top = pos("e", 5);
        t.on_repaired(&repair, top, vec![publication("e", 4), publication("e", 5)]);
        assert_eq!(received(&mut q), ["4", "5"]);
        assert!(t.quiet_channels().is_empty(), "it delivered");
    }

    #[test]
    fn a_gap_larger_than_a_repair_is_reported_at_once() {
        let (t, mut q) = setup();
        t.on_position("c", pos("e", 3));
        assert_eq!(t.on_live("c", publication("e", 500)), None);
        assert_eq!(received(&mut q), ["gap@499", "500"]);
    }

    #[test]
    fn a_history_gone_back_after_a_failover_is_a_gap_and_its_offsets_are_not_dropped() {
        let (t, mut q) = setup();
        t.on_position("c", pos("e", 3));
        t.on_live("c", publication("e", 4));
        t.on_live("c", publication("e", 5));
        // The new master never got 5.
        assert_eq!(t.on_resubscribed("c", pos("e", 4)), None);
        // Its next publication takes offset 5 again: delivered, not a duplicate.
        assert_eq!(t.on_live("c", publication("e", 5)), None);
        assert_eq!(received(&mut q), ["4", "5", "gap@4", "5"]);
        // Without a failover, a position read after re-subscribing is as before.
        assert_eq!(t.on_resubscribed("c", pos("e", 5)), None);
        assert!(received(&mut q).is_empty());
    }

    #[test]
    fn an_epoch_change_is_a_gap() {
        let (t, mut q) = setup();
        t.on_position("c", pos("old", 3));
        t.on_live("c", publication("new", 1));
        assert_eq!(received(&mut q), ["gap@0", "1"]);
        t.on_position("c", pos("newer", 5));
        assert_eq!(received(&mut q), ["gap@5"]);
    }

    #[test]
    fn a_provisional_track_is_not_repaired_backwards() {
        let (t, mut q) = setup();
        // Pushes of a fresh subscription arrive before its position read.
        t.on_live("c", publication("e", 10));
        t.on_live("c", publication("e", 11));
        assert_eq!(t.on_position("c", pos("e", 11)), None);
        t.on_live("c", publication("e", 12));
        assert_eq!(received(&mut q), ["10", "11", "12"]);
    }

    #[test]
    fn the_buffer_is_bounded_and_what_it_drops_is_repaired_later() {
        let (t, mut q) = setup();
        t.on_position("c", pos("e", 0));
        let repair = t.on_live("c", publication("e", 2)).unwrap();
        for o in 3..=10 {
            t.on_live("c", publication("e", o));
        }
        let top = pos("e", 10);
        let next = t
            .on_repaired(&repair, top.clone(), vec![publication("e", 1)])
            .expect("the dropped ones are read again");
        assert_eq!((next.after, next.upto), (5, 10));
        let rest: Vec<_> = (6..=10).map(|o| publication("e", o)).collect();
        let next = t.on_repaired(&next, top, rest);
        assert_eq!(next, None);
        let got = received(&mut q);
        assert_eq!(got, ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"]);
    }
}
