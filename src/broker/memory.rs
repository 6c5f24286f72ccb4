//! The in-process broker: one node, no Redis. A publish is the local fan-out itself,
//! so it is accepted, ordered and delivered before `publish` returns.
//!
//! History has the Redis broker's semantics: a bounded ring of the last
//! `history-size` publications per channel, dropped `history-ttl` after the last
//! publish, and an epoch and top offset kept for `--history-meta-ttl`. A channel's
//! epoch is chosen at random when its position is created (so a restarted node, which
//! lost its history, has new epochs), and a channel whose position expired starts
//! again at offset 1 under a new epoch: an offset never means two messages.

use std::collections::VecDeque;
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::one::RefMut;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Delivery, History, HistoryRequest, every, select};
use crate::config::ChannelOptions;
use crate::publication::{Epoch, Position, Publication};

/// How often expired histories are dropped from memory (reads and publishes also
/// check expiry exactly, so this only bounds how long expired data occupies memory).
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Broker for a single node.
#[derive(Debug, Clone)]
pub struct MemoryBroker {
    inner: std::sync::Arc<Inner>,
    /// Presence: this node is the whole cluster.
    pub(super) presence: std::sync::Arc<super::presence::Table>,
    /// This node's last announcement: the cluster view of a one-node cluster. Why a
    /// mutex: written every few seconds, read by the API.
    pub(super) announcement: std::sync::Arc<std::sync::Mutex<Option<crate::cluster::Announcement>>>,
    /// The samples of its last announcements, oldest first, for the charts
    /// (bounded by [`crate::cluster::history_len`]).
    samples: std::sync::Arc<std::sync::Mutex<VecDeque<crate::cluster::Sample>>>,
    /// Connections by user: this node's are the cluster's.
    pub(super) users: std::sync::Arc<super::presence::Table>,
    /// Revocations (`POST /api/revoke`), by key (`jti:<id>`, `user:<id>`): the
    /// value (the user's `issued_before`, or 1) and when it expires.
    pub(super) revoked: std::sync::Arc<DashMap<String, (u64, Instant)>>,
}

#[derive(Debug)]
struct Inner {
    delivery: Delivery,
    meta_ttl: Duration,
    /// Most channels whose history or position is kept (`--max-channels`): beyond,
    /// the positions closest to expiring are evicted, as Redis evicts keys under
    /// `maxmemory` (a channel evicted starts over under a new epoch).
    max_histories: usize,
    /// Channels with history (or a position). Why a `DashMap`: a publish holds its
    /// channel's entry while it assigns the offset and fans out, which orders the
    /// publications of one channel without serialising other channels.
    channels: DashMap<String, ChannelHistory>,
}

#[derive(Debug)]
struct ChannelHistory {
    epoch: Epoch,
    top: u64,
    /// The last publications, oldest first; at most the channel's `history-size`.
    ring: VecDeque<Publication>,
    /// When `ring` expires (`history-ttl` after the last publish).
    ring_expires: Instant,
    /// When the position expires (`--history-meta-ttl` after the last publish).
    meta_expires: Instant,
}

impl ChannelHistory {
    fn new(now: Instant, meta_ttl: Duration) -> Self {
        ChannelHistory {
            epoch: Epoch::random(),
            top: 0,
            ring: VecDeque::new(),
            ring_expires: now,
            meta_expires: now + meta_ttl,
        }
    }

    /// Applies expiry as of `now`.
    fn expire(&mut self, now: Instant, meta_ttl: Duration) {
        if now >= self.meta_expires {
            *self = ChannelHistory::new(now, meta_ttl);
        } else if now >= self.ring_expires {
            self.ring = VecDeque::new();
        }
    }

    fn position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            offset: self.top,
        }
    }
}

impl MemoryBroker {
    /// A broker delivering straight to this node's subscribers; its sweeper of
    /// expired histories runs until `shutdown`.
    pub fn start(
        delivery: Delivery,
        meta_ttl: Duration,
        max_histories: usize,
        shutdown: CancellationToken,
    ) -> Self {
        delivery.metrics.broker_up.set(1);
        let inner = std::sync::Arc::new(Inner {
            delivery,
            meta_ttl,
            max_histories,
            channels: DashMap::new(),
        });
        let weak = std::sync::Arc::downgrade(&inner);
        tokio::spawn(every(weak, SWEEP_INTERVAL, shutdown, sweep));
        Self {
            inner,
            presence: Default::default(),
            announcement: Default::default(),
            samples: Default::default(),
            users: Default::default(),
            revoked: Default::default(),
        }
    }

