//! Node-side gap repair: per channel with history and local subscribers, the last
//! offset this node delivered, so that publications reach local subscribers in offset
//! order, each once, even when the Redis pub/sub connection dropped some.
//!
//! The tracker decides and delivers; it does no I/O. The Redis broker feeds it live
//! publications ([`Tracker::on_live`]), positions read from Redis after a (re)subscribe
//! ([`Tracker::on_subscribing`] then [`Tracker::on_resubscribed`]) or by the periodic
//! position check ([`Tracker::on_position`]), and the result of the repair reads it
//! asked for ([`Tracker::on_repaired`]). While a repair or a position read is in
//! flight, later live publications of the channel wait in a bounded buffer; one that
//! does not fit is dropped, and found again in the stream by the next repair.
//!
//! A channel is tracked from its subscribe (its first push, or its position read
//! there) until [`Tracker::forget`] when the node unsubscribes it; a late answer of
//! a position check or a late push never tracks it again, so nothing is kept (nor an
//! unpublished position renewed in Redis) for a channel nobody here wants.
//!
//! **The one invariant**: a channel's `last` (the last offset delivered) only moves
//! forward within an epoch, except when a position read *proves* the history went
//! back (a failover lost writes), and then the subscribers get a `gap`. A position is
//! therefore judged against what was delivered when it was read, never later: Redis
//! writes a command's reply and the pushes of other clients' PUBLISHes into the
//! subscriber connection in execution order, so the pushes before a position reply
//! have offsets at or below it and those after it follow it consecutively — but the
//! reply is handed to the task that awaits it while the connection's reader goes on
//! delivering later pushes. So from the moment a channel is subscribed again on a new
//! connection until its position read there is judged, its live publications wait
//! (like during a repair), and anything still in flight from before (a repair, the
//! buffer of the old connection) is void: the position read covers it.

use std::collections::VecDeque;

use std::sync::Arc;

use dashmap::DashMap;

use super::Delivery;
use super::recent::{Budget, Recent, Retention, Tail};
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
    /// Which repair of the channel this is: a repair made void (by a re-subscribe)
    /// while its read was in flight is recognised by its id and ignored.
    id: u64,
}

/// What a channel's live publications wait for (in `Track::buffer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// Nothing: they are delivered as they come.
    Nothing,
    /// The repair read with this id.
    Repair(u64),
    /// The position read on the connection the channel is being subscribed on again.
    Position,
}

#[derive(Debug)]
struct Track {
    epoch: Epoch,
    /// The last offset delivered to local subscribers.
    last: u64,
    /// Created by a live publication before the subscribe's position read: the read
    /// then only raises `last`, since the node was not subscribed before.
    provisional: bool,
    waiting: Waiting,
    /// Ids of this channel's repairs (the last one given).
    repairs: u64,
    buffer: VecDeque<Publication>,
    /// The highest offset dropped because the buffer was full (0: none): repaired
    /// from the stream once the buffer is replayed.
    overflow: u64,
    /// Something was delivered since the last position check (so the channel is not
    /// quiet and needs no check).
    active: bool,
    /// The publications delivered last: the node's cache of recent history
    /// (`recent`), ending at `last` unless it was moved without a delivery.
    recent: Recent,
}

impl Track {
    fn new(epoch: Epoch, last: u64, provisional: bool, recent: Recent) -> Track {
        Track {
            epoch,
            last,
            provisional,
            waiting: Waiting::Nothing,
            repairs: 0,
            buffer: VecDeque::new(),
            overflow: 0,
            active: false,
            recent,
        }
    }

    /// Whether what was delivered is settled: no repair nor position read pending,
    /// and `last` confirmed by a position read.
    fn steady(&self) -> bool {
        self.waiting == Waiting::Nothing && !self.provisional
    }

    /// The last position delivered.
    fn position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            offset: self.last,
        }
    }

    /// `last` moves without a delivery (a gap, a new epoch, a history gone back):
    /// the cached run no longer ends there.
    fn jump(&mut self, last: u64) {
        self.last = last;
        self.recent.clear();
    }
}

