//! The local registry: which connections this node holds and which channels each is
//! subscribed to, and the fan-out of one frame to a channel's local subscribers.
//!
//! A subscription to a channel with history starts *held back*: the fan-out keeps
//! its frames (bounded like the client's queue, in frames and bytes) while the hub reads what the
//! client missed; [`Registry::release`] then queues the recovery, and the held frames
//! the recovery did not already contain, in one critical section. From then on the
//! subscription drops frames at or below the position the recovery read (its
//! *floor*): with Redis, the read and the live messages travel on different
//! connections, so a message the read already returned may still arrive live.
//! Held frames are judged by their position, epoch included: a `gap` into another
//! epoch held after the read is released, and the frames of that epoch after it,
//! whatever their offsets; frames of an epoch the client is not in are dropped.
//!
//! State lives in one place, [`Registry`], a cheap-to-clone handle. Both maps are
//! `DashMap`s: sharded read/write locks, so a fan-out on one channel never waits for
//! subscription changes on another, and there is no global lock on the per-message
//! path. Every critical section is a few map operations; no guard is ever held
//! across an `.await` (the methods here are synchronous, which makes that a rule of
//! the type system rather than of discipline).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::client::{ClientHandle, ClientQueue, CloseReason, ConnId, QueueBounds};
use crate::frame::Frame;
use crate::publication::Position;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

/// Handle to the node's registry.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    next_id: AtomicU64,
    /// channel -> its local subscribers.
    channels: DashMap<String, HashMap<ConnId, Subscriber>>,
    /// connection -> its handle and the channels it is subscribed to.
    connections: DashMap<ConnId, Connection>,
    /// Total (connection, channel) pairs, kept so `stats` need not walk the maps.
    subscriptions: AtomicUsize,
}

/// One subscription, as the fan-out sees it.
#[derive(Debug)]
struct Subscriber {
    handle: ClientHandle,
    /// Where a subscription to a channel with history stands; `None` on channels
    /// without history, whose fan-out therefore costs what it always did.
    history: Option<Box<Recovery>>,
}

/// The recovery state of a subscription to a channel with history.
#[derive(Debug)]
struct Recovery {
    /// Set once the recovery is delivered ([`Registry::release`]). Written under the
    /// channel's write lock, read under its read lock: the lock orders them, so
    /// relaxed atomics suffice.
    live: AtomicBool,
    /// Offsets up to this one were delivered by the recovery: later frames with an
    /// offset at or below it are dropped. Reset by a `gap` (a new epoch starts over).
    floor: AtomicU64,
    /// Frames (with their offsets) that arrived before the subscription was live.
    /// Why a mutex: the fan-out pushes through a shared reference, holding only the
    /// channel's read lock (so other channels' fan-outs run in parallel).
    held: Mutex<Held>,
    /// Most frames and bytes held (the client's queue bounds); one more closes the
    /// client with 1013.
    bounds: QueueBounds,
}

/// Frames held back, with their positions, and their size.
#[derive(Debug, Default)]
struct Held {
    frames: Vec<HeldFrame>,
    bytes: usize,
}

#[derive(Debug)]
struct HeldFrame {
    /// The publication's position (`None`: no history, e.g. a `join`), or the
    /// gap's.
    position: Option<Position>,
    gap: bool,
    frame: Frame,
}

impl Subscriber {
    /// Queues (or holds back, or drops as already recovered) one frame; returns
    /// whether it was queued now.
    fn send(&self, frame: &Frame, position: Option<&Position>, gap: bool) -> bool {
        let Some(recovery) = &self.history else {
            return self.handle.send(frame.clone());
        };
        if recovery.live.load(Ordering::Relaxed) {
            if position.is_some_and(|p| p.offset <= recovery.floor.load(Ordering::Relaxed)) {
                return false;
            }
            return self.handle.send(frame.clone());
        }
        let mut held = recovery.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.frames.len() >= recovery.bounds.frames
            || held.bytes.saturating_add(frame.len()) > recovery.bounds.bytes
        {
            drop(held);
            self.handle.close(CloseReason::HoldBackOverflow);
        } else {
            held.bytes += frame.len();
            held.frames.push(HeldFrame {
                position: position.cloned(),
                gap,
                frame: frame.clone(),
            });
        }
        false
    }
}