    /// Adds (or updates) a connection among its user's, unless the user has `max`
    /// (0: no limit) already.
    pub(super) fn user_add(&self, user: &str, entry: super::presence::Entry, max: usize) -> bool {
        let (_, count) = self.users.list(user, 0);
        let known = self
            .users
            .snapshot_of(user)
            .iter()
            .any(|e| e.member == entry.member);
        if max > 0 && !known && count >= max {
            return false;
        }
        self.users.add(user, entry);
        true
    }

    /// The server API's commands: this node is every node.
    pub(super) fn command(&self, command: &crate::users::Command) -> usize {
        let reached = self.inner.delivery.users.apply(command.clone());
        self.inner
            .delivery
            .metrics
            .user_commands
            .inc_by(reached as u64);
        1
    }

    /// Stores a revocation (kept `ttl`; a user's later time wins).
    pub(super) fn revoke(
        &self,
        user: &str,
        jti: Option<&str>,
        issued_before: Option<u64>,
        ttl: Duration,
    ) {
        let until = Instant::now() + ttl;
        self.revoked
            .retain(|_, (_, expires)| *expires > Instant::now());
        if let Some(jti) = jti {
            self.revoked.insert(format!("jti:{jti}"), (1, until));
        }
        if let Some(before) = issued_before {
            let mut entry = self
                .revoked
                .entry(format!("user:{user}"))
                .or_insert((0, until));
            *entry = (entry.0.max(before), until);
        }
    }

    /// Whether a revocation covers this token of `user`.
    pub(super) fn is_revoked(&self, user: Option<&str>, token: &crate::auth::TokenId) -> bool {
        let live = |key: String| {
            self.revoked
                .get(&key)
                .filter(|e| e.1 > Instant::now())
                .map(|e| e.0)
        };
        let by_id = token
            .jti
            .as_deref()
            .is_some_and(|jti| live(format!("jti:{jti}")).is_some());
        let before = user.and_then(|u| live(format!("user:{u}")));
        by_id || crate::users::revokes(Some(token), None, before)
    }

    /// Delivers the publication to the channel's local subscribers; with history,
    /// first stores it under the next offset, and returns that position.
    pub fn publish(
        &self,
        channel: &str,
        mut publication: Publication,
        options: ChannelOptions,
    ) -> Option<Position> {
        let inner = &self.inner;
        if !options.has_history() {
            inner.delivery.deliver(channel, &publication);
            return None;
        }
        let now = Instant::now();
        let mut history = inner.channel(channel, now);
        history.top += 1;
        let position = history.position();
        publication.position = Some(position.clone());
        history.ring_expires = now + options.history_ttl;
        history.meta_expires = now + inner.meta_ttl;
        // Delivered while the entry is held, so subscribers see offsets in order.
        inner.delivery.deliver(channel, &publication);
        history.ring.push_back(publication);
        while history.ring.len() > options.history_size {
            history.ring.pop_front();
        }
        Some(position)
    }

    /// A request for a streaming session: this node holds every session.
    pub(super) fn forward(&self, payload: Vec<u8>) -> bool {
        self.inner.delivery.streams.forwarded(payload.into())
    }

    /// Keeps this node's announcement and a sample of it.
    pub(super) fn announce(&self, announcement: crate::cluster::Announcement) {
        let interval = std::time::Duration::from_millis(announcement.info.interval_ms);
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.push_back((&announcement.info).into());
        while samples.len() > crate::cluster::history_len(interval) {
            samples.pop_front();
        }
        drop(samples);
        *self.announcement.lock().unwrap_or_else(|e| e.into_inner()) = Some(announcement);
    }

    /// This node's channels and their subscribers (exact, not as last announced):
    /// the whole cluster's. None before the node announced itself.
    pub(super) fn node_channels(&self) -> Vec<super::NodeChannels> {
        let announcement = self.announcement.lock().unwrap_or_else(|e| e.into_inner());
        let Some(id) = announcement.as_ref().map(|a| a.info.id.clone()) else {
            return Vec::new();
        };
        vec![(id, self.inner.delivery.registry.channel_counts())]
    }

    /// The samples of this node's last announcements.
    pub(super) fn node_history(&self) -> Vec<(String, Vec<crate::cluster::Sample>)> {
        let announcement = self.announcement.lock().unwrap_or_else(|e| e.into_inner());
        let Some(id) = announcement.as_ref().map(|a| a.info.id.clone()) else {
            return Vec::new();
        };
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        vec![(id, samples.iter().copied().collect())]
    }