/// The positions of this node's history channels.
#[derive(Debug)]
pub(super) struct Tracker {
    /// Why a `DashMap`: a delivery holds its channel's entry (that is what orders a
    /// repair's replay before later live publications), and other channels go on.
    tracks: DashMap<String, Track>,
    delivery: Delivery,
    /// Most live publications kept per channel while a repair is in flight.
    max_buffer: usize,
    /// Largest gap repaired (`--max-recovery`): subscribers that missed more reload
    /// their state, as a client would after a failed recovery.
    max_repair: u64,
    /// The bytes the channels' caches of recent history share.
    cache: Arc<Budget>,
    /// How much of each channel's history Redis keeps (and so its cache).
    retention: Retention,
}

impl Tracker {
    pub(super) fn new(
        delivery: Delivery,
        max_buffer: usize,
        max_repair: u64,
        cache: Arc<Budget>,
        retention: Retention,
    ) -> Self {
        Tracker {
            tracks: DashMap::new(),
            delivery,
            max_buffer,
            max_repair,
            cache,
            retention,
        }
    }

    fn track(&self, channel: &str, epoch: Epoch, last: u64, provisional: bool) -> Track {
        // A recovery replays at most --max-recovery, which is also the largest
        // repair; Redis keeps at most history-size.
        let (size, ttl) = self.retention.of(channel);
        let max_len = size.min(self.max_repair as usize);
        let recent = Recent::new(self.cache.clone(), max_len, ttl);
        Track::new(epoch, last, provisional, recent)
    }

    /// Hands `publication`, the next one of `channel`, to the local subscribers and
    /// to the channel's cache, under the track's lock (a recovery reading the cache
    /// sees it there or the subscriber gets it live, never neither).
    fn deliver(&self, channel: &str, track: &mut Track, publication: &Publication) {
        let frame = self.delivery.deliver(channel, publication);
        track.recent.push(publication, &frame);
    }

    /// The publications after `since` of a channel's cached run, which ends at
    /// the last offset delivered, while the channel is steady (nothing pending
    /// that could move it otherwise than by a delivery) and in `since`'s epoch.
    pub(super) fn cached(&self, channel: &str, since: &Position) -> Option<Tail> {
        let track = self.tracks.get(channel)?;
        if !track.steady() || track.epoch != since.epoch {
            return None;
        }
        track.recent.read(&track.position(), since.offset)
    }

    /// Whether a recovery from `since` may fill the channel's cache with a read of
    /// its tail: the cache is on, the channel steady and in `since`'s epoch (a
    /// client of another epoch recovers nothing; Redis says where it stands).
    /// Returns the bytes the run may hold.
    pub(super) fn caches(&self, channel: &str, since: &Position) -> Option<usize> {
        let track = self.tracks.get(channel)?;
        (self.cache.enabled() && track.steady() && track.epoch == since.epoch)
            .then(|| self.cache.share())
    }

    /// Puts publications read from Redis in front of the channel's cached run,
    /// where they meet it (see [`Recent::backfill`]).
    pub(super) fn backfill(&self, channel: &str, history: &Tail) {
        if let Some(mut track) = self.tracks.get_mut(channel)
            && track.steady()
        {
            let last = track.position();
            track.recent.backfill(history, &last);
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
            self.delivery.gap(channel, &position);
            track.jump(upto);
            return None;
        }
        track.repairs += 1;
        track.waiting = Waiting::Repair(track.repairs);
        Some(Repair {
            channel: channel.to_owned(),
            epoch: track.epoch.clone(),
            after: track.last,
            upto,
            id: track.repairs,
        })
    }

    /// The history was lost and started again under `epoch`: the subscribers'
    /// positions in the old one mean nothing any more, so they are told with a `gap`
    /// at offset 0 of the new one — and then get what the new history holds from
    /// offset 1 on, like any other range the node missed.
    fn new_epoch(&self, channel: &str, track: &mut Track, epoch: Epoch) {
        let start = Position { epoch, offset: 0 };
        self.delivery.gap(channel, &start);
        track
            .buffer
            .retain(|p| p.position.as_ref().map(|p| &p.epoch) == Some(&start.epoch));
        track.epoch = start.epoch;
        track.jump(0);
        track.overflow = 0;
    }