#[derive(Debug)]
struct Connection {
    handle: ClientHandle,
    /// A `Vec`, not a set: a connection has few channels, and an empty `Vec` costs
    /// no allocation (a set allocates its table for the first entry).
    channels: Vec<String>,
}

/// Sizes of the registry, for tests, probes and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RegistryStats {
    /// Open connections.
    pub connections: usize,
    /// (connection, channel) subscriptions.
    pub subscriptions: usize,
    /// Channels with at least one local subscriber.
    pub channels: usize,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a connection with an outbound queue of these bounds.
    pub fn register(&self, bounds: QueueBounds) -> (ClientHandle, ClientQueue) {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (handle, rx) = ClientHandle::new(id, bounds);
        self.shared.connections.insert(
            id,
            Connection {
                handle: handle.clone(),
                channels: Vec::new(),
            },
        );
        (handle, rx)
    }

    /// Subscribes a registered connection to `channel`, live at once. Returns `false`
    /// if it already was subscribed.
    pub fn subscribe(&self, client: &ClientHandle, channel: &str) -> bool {
        self.add(client, channel, None)
    }

    /// Subscribes a registered connection to `channel` with its frames held back (at
    /// most `capacity`; one more closes the client with 1013) until [`release`](Self::release).
    pub fn subscribe_held(&self, client: &ClientHandle, channel: &str) -> bool {
        let recovery = Recovery {
            live: AtomicBool::new(false),
            floor: AtomicU64::new(0),
            held: Mutex::new(Held::default()),
            bounds: client.bounds(),
        };
        self.add(client, channel, Some(Box::new(recovery)))
    }

    /// Makes a held-back subscription live: queues `first` (the recovery and its
    /// ack), then the held frames past `after`, in one critical section with the
    /// fan-out, so no frame is lost or doubled in between. A held frame of `after`'s
    /// epoch at or below its offset is dropped (the recovery has it, or its ack says
    /// the client is past it); a held `gap` into another epoch is released, and so
    /// is everything of that epoch after it (offsets start over); a frame of any
    /// other epoch is dropped. Later frames at or below the
    /// floor are dropped: `after`'s offset, or 0 after a gap into another epoch.
    /// Without `after` (a channel without history) every held frame is queued and
    /// the subscription becomes a plain one. Returns how many held frames were
    /// queued.
    pub fn release(
        &self,
        client: &ClientHandle,
        channel: &str,
        after: Option<&Position>,
        first: Vec<Frame>,
    ) -> usize {
        // The write lock waits for a fan-out in progress on this channel and keeps
        // the next one out until the subscription is live.
        let Some(mut subscribers) = self.shared.channels.get_mut(channel) else {
            return 0;
        };
        let Some(subscriber) = subscribers.get_mut(&client.id()) else {
            return 0;
        };
        let mut epoch = after.map(|p| p.epoch.clone());
        let mut floor = after.map_or(0, |p| p.offset);
        let held = match (subscriber.history.as_mut(), after) {
            (Some(recovery), Some(_)) => {
                let held =
                    std::mem::take(recovery.held.get_mut().unwrap_or_else(|e| e.into_inner()))
                        .frames;
                let kept: Vec<HeldFrame> = held
                    .into_iter()
                    .filter(|h| {
                        let Some(position) = &h.position else {
                            return true;
                        };
                        if Some(&position.epoch) == epoch.as_ref() {
                            return position.offset > floor;
                        }
                        if !h.gap {
                            // Of an epoch the client is not in (one the read found
                            // gone): the gap into the next one says where it is.
                            return false;
                        }
                        // Into another epoch: its offsets start over.
                        epoch = Some(position.epoch.clone());
                        floor = 0;
                        true
                    })
                    .collect();
                recovery.floor.store(floor, Ordering::Relaxed);
                recovery.live.store(true, Ordering::Relaxed);
                kept
            }
            // No history: nothing to keep once live.
            (Some(_), None) => subscriber
                .history
                .take()
                .map(|r| {
                    r.held
                        .into_inner()
                        .unwrap_or_else(|e| e.into_inner())
                        .frames
                })
                .unwrap_or_default(),
            (None, _) => Vec::new(),
        };
        let released = held.len();
        let frames = first.into_iter().chain(held.into_iter().map(|h| h.frame));
        client.send_recovered(frames);
        released
    }

    fn add(&self, client: &ClientHandle, channel: &str, history: Option<Box<Recovery>>) -> bool {
        let id = client.id();
        {
            let Some(mut conn) = self.shared.connections.get_mut(&id) else {
                return false;
            };
            if conn.channels.iter().any(|c| c == channel) {
                return false;
            }
            // Most connections have one channel: room for exactly one at first
            // (a `Vec` starts at four), the usual growth after that.
            if conn.channels.capacity() == 0 {
                conn.channels.reserve_exact(1);
            }
            conn.channels.push(channel.to_owned());
        }
        self.shared
            .channels
            .entry(channel.to_owned())
            .or_default()
            .insert(
                id,
                Subscriber {
                    handle: client.clone(),
                    history,
                },
            );
        self.shared.subscriptions.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Removes one subscription. Returns `None` if there was none, otherwise whether
    /// it was the channel's last local subscriber (so the node can drop its interest).
    pub fn unsubscribe(&self, id: ConnId, channel: &str) -> Option<bool> {
        let removed = self
            .shared
            .connections
            .get_mut(&id)
            .is_some_and(|mut conn| {
                let before = conn.channels.len();
                conn.channels.retain(|c| c != channel);
                conn.channels.len() < before
            });
        if !removed {
            return None;
        }
        Some(self.remove_from_channel(id, channel))
    }

    /// Removes a connection and all its subscriptions; returns the channels that
    /// lost their last local subscriber.
    pub fn deregister(&self, id: ConnId) -> Vec<String> {
        let Some((_, conn)) = self.shared.connections.remove(&id) else {
            return Vec::new();
        };
        conn.channels
            .into_iter()
            .filter(|channel| self.remove_from_channel(id, channel))
            .collect()
    }

    /// Returns whether the channel is now empty (and so was removed).
    fn remove_from_channel(&self, id: ConnId, channel: &str) -> bool {
        self.shared.subscriptions.fetch_sub(1, Ordering::Relaxed);
        // The emptiness check and the removal happen under the same shard lock, so a
        // subscriber arriving concurrently either lands in the old entry (which then
        // is not empty) or creates a new one.
        match self.shared.channels.entry(channel.to_owned()) {
            Entry::Occupied(mut e) => {
                e.get_mut().remove(&id);
                if e.get().is_empty() {
                    e.remove();
                    true
                } else {
                    false
                }
            }
            Entry::Vacant(_) => false,
        }
    }

    /// Queues `frame` (the message with `offset`, on channels with history) to every
    /// local subscriber of `channel`, or holds it back for those still recovering;
    /// returns how many got it queued.
    ///
    /// Never waits: a subscriber whose queue is full is closed as a slow consumer.
    pub fn fanout(&self, channel: &str, frame: &Frame, position: Option<&Position>) -> usize {
        let Some(subscribers) = self.shared.channels.get(channel) else {
            return 0;
        };
        subscribers
            .values()
            .filter(|subscriber| subscriber.send(frame, position, false))
            .count()
    }

    /// Queues a `gap` frame (at `offset`) to every local subscriber of `channel`:
    /// what came before is lost, and offsets may start over in a new epoch, so
    /// every floor is reset. Held back for those still recovering, with its offset:
    /// a recovery that reached past it drops it (its ack already says where the
    /// client stands).
    pub fn fanout_gap(&self, channel: &str, frame: &Frame, position: &Position) -> usize {
        let Some(subscribers) = self.shared.channels.get(channel) else {
            return 0;
        };
        subscribers
            .values()
            .filter(|subscriber| match &subscriber.history {
                Some(recovery) if recovery.live.load(Ordering::Relaxed) => {
                    recovery.floor.store(0, Ordering::Relaxed);
                    subscriber.handle.send(frame.clone())
                }
                _ => subscriber.send(frame, Some(position), true),
            })
            .count()
    }

    /// Whether a connection is subscribed to `channel`.
    pub fn is_subscribed(&self, id: ConnId, channel: &str) -> bool {
        self.shared
            .connections
            .get(&id)
            .is_some_and(|c| c.channels.iter().any(|ch| ch == channel))
    }

    /// The channels a connection is subscribed to.
    pub fn channels_of(&self, id: ConnId) -> Vec<String> {
        self.shared
            .connections
            .get(&id)
            .map_or_else(Vec::new, |c| c.channels.clone())
    }

    /// How many channels a connection is subscribed to.
    pub fn subscription_count(&self, id: ConnId) -> usize {
        self.shared
            .connections
            .get(&id)
            .map_or(0, |c| c.channels.len())
    }

    /// Every channel with local subscribers and how many, sorted by name.
    pub fn channel_counts(&self) -> Vec<(String, usize)> {
        let mut counts: Vec<(String, usize)> = self
            .shared
            .channels
            .iter()
            .map(|e| (e.key().clone(), e.value().len()))
            .collect();
        counts.sort();
        counts
    }

    /// The connections not closing yet (a draining node closes them in turn).
    pub fn open_connections(&self) -> Vec<ClientHandle> {
        self.shared
            .connections
            .iter()
            .filter(|c| c.handle.close_reason().is_none())
            .map(|c| c.handle.clone())
            .collect()
    }

    /// Runs one heartbeat on every connection (see [`ClientHandle::heartbeat`]).
    pub fn heartbeat(&self) {
        for conn in self.shared.connections.iter() {
            conn.handle.heartbeat();
        }
    }

    /// Whether any local connection is subscribed to `channel`.
    pub fn has_subscribers(&self, channel: &str) -> bool {
        self.shared.channels.contains_key(channel)
    }

    /// Every channel with at least one local subscriber.
    pub fn channel_names(&self) -> Vec<String> {
        self.shared
            .channels
            .iter()
            .map(|e| e.key().clone())
            .collect()
    }

    /// Current sizes.
    pub fn stats(&self) -> RegistryStats {
        RegistryStats {
            connections: self.shared.connections.len(),
            subscriptions: self.shared.subscriptions.load(Ordering::Relaxed),
            channels: self.shared.channels.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publication::Epoch;

    /// Offset `offset` of epoch `e`.
    fn at(offset: u64) -> Position {
        in_epoch("e", offset)
    }

    fn in_epoch(epoch: &str, offset: u64) -> Position {
        Position {
            epoch: Epoch::parse(epoch).unwrap(),
            offset,
        }
    }

    #[test]
    fn a_gap_into_another_epoch_held_after_the_read_is_released() {
        let reg = Registry::new();
        // The read said e:11; then the history was lost: gap f:0, and f:1 on.
        let (late, mut rx) = reg.register(QueueBounds::frames(8));
        reg.subscribe_held(&late, "h");
        reg.fanout("h", &"e12".into(), Some(&at(12)));
        reg.fanout_gap("h", &"gap f0".into(), &in_epoch("f", 0));
        reg.fanout("h", &"f1".into(), Some(&in_epoch("f", 1)));
        assert_eq!(
            reg.release(&late, "h", Some(&at(11)), vec!["ack e11".into()]),
            3
        );
        // Live offsets of the new epoch are not held to the old floor.
        reg.fanout("h", &"f2".into(), Some(&in_epoch("f", 2)));
        assert_eq!(rx.take_all(), ["ack e11", "e12", "gap f0", "f1", "f2"]);
        // The read found the new epoch already: what the node still delivers of
        // the old one, and the gap into the epoch the ack names, are dropped.
        let (late, mut rx) = reg.register(QueueBounds::frames(8));
        reg.subscribe_held(&late, "h");
        reg.fanout("h", &"e13".into(), Some(&at(13)));
        reg.fanout_gap("h", &"gap f0".into(), &in_epoch("f", 0));
        reg.fanout("h", &"f1".into(), Some(&in_epoch("f", 1)));
        reg.fanout("h", &"f2".into(), Some(&in_epoch("f", 2)));
        reg.release(&late, "h", Some(&in_epoch("f", 1)), vec!["ack f1".into()]);
        assert_eq!(rx.take_all(), ["ack f1", "f2"]);
    }

    #[test]
    fn subscribe_fanout_unsubscribe() {
        let reg = Registry::new();
        let (a, mut rx_a) = reg.register(QueueBounds::frames(8));
        let (b, mut rx_b) = reg.register(QueueBounds::frames(8));
        assert_ne!(a.id(), b.id());

        assert!(reg.subscribe(&a, "room"));
        assert!(!reg.subscribe(&a, "room"), "second subscribe is a no-op");
        assert!(reg.subscribe(&b, "room"));
        assert!(reg.subscribe(&b, "other"));
        assert_eq!(
            reg.stats(),
            RegistryStats {
                connections: 2,
                subscriptions: 3,
                channels: 2
            }
        );

        assert_eq!(reg.fanout("room", &"m1".into(), None), 2);
        assert_eq!(reg.fanout("nobody", &"m2".into(), None), 0);
        assert_eq!(rx_a.take_all(), ["m1"]);
        assert_eq!(rx_b.take_all(), ["m1"]);

        assert_eq!(reg.unsubscribe(a.id(), "room"), Some(false));
        assert_eq!(reg.unsubscribe(a.id(), "room"), None);
        assert_eq!(reg.unsubscribe(b.id(), "room"), Some(true), "last one out");
        assert!(!reg.has_subscribers("room"));
        assert_eq!(reg.channel_names(), vec!["other".to_string()]);
    }

    #[test]
    fn deregister_reports_emptied_channels() {
        let reg = Registry::new();
        let (a, _rx_a) = reg.register(QueueBounds::frames(8));
        let (b, _rx_b) = reg.register(QueueBounds::frames(8));
        reg.subscribe(&a, "shared");
        reg.subscribe(&b, "shared");
        reg.subscribe(&a, "solo");
        let mut emptied = reg.deregister(a.id());
        emptied.sort();
        assert_eq!(emptied, vec!["solo".to_string()]);
        assert_eq!(reg.deregister(b.id()), vec!["shared".to_string()]);
        assert_eq!(
            reg.stats(),
            RegistryStats {
                connections: 0,
                subscriptions: 0,
                channels: 0
            }
        );
        assert!(reg.deregister(b.id()).is_empty(), "idempotent");
        assert!(
            !reg.subscribe(&a, "x"),
            "a deregistered connection cannot subscribe"
        );
    }

    #[test]
    fn slow_subscriber_is_closed_without_affecting_others() {
        let reg = Registry::new();
        let (slow, _keep) = reg.register(QueueBounds::frames(1));
        let (fast, mut rx_fast) = reg.register(QueueBounds::frames(16));
        reg.subscribe(&slow, "c");
        reg.subscribe(&fast, "c");
        for i in 0..5 {
            reg.fanout("c", &format!("{i}").into(), None);
        }
        assert_eq!(
            slow.close_reason(),
            Some(crate::client::CloseReason::SlowConsumer)
        );
        let expected: Vec<Frame> = (0..5).map(|i| Frame::from(i.to_string())).collect();
        assert_eq!(rx_fast.take_all(), expected);
    }

    #[test]
    fn a_held_subscription_is_released_without_loss_or_duplicates() {
        let reg = Registry::new();
        let (live, mut rx_live) = reg.register(QueueBounds::frames(8));
        let (late, mut rx_late) = reg.register(QueueBounds::frames(8));
        reg.subscribe(&live, "h");
        assert!(reg.subscribe_held(&late, "h"));
        for offset in 5..=7u64 {
            reg.fanout("h", &format!("m{offset}").into(), Some(&at(offset)));
        }
        assert_eq!(rx_live.take_all(), ["m5", "m6", "m7"]);
        assert!(rx_late.take_all().is_empty(), "held back");
        // The recovery read up to offset 6: 7 is the only held frame it lacks.
        let released = reg.release(
            &late,
            "h",
            Some(&at(6)),
            vec!["r5".into(), "r6".into(), "ack".into()],
        );
        assert_eq!(released, 1);
        reg.fanout("h", &"m8".into(), Some(&at(8)));
        // The same message may still arrive live after the recovery read it.
        reg.fanout("h", &"m6-again".into(), Some(&at(6)));
        reg.fanout("h", &"m9".into(), Some(&at(9)));
        assert_eq!(rx_late.take_all(), ["r5", "r6", "ack", "m7", "m8", "m9"]);
        assert_eq!(rx_live.take_all(), ["m8", "m6-again", "m9"]);
        // A gap starts over: offsets of a new epoch are not held to the old floor.
        reg.fanout_gap("h", &"gap".into(), &at(0));
        reg.fanout("h", &"new1".into(), Some(&at(1)));
        assert_eq!(rx_late.take_all(), ["gap", "new1"]);
        // Held back, a gap at or below where the recovery got to is dropped with
        // the frames it covers: the ack already says where the client stands.
        let (again, mut rx_again) = reg.register(QueueBounds::frames(8));
        reg.subscribe_held(&again, "h");
        reg.fanout_gap("h", &"gap@0".into(), &at(0));
        reg.fanout("h", &"new2".into(), Some(&at(2)));
        reg.fanout_gap("h", &"gap@3".into(), &at(3));
        reg.release(&again, "h", Some(&at(2)), vec!["ack@2".into()]);
        assert_eq!(rx_again.take_all(), ["ack@2", "gap@3"]);
    }

    #[test]
    fn an_overflowing_hold_back_closes_only_that_client() {
        let reg = Registry::new();
        let (late, _rx) = reg.register(QueueBounds::frames(2));
        let bounds = QueueBounds {
            frames: 100,
            bytes: 10,
        };
        let (big, _rx_big) = reg.register(bounds);
        let (live, mut rx_live) = reg.register(QueueBounds::frames(8));
        reg.subscribe_held(&late, "h");
        reg.subscribe_held(&big, "h");
        reg.subscribe(&live, "h");
        reg.fanout("h", &"m".into(), Some(&at(1)));
        reg.fanout("h", &"1234567890".into(), Some(&at(2)));
        assert_eq!(
            big.close_reason(),
            Some(CloseReason::HoldBackOverflow),
            "11 bytes"
        );
        assert_eq!(late.close_reason(), None);
        reg.fanout("h", &"m".into(), Some(&at(3)));
        assert_eq!(
            late.close_reason(),
            Some(CloseReason::HoldBackOverflow),
            "3 frames"
        );
        assert_eq!(live.close_reason(), None);
        assert_eq!(rx_live.take_all().len(), 3);
    }
}