    /// Reads a channel's position and stored publications.
    pub fn history(&self, channel: &str, request: &HistoryRequest) -> History {
        if !request.subscribing && !self.inner.channels.contains_key(channel) {
            // A read creates nothing (nor evicts a position to make room): offset 0
            // in an epoch that is not kept.
            let top = Position {
                epoch: Epoch::random(),
                offset: 0,
            };
            return History {
                top,
                publications: Vec::new(),
                truncated: false,
            };
        }
        let history = self.inner.channel(channel, Instant::now());
        let top = history.position();
        let (publications, truncated) = select(&top, history.ring.iter(), request);
        History {
            top,
            publications,
            truncated,
        }
    }
}

impl Inner {
    /// The history of `channel` as of `now` (expired parts dropped), created when
    /// missing; the channel's entry stays locked while the guard lives.
    fn channel(&self, channel: &str, now: Instant) -> RefMut<'_, String, ChannelHistory> {
        // Checked before the entry is taken: eviction locks every shard in turn.
        if self.channels.len() >= self.max_histories && !self.channels.contains_key(channel) {
            self.evict(now);
        }
        let mut history = self
            .channels
            .entry(channel.to_owned())
            .or_insert_with(|| ChannelHistory::new(now, self.meta_ttl));
        history.expire(now, self.meta_ttl);
        history
    }

    /// Drops expired positions, then, if the map is still full, the tenth of them
    /// closest to expiring (so a burst of new channels evicts in batches).
    fn evict(&self, now: Instant) {
        self.channels
            .retain(|_, history| now < history.meta_expires);
        if self.channels.len() < self.max_histories {
            return;
        }
        let mut expiries: Vec<Instant> = self.channels.iter().map(|h| h.meta_expires).collect();
        let cut = expiries.len() / 10;
        let (_, cutoff, _) = expiries.select_nth_unstable(cut);
        let cutoff = *cutoff;
        self.channels
            .retain(|_, history| history.meta_expires > cutoff);
    }
}

/// One sweep (every `SWEEP_INTERVAL`): drops expired histories and positions, so
/// channels published once do not hold memory forever.
async fn sweep(inner: std::sync::Arc<Inner>) {
    let now = Instant::now();
    inner.channels.retain(|_, history| {
        if now >= history.ring_expires && !history.ring.is_empty() {
            history.ring = VecDeque::new();
        }
        now < history.meta_expires
    });
}

#[cfg(test)]
mod tests {

    use bytes::Bytes;

    use super::*;
    use crate::publication::Kind;
    use crate::registry::Registry;

    #[tokio::test]
    async fn the_charts_samples_are_bounded() {
        let delivery = Delivery::for_tests(Registry::new());
        let broker = MemoryBroker::start(
            delivery,
            Duration::from_secs(3600),
            100,
            CancellationToken::new(),
        );
        // An hour's interval keeps one sample: the window holds no more.
        for at in 1..=3 {
            let info: crate::cluster::NodeInfo = serde_json::from_value(serde_json::json!({
                "id": "n1", "version": "0", "started_at": 0, "address": "x", "broker": "memory",
                "ready": true, "connections": at, "subscriptions": 0, "channels": 0,
                "published_per_s": 0.0, "delivered_per_s": 0.0, "announced_at": at,
                "interval_ms": 3_600_000,
            }))
            .unwrap();
            broker.announce(crate::cluster::Announcement {
                info,
                channels: Vec::new(),
            });
        }
        let history = broker.node_history();
        assert_eq!(history.len(), 1);
        assert_eq!(history[0].1, [crate::cluster::Sample(3, 3, 0.0, 0.0)]);
    }

    #[tokio::test]
    async fn positions_are_bounded_and_eviction_starts_a_new_epoch() {
        let delivery = Delivery::for_tests(Registry::new());
        let shutdown = CancellationToken::new();
        let broker =
            MemoryBroker::start(delivery, Duration::from_secs(3600), 100, shutdown.clone());
        let options = ChannelOptions {
            history_size: 10,
            history_ttl: Duration::from_secs(60),
            presence: false,
            join_leave: false,
            durability: crate::config::Durability::Leader,
            proxy_subscribe: false,
            proxy_publish: false,
        };
        let publication = Publication {
            kind: Kind::Message,
            data: Bytes::from_static(b"1"),
            from: None,
            position: None,
            traceparent: Bytes::new(),
            published_at_us: 0,
        };
        let first = broker.publish("c:0", publication.clone(), options).unwrap();
        for i in 1..1000 {
            broker.history(&format!("c:{i}"), &HistoryRequest::position());
            assert!(
                broker.inner.channels.len() <= 100,
                "{}",
                broker.inner.channels.len()
            );
        }
        // c:0 was the oldest: evicted, it starts over under a new epoch.
        let again = broker.publish("c:0", publication, options).unwrap();
        assert_eq!(again.offset, 1);
        assert_ne!(again.epoch, first.epoch);
        shutdown.cancel();
    }
}