    /// A publication from pub/sub. Returns the repair to start, if it revealed a gap.
    pub(super) fn on_live(&self, channel: &str, publication: Publication) -> Option<Repair> {
        let Some(position) = publication.position.clone() else {
            self.delivery.deliver(channel, &publication);
            return None;
        };
        let mut track = match self.tracks.get_mut(channel) {
            Some(track) => track,
            // A push still in flight when the channel was unsubscribed: nobody
            // here wants it, and a track made for it would outlive the channel.
            None if !self.delivery.registry.has_subscribers(channel) => return None,
            None => {
                let first = self.track(
                    channel,
                    position.epoch.clone(),
                    position.offset.saturating_sub(1),
                    true,
                );
                let mut entry = self.tracks.entry(channel.to_owned()).or_insert(first);
                return self.advance(channel, &mut entry, publication);
            }
        };
        if track.waiting != Waiting::Nothing {
            let stale = position.epoch == track.epoch && position.offset <= track.last;
            if stale {
                self.delivery.metrics.history_duplicates.inc();
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
            self.delivery.deliver(channel, &publication);
            return None;
        };
        if position.epoch != track.epoch {
            self.new_epoch(channel, track, position.epoch.clone());
        }
        if position.offset <= track.last {
            self.delivery.metrics.history_duplicates.inc();
            return None;
        }
        if position.offset == track.last + 1 {
            track.last = position.offset;
            track.active = true;
            self.deliver(channel, track, &publication);
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
                self.deliver(channel, track, &publication);
                None
            }
        }
    }

    /// Replays the publications that waited while the channel was being repaired
    /// or re-subscribed, then what did not fit in the buffer; returns the repair to
    /// start if they reveal a gap again.
    fn replay(&self, channel: &str, track: &mut Track) -> Option<Repair> {
        while let Some(publication) = track.buffer.pop_front() {
            if let Some(next) = self.advance(channel, track, publication) {
                return Some(next);
            }
        }
        let overflow = std::mem::take(&mut track.overflow);
        if overflow > track.last {
            return self.repair_to(channel, track, overflow);
        }
        None
    }

    /// The channel's position as read from Redis (by the periodic position check, or
    /// after a first subscribe). Returns the repair to start when the node is behind
    /// it.
    ///
    /// A channel not tracked (any more) stays untracked: the check's read may answer
    /// after its last subscriber left and [`forget`](Self::forget) ran, and a track
    /// made again then would live on, renewing an unpublished position for nobody.
    pub(super) fn on_position(&self, channel: &str, top: Position) -> Option<Repair> {
        let mut track = self.tracks.get_mut(channel)?;
        self.judge(channel, &mut track, top)
    }

    /// Judges a channel's position read from Redis against what was delivered.
    fn judge(&self, channel: &str, track: &mut Track, top: Position) -> Option<Repair> {
        if track.provisional {
            track.provisional = false;
            if track.epoch == top.epoch && top.offset > track.last {
                track.jump(top.offset);
            }
            return None;
        }
        if track.waiting != Waiting::Nothing {
            return None;
        }
        if track.epoch != top.epoch {
            self.new_epoch(channel, track, top.epoch.clone());
        }
        if top.offset <= track.last {
            return None;
        }
        self.repair_to(channel, track, top.offset)
    }

    /// The channel is about to be subscribed on a new subscriber connection (after a
    /// reconnect, or a Redis Cluster slot move): from now on its live publications
    /// wait for the position read there ([`on_resubscribed`](Self::on_resubscribed)),
    /// and whatever was in flight from the old connection is void — the position read
    /// on the new one covers it.
    pub(super) fn on_subscribing(&self, channel: &str) {
        if let Some(mut track) = self.tracks.get_mut(channel) {
            // It delivered on the old connection: the new position is judged
            // against that.
            track.provisional = false;
            track.waiting = Waiting::Position;
            track.buffer.clear();
            track.overflow = 0;
        }
    }

    /// The channel's position read on a new subscriber connection, right after it
    /// subscribed (so every push received before it is at or below it). Judged
    /// against what was delivered before the channel was subscribed there (its live
    /// publications waited meanwhile): behind it, the node repairs; *below* it, in
    /// the same epoch, the history went back — a failover to a replica that had not
    /// received the last writes. Its next offsets will be given to other
    /// publications, which must not be dropped as duplicates: the subscribers are
    /// told with a `gap` at the new position.
    ///
    /// The first subscribe of a channel on this node starts tracking it here, from
    /// that position (or confirms the provisional track its first pushes made).
    pub(super) fn on_resubscribed(&self, channel: &str, top: Position) -> Option<Repair> {
        let mut track = self
            .tracks
            .entry(channel.to_owned())
            .or_insert_with(|| self.track(channel, top.epoch.clone(), top.offset, false));
        if track.waiting != Waiting::Position {
            return self.judge(channel, &mut track, top);
        }
        track.waiting = Waiting::Nothing;
        if track.epoch != top.epoch {
            self.new_epoch(channel, &mut track, top.epoch.clone());
        }
        if top.offset < track.last {
            tracing::warn!(
                channel,
                delivered = track.last,
                history = top.offset,
                "the history is behind what was delivered (writes lost in a failover)"
            );
            self.delivery.gap(channel, &top);
            track.jump(top.offset);
        } else if top.offset > track.last
            && let Some(repair) = self.repair_to(channel, &mut track, top.offset)
        {
            return Some(repair);
        }
        self.replay(channel, &mut track)
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
        if track.waiting != Waiting::Repair(repair.id) {
            return None;
        }
        track.waiting = Waiting::Nothing;
        let channel = repair.channel.as_str();
        if top.epoch != track.epoch {
            self.new_epoch(channel, &mut track, top.epoch.clone());
            if top.offset > 0 {
                // The read was of the old epoch: read the new one's range.
                if let Some(next) = self.repair_to(channel, &mut track, top.offset) {
                    return Some(next);
                }
            }
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
                    self.delivery.gap(
                        channel,
                        &Position {
                            epoch: track.epoch.clone(),
                            offset: offset - 1,
                        },
                    );
                }
                track.last = offset;
                track.active = true;
                self.deliver(channel, &mut track, &publication);
                self.delivery.metrics.history_repaired_messages.inc();
                repaired = true;
            }
            if track.last < repair.upto {
                self.delivery.gap(
                    channel,
                    &Position {
                        epoch: track.epoch.clone(),
                        offset: repair.upto,
                    },
                );
                track.jump(repair.upto);
            } else if repaired {
                self.delivery.metrics.history_gap("repaired");
            }
        }
        self.replay(channel, &mut track)
    }

    /// Whether a repair of this range is still wanted (the channel may have lost its
    /// subscribers, been re-subscribed, or been repaired otherwise, while the read
    /// was failing).
    pub(super) fn still_wanted(&self, repair: &Repair) -> bool {
        self.tracks
            .get(&repair.channel)
            .is_some_and(|t| t.waiting == Waiting::Repair(repair.id))
    }

    /// Keeps only the channels `keep` says the node still serves.
    pub(super) fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.tracks.retain(|channel, _| keep(channel));
    }

    /// Stops tracking a channel the node no longer subscribes to.
    pub(super) fn forget(&self, channel: &str) {
        self.tracks.remove(channel);
    }

    /// Channels that delivered nothing since the last call (and wait for nothing),
    /// with the last offset delivered; marks every channel quiet again. Trims each
    /// channel's cache to its share of the budget on the way (shares shrink as
    /// channels come, and a quiet channel's run does not trim itself).
    pub(super) fn quiet_channels(&self) -> Vec<(String, Epoch, u64)> {
        let mut quiet = Vec::new();
        for mut track in self.tracks.iter_mut() {
            track.recent.trim();
            if !track.active && track.waiting == Waiting::Nothing && !track.provisional {
                quiet.push((track.key().clone(), track.epoch.clone(), track.last));
            }
            track.active = false;
        }
        quiet
    }

    /// Channels nobody has published to in their epoch (top offset 0), whose
    /// position a subscribe created and this node must keep alive.
    pub(super) fn unpublished_channels(&self) -> Vec<String> {
        self.tracks
            .iter()
            .filter(|t| t.last == 0 && !t.provisional)
            .map(|t| t.key().clone())
            .collect()
    }

    /// The last offset delivered on a channel (for tests and logs).
    #[cfg(test)]
    fn last(&self, channel: &str) -> Option<u64> {
        self.tracks.get(channel).map(|t| t.last)
    }
}

#[cfg(test)]
mod tests {

    use std::time::Duration;

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
        setup_with(4)
    }

    /// A tracker whose buffers hold `max_buffer` publications.
    fn setup_with(max_buffer: usize) -> (Tracker, ClientQueue) {
        let registry = Registry::new();
        let (client, queue) = registry.register(crate::client::QueueBounds::frames(1024));
        registry.subscribe(&client, "c");
        let delivery = Delivery::for_tests(registry);
        let cache = Budget::new(1 << 20, delivery.metrics.clone());
        let retention = Retention::new(|_| (1000, Duration::from_secs(300)));
        (
            Tracker::new(delivery, max_buffer, 100, cache, retention),
            queue,
        )
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

    /// The offsets of the channel's cached run, if it may answer recoveries: what
    /// the longest read it answers returns.
    fn cached(t: &Tracker) -> Option<Vec<u64>> {
        let top = ["e", "f"]
            .iter()
            .find_map(|e| t.cached("c", &pos(e, u64::MAX)))?
            .top;
        let offsets = |after| -> Vec<u64> {
            let since = Position {
                epoch: top.epoch.clone(),
                offset: after,
            };
            t.cached("c", &since).unwrap().offsets()
        };
        let top = top.offset;
        let longest = (0..top)
            .find(|&after| offsets(after).len() as u64 == top - after)
            .unwrap_or(top);
        Some(offsets(longest))
    }

    #[test]
    fn the_cache_holds_what_was_delivered_without_a_hole() {
        let (t, mut q) = setup();
        t.on_resubscribed("c", pos("e", 3));
        assert_eq!(cached(&t), Some(vec![]), "nothing delivered yet");
        for o in [4, 5, 6] {
            t.on_live("c", publication("e", o));
        }
        assert_eq!(cached(&t), Some(vec![4, 5, 6]));
        // A repair pending: the run may not end where delivery will be.
        let repair = t.on_live("c", publication("e", 9)).unwrap();
        assert_eq!(cached(&t), None);
        // The stream lost 7: the run starts again after the gap.
        t.on_repaired(&repair, pos("e", 9), vec![publication("e", 8)]);
        assert_eq!(received(&mut q), ["4", "5", "6", "gap@7", "8", "9"]);
        assert_eq!(cached(&t), Some(vec![8, 9]));
        // Too far behind to repair: reported, and the run starts again.
        t.on_live("c", publication("e", 500));
        assert_eq!(cached(&t), Some(vec![500]));
        // A new epoch: its own run.
        t.on_live("c", publication("f", 1));
        assert_eq!(cached(&t), Some(vec![1]));
        assert_eq!(t.cached("c", &pos("f", 0)).unwrap().top, pos("f", 1));
        // The history went back (a failover lost writes): nothing cached.
        t.on_subscribing("c");
        t.on_resubscribed("c", pos("f", 0));
        assert_eq!(cached(&t), Some(vec![]));
    }

    #[test]
    fn a_read_of_the_tail_fills_the_cache_up_to_what_was_delivered() {
        let (t, _q) = setup();
        t.on_resubscribed("c", pos("e", 10));
        let tail = |range: std::ops::RangeInclusive<u64>| {
            let read = crate::broker::History {
                top: pos("e", *range.end()),
                publications: range.map(|o| publication("e", o)).collect(),
                truncated: false,
            };
            Tail::read("c", &read)
        };
        // Read before the node delivered 11 and 12: it ends right before the run.
        t.on_live("c", publication("e", 11));
        t.on_live("c", publication("e", 12));
        t.backfill("c", &tail(1..=10));
        assert_eq!(cached(&t), Some((1..=12).collect()));
        // Untracked channels keep nothing.
        t.backfill("other", &tail(1..=10));
        assert!(t.cached("other", &pos("e", 0)).is_none());
    }

    #[test]
    fn in_order_duplicates_dropped() {
        let (t, mut q) = setup();
        assert_eq!(t.on_resubscribed("c", pos("e", 3)), None);
        for o in [4, 5, 5, 3, 6] {
            assert_eq!(t.on_live("c", publication("e", o)), None);
        }
        assert_eq!(received(&mut q), ["4", "5", "6"]);
    }

    #[test]
    fn a_gap_is_repaired_before_later_messages() {
        let (t, mut q) = setup();
        t.on_resubscribed("c", pos("e", 3));
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
        t.on_resubscribed("c", pos("e", 3));
        let repair = t.on_live("c", publication("e", 9)).unwrap();
        // The stream was trimmed: only 7 and 8 are left of 4..8.
        let top = pos("e", 9);
        t.on_repaired(&repair, top, vec![publication("e", 7), publication("e", 8)]);
        assert_eq!(received(&mut q), ["gap@6", "7", "8", "9"]);
    }

    #[test]
    fn a_quiet_channel_behind_the_stream_is_repaired() {
        let (t, mut q) = setup();
        t.on_resubscribed("c", pos("e", 3));
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
        t.on_resubscribed("c", pos("e", 3));
        assert_eq!(t.on_live("c", publication("e", 500)), None);
        assert_eq!(received(&mut q), ["gap@499", "500"]);
    }

    #[test]
    fn a_history_gone_back_after_a_failover_is_a_gap_and_its_offsets_are_not_dropped() {
        let (t, mut q) = setup();
        t.on_resubscribed("c", pos("e", 3));
        t.on_live("c", publication("e", 4));
        t.on_live("c", publication("e", 5));
        // The new master never got 5.
        t.on_subscribing("c");
        assert_eq!(t.on_resubscribed("c", pos("e", 4)), None);
        // Its next publication takes offset 5 again: delivered, not a duplicate.
        assert_eq!(t.on_live("c", publication("e", 5)), None);
        assert_eq!(received(&mut q), ["4", "5", "gap@4", "5"]);
        // Without a failover, a position read after re-subscribing is as before.
        t.on_subscribing("c");
        assert_eq!(t.on_resubscribed("c", pos("e", 5)), None);
        assert!(received(&mut q).is_empty());
    }

    /// The reply of the position read is handed to the task awaiting it while the
    /// connection's reader goes on with later pushes: those must not make the
    /// position look like a history that went back.
    #[test]
    fn pushes_handled_before_the_position_reply_are_not_delivered_twice() {
        let (t, mut q) = setup_with(64);
        t.on_resubscribed("c", pos("e", 450));
        for o in 451..=452 {
            t.on_live("c", publication("e", o));
        }
        // The pub/sub connection drops; 453..455 are published meanwhile. The node
        // subscribes again, and its position read (455) races 456..480.
        t.on_subscribing("c");
        for o in 456..=480 {
            assert_eq!(t.on_live("c", publication("e", o)), None, "waits");
        }
        let repair = t.on_resubscribed("c", pos("e", 455)).expect("453..455");
        assert_eq!((repair.after, repair.upto), (452, 455));
        let read = (453..=455).map(|o| publication("e", o)).collect();
        assert_eq!(t.on_repaired(&repair, pos("e", 480), read), None);
        t.on_live("c", publication("e", 481));
        let expected: Vec<String> = (451..=481).map(|o| o.to_string()).collect();
        assert_eq!(received(&mut q), expected);
    }

    /// On a Redis Cluster one read of a batch may hang on a failing master while the
    /// others answered: each position is judged on its own, against what was
    /// delivered when the channel was subscribed again.
    #[test]
    fn a_late_position_read_is_judged_against_what_was_delivered_when_it_was_read() {
        let (t, mut q) = setup_with(128);
        t.on_resubscribed("c", pos("e", 360));
        t.on_subscribing("c");
        // Everything from 361 on comes live before the reply is handled.
        for o in 361..=437 {
            t.on_live("c", publication("e", o));
        }
        assert_eq!(t.on_resubscribed("c", pos("e", 360)), None);
        let got = received(&mut q);
        let expected: Vec<String> = (361..=437).map(|o| o.to_string()).collect();
        assert_eq!(got, expected, "no gap, nothing twice");
    }

    #[test]
    fn a_repair_in_flight_when_the_channel_is_subscribed_again_is_void() {
        let (t, mut q) = setup();
        t.on_resubscribed("c", pos("e", 3));
        let stale = t.on_live("c", publication("e", 6)).expect("4..5");
        t.on_subscribing("c");
        assert!(!t.still_wanted(&stale));
        let repair = t.on_resubscribed("c", pos("e", 7)).expect("4..7");
        assert_eq!((repair.after, repair.upto), (3, 7));
        // The old read comes back late: ignored.
        let old = vec![publication("e", 4), publication("e", 5)];
        assert_eq!(t.on_repaired(&stale, pos("e", 6), old), None);
        assert!(received(&mut q).is_empty());
        let read = (4..=7).map(|o| publication("e", o)).collect();
        assert_eq!(t.on_repaired(&repair, pos("e", 7), read), None);
        assert_eq!(received(&mut q), ["4", "5", "6", "7"]);
    }

    /// Redis lost the channel's history and a new epoch began; what the new history
    /// holds is delivered, and only the old epoch's end is a gap.
    #[test]
    fn a_new_epoch_is_delivered_from_its_first_offset() {
        let (t, mut q) = setup();
        t.on_resubscribed("c", pos("old", 9));
        t.on_subscribing("c");
        t.on_live("c", publication("new", 4));
        let repair = t.on_resubscribed("c", pos("new", 3)).expect("1..3");
        assert_eq!((repair.after, repair.upto), (0, 3));
        let read = (1..=3).map(|o| publication("new", o)).collect();
        assert_eq!(t.on_repaired(&repair, pos("new", 4), read), None);
        assert_eq!(received(&mut q), ["gap@0", "1", "2", "3", "4"]);
        // Seen live first, the same.
        let repair = t.on_live("c", publication("newer", 2)).expect("1");
        assert_eq!((repair.after, repair.upto), (0, 1));
        t.on_repaired(&repair, pos("newer", 2), vec![publication("newer", 1)]);
        assert_eq!(received(&mut q), ["gap@0", "1", "2"]);
    }

    #[test]
    fn an_epoch_change_is_a_gap() {
        let (t, mut q) = setup();
        t.on_resubscribed("c", pos("old", 3));
        t.on_live("c", publication("new", 1));
        assert_eq!(received(&mut q), ["gap@0", "1"]);
        // Found by the position check: what the new epoch holds is read.
        let repair = t.on_position("c", pos("newer", 5)).expect("1..5");
        assert_eq!((repair.after, repair.upto), (0, 5));
        assert_eq!(received(&mut q), ["gap@0"]);
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

    /// A position check's read, or a push, that comes back after the node left the
    /// channel does not track it again: the track would renew an unpublished
    /// position in Redis for nobody, forever.
    #[test]
    fn a_channel_left_is_not_tracked_again_by_late_answers() {
        let (t, _q) = setup();
        t.on_resubscribed("c", pos("e", 0));
        assert_eq!(t.unpublished_channels(), ["c"]);
        t.forget("c");
        assert_eq!(t.on_position("c", pos("e", 0)), None);
        assert!(t.unpublished_channels().is_empty());
        // A push in flight when the channel was unsubscribed ("gone": nobody here
        // subscribes to it any more).
        assert_eq!(t.on_live("gone", publication("e", 1)), None);
        assert_eq!(t.last("gone"), None, "not tracked");
    }

    #[test]
    fn the_buffer_is_bounded_and_what_it_drops_is_repaired_later() {
        let (t, mut q) = setup();
        t.on_resubscribed("c", pos("e", 0));
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
