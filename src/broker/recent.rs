//! The node's cache of recent history: for each history channel this node
//! subscribes to, the publications it delivered last, so that a client recovering
//! on such a channel is answered without Redis (`--history-cache-bytes`).
//!
//! The cache is a [`Recent`] run per channel, owned by the channel's track in the
//! tracker: publications of one epoch with consecutive offsets, ending at the last
//! offset the node delivered. The tracker appends each publication it delivers,
//! under the same lock as the delivery, so a recovery reads the run either before
//! or after a publication reached the channel's subscribers, never between. A
//! publication that does not follow the run (a gap, a new epoch, a history gone
//! back after a failover) starts a new run: a run never has a hole, so whatever
//! range it covers, it covers every offset of.
//!
//! A run keeps the frames the node built for its publications when it delivered
//! them (see `delivery`), not the publications: a replay from it clones those
//! frames, one reference count each, instead of encoding every message again for
//! every recovering client (in a reconnect storm, 15 million messages: most of a
//! node's CPU, in the allocator). It also keeps, per message, what answering needs:
//! the offset, when it was published, and its size as stored in Redis.
//!
//! Why answering from it is exact: the client is subscribed (held back) before the
//! run is read, and the node delivers every later publication of the channel in
//! offset order (the tracker's guarantee); so the client gets the run's part it
//! missed, then everything after the run's end from the live path — exactly what a
//! subscriber that had stayed on this node got.
//!
//! Bounded in bytes: one [`Budget`] per node. Each run holds at most its share of
//! it (the budget over the channels cached), and at most `--max-recovery`
//! publications (a recovery never replays more) and the channel's `history-size`
//! (Redis keeps no more). A run that cannot grow within the budget gives up its
//! oldest publications first. A run is as old as its last publication: once the
//! channel's `history-ttl` has passed since then (Redis lets the stream expire), it
//! answers nothing but "nothing missed".

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::broker::{History, READ_OVERHEAD};
use crate::envelope;
use crate::frame::Frame;
use crate::metrics::Metrics;
use crate::publication::{Position, Publication};

/// The bytes every run of a node may hold together.
#[derive(Debug)]
pub(crate) struct Budget {
    max: usize,
    used: AtomicUsize,
    /// Runs alive (one per tracked channel): each may hold `max / runs`.
    runs: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl Budget {
    pub(crate) fn new(max: usize, metrics: Arc<Metrics>) -> Arc<Budget> {
        Arc::new(Budget {
            max,
            used: AtomicUsize::new(0),
            runs: AtomicUsize::new(0),
            metrics,
        })
    }

    /// Whether anything is cached at all (`--history-cache-bytes` above 0).
    pub(crate) fn enabled(&self) -> bool {
        self.max > 0
    }

    /// What one run may hold now.
    pub(crate) fn share(&self) -> usize {
        self.max / self.runs.load(Ordering::Relaxed).max(1)
    }

    /// Takes `bytes` if they fit the node's budget.
    fn try_take(&self, bytes: usize) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used + bytes <= self.max).then_some(used + bytes)
            })
            .is_ok();
        if taken {
            self.metrics.history_cache_bytes.inc_by(bytes as i64);
        }
        taken
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
        self.metrics.history_cache_bytes.dec_by(bytes as i64);
    }
}

/// How long and how much of a channel's history Redis keeps: its `history-size`
/// and `history-ttl` (from its namespace). A run keeps no more.
#[derive(Clone)]
pub(crate) struct Retention(Arc<RetentionOf>);

/// A channel's history size and TTL.
type RetentionOf = dyn Fn(&str) -> (usize, Duration) + Send + Sync;

impl Retention {
    pub(crate) fn new(of: impl Fn(&str) -> (usize, Duration) + Send + Sync + 'static) -> Self {
        Retention(Arc::new(of))
    }

    /// `channel`'s history size and TTL.
    pub(crate) fn of(&self, channel: &str) -> (usize, Duration) {
        (self.0)(channel)
    }
}

impl std::fmt::Debug for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Retention")
    }
}

/// One publication of a run: the frame its subscribers got, shared.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    frame: Frame,
    /// Its offset (the frame carries its position, epoch included).
    offset: u64,
    /// When the origin node accepted it (see `Publication::published_at_us`).
    published_at_us: u64,
    /// Its size as Redis stores it: what a read of it counts against its bytes.
    stored: usize,
    /// What it counts against the cache's budget: taken when it is made, and given
    /// back as it was (see [`Entry::cost`]).
    cost: usize,
}

impl Entry {
    /// The entry of `publication` of `channel` (of a channel with history), with
    /// the frame the node delivered for it.
    pub(crate) fn new(publication: &Publication, frame: Frame) -> Option<Entry> {
        Some(Entry {
            offset: publication.offset()?,
            published_at_us: publication.published_at_us,
            stored: envelope::encoded_len(publication),
            cost: std::mem::size_of::<Entry>() + frame.footprint(),
            frame,
        })
    }

    /// The entry of a publication read from Redis: its frame is built here, once,
    /// for every client it is replayed to.
    pub(crate) fn read(channel: &str, publication: &Publication) -> Option<Entry> {
        Entry::new(
            publication,
            crate::delivery::frame(channel, publication).shared(),
        )
    }

    fn position(&self) -> Option<&Position> {
        self.frame.positions().first().map(|(_, p)| p)
    }

    /// What it holds in memory: the entry and the frame (its text and its
    /// positions; see [`Frame::footprint`]), as they were when the entry was made.
    /// A compressed form built later, for a connection that negotiated
    /// compression, is not counted (it is kept only when smaller than the text);
    /// and what is given back is what was taken, or the budget's count would drift
    /// (and a run's own count go below zero).
    fn cost(&self) -> usize {
        self.cost
    }
}

/// Consecutive publications of one epoch ending at `top`, as a run or a read of
/// a channel's tail gives them: what [`answer`] answers from.
#[derive(Debug, Clone)]
pub(crate) struct Tail {
    /// The channel's position: the last publication's, when there is one.
    pub(crate) top: Position,
    /// Oldest first. A read from Redis may have holes (entries the node could not
    /// decode); a run has none.
    pub(crate) entries: Vec<Entry>,
    /// A read left publications out: they did not fit its bytes.
    pub(crate) truncated: bool,
}

impl Tail {
    /// A read of `channel`'s history, with a frame built for each publication.
    pub(crate) fn read(channel: &str, history: &History) -> Tail {
        Tail {
            top: history.top.clone(),
            entries: history
                .publications
                .iter()
                .filter_map(|p| Entry::read(channel, p))
                .collect(),
            truncated: history.truncated,
        }
    }

    /// The frames, oldest first.
    pub(crate) fn frames(self) -> Vec<Frame> {
        self.entries.into_iter().map(|e| e.frame).collect()
    }

    /// The offsets, oldest first.
    #[cfg(test)]
    pub(crate) fn offsets(&self) -> Vec<u64> {
        self.entries.iter().map(|e| e.offset).collect()
    }
}

/// One channel's run of recent publications: one epoch, consecutive offsets.
#[derive(Debug)]
pub(crate) struct Recent {
    run: VecDeque<Entry>,
    /// What `run` costs (see [`cost`]), taken from the budget.
    bytes: usize,
    /// Most publications kept: `--max-recovery` and the channel's `history-size`.
    max_len: usize,
    /// The channel's `history-ttl`.
    ttl: Duration,
    budget: Arc<Budget>,
}

/// How much sooner than Redis a run is taken as expired: the clocks of the node
/// that stamped a publication and of this one may differ a little (NTP), and Redis
/// counts from the publish, a moment before the node received it.
const EXPIRY_MARGIN: Duration = Duration::from_secs(1);

impl Recent {
    /// A run of at most `max_len` publications of a channel whose history Redis
    /// keeps for `ttl` after its last publish.
    pub(crate) fn new(budget: Arc<Budget>, max_len: usize, ttl: Duration) -> Recent {
        budget.runs.fetch_add(1, Ordering::Relaxed);
        Recent {
            run: VecDeque::new(),
            bytes: 0,
            max_len,
            ttl,
            budget,
        }
    }

    /// Whether `later`'s publication comes so long after `earlier`'s that the
    /// stream may have expired in between. An unknown time (0) is taken as fresh.
    fn outlived(&self, earlier: &Entry, later_us: u64) -> bool {
        let keep = self.ttl.saturating_sub(EXPIRY_MARGIN).as_micros() as u64;
        earlier.published_at_us != 0 && later_us.saturating_sub(earlier.published_at_us) >= keep
    }

    /// Whether Redis may have let the channel's stream expire by now.
    fn expired(&self) -> bool {
        self.run
            .back()
            .is_some_and(|last| self.outlived(last, envelope::now_us()))
    }

    /// The position of the run's last publication.
    fn last(&self) -> Option<&Position> {
        self.run.back().and_then(Entry::position)
    }

    /// The offset of the run's first publication.
    fn first_offset(&self) -> Option<u64> {
        self.run.front().map(|e| e.offset)
    }

    /// Appends a publication the node just delivered, with the frame it delivered.
    /// One that does not follow the run (another epoch, not the next offset) starts
    /// a new one.
    pub(crate) fn push(&mut self, publication: &Publication, frame: &Frame) {
        if !self.budget.enabled() {
            return;
        }
        let Some(position) = &publication.position else {
            return;
        };
        let follows = self
            .last()
            .is_some_and(|l| l.epoch == position.epoch && l.offset + 1 == position.offset);
        let outlived = self
            .run
            .back()
            .is_some_and(|last| self.outlived(last, publication.published_at_us));
        if !follows || outlived {
            // After a gap, another epoch, or a stream that expired meanwhile (its
            // meta lives on, so the offsets go on without the older messages).
            self.clear();
        }
        let Some(entry) = Entry::new(publication, frame.clone()) else {
            return;
        };
        let cost = entry.cost();
        let share = self.budget.share();
        while !self.run.is_empty() && (self.run.len() >= self.max_len || self.bytes + cost > share)
        {
            self.pop_front();
        }
        self.fit_capacity();
        // Other runs may hold the budget: then this one gives up its oldest too,
        // down to nothing (a run always ends at the last offset delivered).
        while self.max_len > 0 && cost <= share {
            if self.budget.try_take(cost) {
                self.bytes += cost;
                self.run.push_back(entry);
                return;
            }
            if self.run.is_empty() {
                return;
            }
            self.pop_front();
        }
    }

    /// Puts publications read from Redis in front of the run: `history`, read
    /// after the run's channel was subscribed, reaches the run's start (same
    /// epoch), or, when the run is empty, the offset `last` the node delivered
    /// last. It may end past them: Redis answers the read on one connection while
    /// the newest publications it holds are still on their way to the node on
    /// another (they join the run as they are delivered). Only what the run lacks
    /// below its start goes in. An answer that does not reach the run (the run
    /// moved on to another epoch, or past a gap) is left out. Keeps the newest
    /// that fit.
    pub(crate) fn backfill(&mut self, history: &Tail, last: &Position) {
        if !self.budget.enabled() {
            return;
        }
        let top = &history.top;
        // Where the run starts, or starts once the next delivery joins it.
        let (epoch, start) = match (self.last(), self.first_offset()) {
            (Some(l), Some(first)) => (&l.epoch, first),
            _ => (&last.epoch, last.offset.saturating_add(1)),
        };
        if top.epoch != *epoch || top.offset.saturating_add(1) < start {
            return;
        }
        // The newest part without a hole (Redis may hold an entry the node could
        // not decode).
        let whole = history.entries.len() - holes_from_the_end(&history.entries, top);
        let newest = &history.entries[history.entries.len() - whole..];
        let share = self.budget.share();
        for entry in newest.iter().rev() {
            if entry.offset >= start {
                continue;
            }
            let cost = entry.cost();
            if self.run.len() >= self.max_len
                || self.bytes + cost > share
                || !self.budget.try_take(cost)
            {
                break;
            }
            self.bytes += cost;
            self.run.push_front(entry.clone());
        }
    }

    /// The run's publications after offset `after` as a history read's answer
    /// (oldest first, ending at `top`), if the run ends at the last position
    /// delivered, `top`. None of them when the run does not reach back to `after`,
    /// is empty or expired (see [`answer`]: that answers "nothing missed", or
    /// "more missed than a recovery replays"; the rest is for Redis to say).
    pub(crate) fn read(&self, top: &Position, after: u64) -> Option<Tail> {
        let nothing = || {
            Some(Tail {
                top: top.clone(),
                entries: Vec::new(),
                truncated: false,
            })
        };
        if self.run.is_empty() || self.expired() {
            return nothing();
        }
        if self.last()? != top {
            return None;
        }
        let first = self.first_offset()?;
        let entries = if after < top.offset && after + 1 >= first {
            self.run
                .range((after + 1 - first) as usize..)
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        Some(Tail {
            top: top.clone(),
            entries,
            truncated: false,
        })
    }

    /// Gives up its oldest publications until it holds its share of the budget
    /// (which shrinks as more channels are cached).
    pub(crate) fn trim(&mut self) {
        let share = self.budget.share();
        while !self.run.is_empty() && (self.bytes > share || self.expired()) {
            self.pop_front();
        }
        self.fit_capacity();
    }

    pub(crate) fn clear(&mut self) {
        self.budget.give_back(self.bytes);
        self.bytes = 0;
        self.run = VecDeque::new();
    }

    /// Gives back the room of publications given up: the budget counts the
    /// publications kept, and the slots of a run that was long once would
    /// otherwise stay with it.
    fn fit_capacity(&mut self) {
        if self.run.capacity() > 2 * self.run.len() + 16 {
            self.run.shrink_to(self.run.len() + 8);
        }
    }

    fn pop_front(&mut self) {
        if let Some(e) = self.run.pop_front() {
            let cost = e.cost();
            self.bytes -= cost;
            self.budget.give_back(cost);
        }
    }
}

impl Drop for Recent {
    fn drop(&mut self) {
        self.clear();
        self.budget.runs.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many of `entries`, from the newest, have consecutive offsets of `top`'s
/// epoch ending at it; the rest is returned as `len - that`.
fn holes_from_the_end(entries: &[Entry], top: &Position) -> usize {
    let whole = entries
        .iter()
        .rev()
        .zip((0..=top.offset).rev())
        .take_while(|(e, expected)| {
            e.offset == *expected && e.position().is_some_and(|q| q.epoch == top.epoch)
        })
        .count();
    entries.len() - whole
}

/// How a recovery from `since` is answered by a run of publications ending at
/// `run.top` (a cached run, or the channel's tail read from Redis).
#[derive(Debug)]
pub(crate) enum Answer {
    /// Everything after `since` (maybe nothing), within the read's bounds.
    Recovered(Tail),
    /// Not recoverable, whatever Redis holds: more than `limit` publications
    /// follow `since`, or they need more than the read's bytes. The position stands.
    Lost(Tail),
    /// The run does not reach back to `since` (or is of another epoch, or behind
    /// it): only Redis can say.
    Unknown,
}

/// Answers a recovery of the publications after `since` (all or nothing, at most
/// `limit`, at most `max_bytes` counted as a client read counts them) from a run of
/// consecutive publications ending at `run.top` — as the history script would
/// answer it from the stream.
pub(crate) fn answer(since: &Position, run: &Tail, limit: usize, max_bytes: usize) -> Answer {
    let top = &run.top;
    // A tail read cut short by its bytes still ends at `top` without a hole.
    if since.epoch != top.epoch || since.offset > top.offset {
        return Answer::Unknown;
    }
    let nothing = || Tail {
        top: top.clone(),
        entries: Vec::new(),
        truncated: false,
    };
    let missed = top.offset - since.offset;
    if missed > limit as u64 {
        return Answer::Lost(nothing());
    }
    if missed > run.entries.len() as u64 {
        return Answer::Unknown;
    }
    let replay = &run.entries[run.entries.len() - missed as usize..];
    if holes_from_the_end(replay, top) > 0 {
        return Answer::Unknown;
    }
    let bytes: usize = replay.iter().map(|e| e.stored + READ_OVERHEAD).sum();
    if bytes > max_bytes {
        return Answer::Lost(Tail {
            truncated: true,
            ..nothing()
        });
    }
    Answer::Recovered(Tail {
        top: top.clone(),
        entries: replay.to_vec(),
        truncated: false,
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::publication::{Epoch, Kind};

    fn pos(e: &str, offset: u64) -> Position {
        Position {
            epoch: Epoch::parse(e).unwrap(),
            offset,
        }
    }

    fn publication(e: &str, offset: u64) -> Publication {
        Publication {
            kind: Kind::Message,
            data: Bytes::from(format!("{e}-{offset:04}")),
            from: None,
            position: Some(pos(e, offset)),
            traceparent: Bytes::new(),
            published_at_us: envelope::now_us(),
        }
    }

    const TTL: Duration = Duration::from_secs(300);

    /// A publication made `ago` before now.
    fn published(e: &str, offset: u64, ago: Duration) -> Publication {
        Publication {
            published_at_us: envelope::now_us() - ago.as_micros() as u64,
            ..publication(e, offset)
        }
    }

    #[test]
    fn a_run_is_as_old_as_its_last_publication() {
        let b = budget(1 << 20);
        let mut r = Recent::new(b.clone(), 1000, TTL);
        for o in 1..=3 {
            r.add(&published("e", o, Duration::from_secs(400)));
        }
        // Redis let the stream expire: only "nothing missed" is answered.
        assert!(r.read(&pos("e", 3), 3).unwrap().entries.is_empty());
        assert!(r.read(&pos("e", 3), 1).unwrap().entries.is_empty());
        // A publication after the stream expired starts a run of its own (the
        // offsets go on, the older messages are gone).
        r.add(&publication("e", 4));
        assert_eq!(offsets(&r.whole(&pos("e", 4)).unwrap()), [4]);
        // The position check's round gives an expired run up.
        let mut old = Recent::new(b.clone(), 1000, TTL);
        old.add(&published("e", 1, Duration::from_secs(400)));
        old.trim();
        assert_eq!(old.bytes, 0);
    }

    #[test]
    fn an_empty_run_answers_only_nothing_missed_or_too_much() {
        let b = budget(1 << 20);
        let r = Recent::new(b, 1000, TTL);
        let run = r.read(&pos("e", 40), 40).unwrap();
        assert!(
            matches!(answer(&pos("e", 40), &run, 100, 1 << 20), Answer::Recovered(h) if h.entries.is_empty())
        );
        let run = r.read(&pos("e", 40), 39).unwrap();
        assert!(matches!(
            answer(&pos("e", 39), &run, 100, 1 << 20),
            Answer::Unknown
        ));
        assert!(matches!(
            answer(&pos("e", 39), &run, 0, 1 << 20),
            Answer::Lost(_)
        ));
    }

    #[test]
    fn a_hole_matters_only_in_what_is_replayed() {
        // Redis held an entry the node could not decode: 7 is missing.
        let mut publications: Vec<_> = (5..=10).map(|o| publication("e", o)).collect();
        publications.retain(|p| p.offset() != Some(7));
        let run = Tail::read(
            "c",
            &History {
                top: pos("e", 10),
                publications,
                truncated: false,
            },
        );
        assert!(matches!(
            answer(&pos("e", 8), &run, 100, 1 << 20),
            Answer::Recovered(_)
        ));
        assert!(matches!(
            answer(&pos("e", 6), &run, 100, 1 << 20),
            Answer::Unknown
        ));
        // The part after the hole fills the cache.
        let b = budget(1 << 20);
        let mut r = Recent::new(b, 1000, TTL);
        r.backfill(&run, &pos("e", 10));
        assert_eq!(offsets(&r.whole(&pos("e", 10)).unwrap()), [8, 9, 10]);
    }

    fn offsets(tail: &Tail) -> Vec<u64> {
        tail.offsets()
    }

    fn run_of(budget: &Arc<Budget>, e: &str, range: std::ops::RangeInclusive<u64>) -> Recent {
        let mut recent = Recent::new(budget.clone(), 1000, TTL);
        for o in range {
            recent.add(&publication(e, o));
        }
        recent
    }

    impl Recent {
        /// Appends `publication`, with its frame, as the tracker does after a
        /// delivery.
        fn add(&mut self, publication: &Publication) {
            self.push(publication, &crate::delivery::frame("c", publication));
        }

        /// The whole run, if it ends at `top`.
        fn whole(&self, top: &Position) -> Option<Tail> {
            self.read(top, self.first_offset().unwrap_or(1) - 1)
        }
    }

    #[test]
    fn a_read_takes_what_follows_its_offset() {
        let b = budget(1 << 20);
        let r = run_of(&b, "e", 5..=9);
        assert_eq!(offsets(&r.read(&pos("e", 9), 6).unwrap()), [7, 8, 9]);
        assert_eq!(offsets(&r.read(&pos("e", 9), 4).unwrap()), [5, 6, 7, 8, 9]);
        assert!(r.read(&pos("e", 9), 9).unwrap().entries.is_empty());
        // Not reaching back to it: nothing (Redis says).
        assert!(r.read(&pos("e", 9), 3).unwrap().entries.is_empty());
        assert!(r.read(&pos("e", 9), 12).unwrap().entries.is_empty());
    }

    fn budget(max: usize) -> Arc<Budget> {
        Budget::new(max, Arc::new(Metrics::new()))
    }

    #[test]
    fn a_run_has_no_hole_and_one_epoch() {
        let b = budget(1 << 20);
        let mut r = run_of(&b, "e", 1..=5);
        assert_eq!(offsets(&r.whole(&pos("e", 5)).unwrap()), [1, 2, 3, 4, 5]);
        // A gap: the run starts again.
        r.add(&publication("e", 8));
        assert_eq!(offsets(&r.whole(&pos("e", 8)).unwrap()), [8]);
        // A new epoch: again.
        r.add(&publication("f", 1));
        assert_eq!(offsets(&r.whole(&pos("f", 1)).unwrap()), [1]);
        // The node delivered further without it (a gap reported): no answer.
        assert!(r.whole(&pos("f", 3)).is_none());
        assert!(r.whole(&pos("e", 1)).is_none());
    }

    #[test]
    fn an_entry_gives_back_what_it_took_though_compressed_since() {
        let b = budget(1 << 20);
        let mut r = Recent::new(b.clone(), 1, TTL);
        let first = publication("e", 1);
        let frame = crate::delivery::frame("c", &first).shared();
        r.push(&first, &frame);
        assert_eq!(b.used.load(Ordering::Relaxed), r.bytes);
        // A connection that negotiated permessage-deflate compresses the frame the
        // run shares with the subscribers after it was cached.
        frame.deflated(|text| Some(Bytes::from(text.to_vec())));
        // The next one pushes it out, and the trim of an expired run empties it.
        r.add(&publication("e", 2));
        assert_eq!(b.used.load(Ordering::Relaxed), r.bytes);
        r.ttl = Duration::ZERO;
        r.trim();
        assert!(r.run.is_empty());
        assert_eq!((r.bytes, b.used.load(Ordering::Relaxed)), (0, 0));
    }

    #[test]
    fn the_budget_bounds_every_run_together() {
        let one = Entry::read("c", &publication("e", 10)).unwrap().cost();
        let b = budget(10 * one);
        let mut a = run_of(&b, "e", 10..=29);
        assert_eq!(
            offsets(&a.whole(&pos("e", 29)).unwrap()),
            (20..=29).collect::<Vec<_>>()
        );
        // A second run halves each one's share: while the first holds the whole
        // budget, it keeps nothing; once the first is trimmed, half.
        let mut c = run_of(&b, "e", 10..=29);
        assert!(c.whole(&pos("e", 29)).unwrap().entries.is_empty());
        assert!(b.used.load(Ordering::Relaxed) <= 10 * one);
        a.trim();
        assert_eq!(a.whole(&pos("e", 29)).unwrap().entries.len(), 5);
        for o in 30..=40 {
            c.add(&publication("e", o));
        }
        assert_eq!(
            offsets(&c.whole(&pos("e", 40)).unwrap()),
            (36..=40).collect::<Vec<_>>()
        );
        assert!(b.used.load(Ordering::Relaxed) <= 10 * one);
        drop(a);
        drop(c);
        assert_eq!(b.used.load(Ordering::Relaxed), 0, "all given back");
        assert_eq!(b.runs.load(Ordering::Relaxed), 0);
        // No budget: nothing kept.
        let off = budget(0);
        let none = run_of(&off, "e", 1..=3);
        assert!(none.whole(&pos("e", 3)).unwrap().entries.is_empty());
    }

    #[test]
    fn a_run_keeps_at_most_a_recovery() {
        let b = budget(1 << 20);
        let mut r = Recent::new(b, 3, TTL);
        for o in 1..=10 {
            r.add(&publication("e", o));
        }
        assert_eq!(offsets(&r.whole(&pos("e", 10)).unwrap()), [8, 9, 10]);
    }

    #[test]
    fn a_read_from_redis_is_put_in_front_only_where_it_meets_the_run() {
        let b = budget(1 << 20);
        let read = |e: &str, range: std::ops::RangeInclusive<u64>| {
            Tail::read(
                "c",
                &History {
                    top: pos(e, *range.end()),
                    publications: range.map(|o| publication(e, o)).collect(),
                    truncated: false,
                },
            )
        };
        // Empty run: only an answer at the last offset delivered.
        let mut r = Recent::new(b.clone(), 1000, TTL);
        r.backfill(&read("e", 1..=4), &pos("e", 5));
        assert!(r.whole(&pos("e", 5)).unwrap().entries.is_empty());
        r.backfill(&read("e", 1..=5), &pos("e", 5));
        assert_eq!(offsets(&r.whole(&pos("e", 5)).unwrap()), [1, 2, 3, 4, 5]);
        // Read past what the node delivered so far (6 and 7 are on their way): up
        // to the last offset delivered, and the next delivery follows.
        let mut r = Recent::new(b.clone(), 1000, TTL);
        r.backfill(&read("e", 1..=7), &pos("e", 5));
        assert_eq!(offsets(&r.whole(&pos("e", 5)).unwrap()), [1, 2, 3, 4, 5]);
        r.add(&publication("e", 6));
        assert_eq!(offsets(&r.whole(&pos("e", 6)).unwrap()), [1, 2, 3, 4, 5, 6]);
        // The same in front of a run.
        let mut r = run_of(&b, "e", 6..=9);
        r.backfill(&read("e", 2..=12), &pos("e", 9));
        assert_eq!(
            offsets(&r.whole(&pos("e", 9)).unwrap()),
            [2, 3, 4, 5, 6, 7, 8, 9]
        );

        // A run 6..=9, read 2..=7 overlaps it: 2..=5 go in front.
        let mut r = run_of(&b, "e", 6..=9);
        r.backfill(&read("e", 2..=7), &pos("e", 9));
        assert_eq!(
            offsets(&r.whole(&pos("e", 9)).unwrap()),
            [2, 3, 4, 5, 6, 7, 8, 9]
        );
        // Ending right before it: too.
        let mut r = run_of(&b, "e", 6..=9);
        r.backfill(&read("e", 3..=5), &pos("e", 9));
        assert_eq!(
            offsets(&r.whole(&pos("e", 9)).unwrap()),
            [3, 4, 5, 6, 7, 8, 9]
        );
        // Not meeting it (a gap between), or of another epoch: left out; with a
        // hole (an entry the node could not decode), the part after it.
        let mut r = run_of(&b, "e", 6..=9);
        r.backfill(&read("e", 1..=4), &pos("e", 9));
        r.backfill(&read("f", 1..=7), &pos("e", 9));
        assert_eq!(offsets(&r.whole(&pos("e", 9)).unwrap()), [6, 7, 8, 9]);
        let mut holed = read("e", 1..=7);
        holed.entries.remove(2);
        r.backfill(&holed, &pos("e", 9));
        assert_eq!(offsets(&r.whole(&pos("e", 9)).unwrap()), [4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn answers_are_those_of_the_history_script() {
        let run = Tail::read(
            "c",
            &History {
                top: pos("e", 10),
                publications: (6..=10).map(|o| publication("e", o)).collect(),
                truncated: false,
            },
        );
        let recovered = |a: Answer| match a {
            Answer::Recovered(h) => offsets(&h),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            recovered(answer(&pos("e", 7), &run, 100, 1 << 20)),
            [8, 9, 10]
        );
        assert_eq!(
            recovered(answer(&pos("e", 10), &run, 100, 1 << 20)),
            Vec::<u64>::new()
        );
        assert_eq!(
            recovered(answer(&pos("e", 5), &run, 100, 1 << 20)),
            [6, 7, 8, 9, 10]
        );
        // Before the run: Redis may hold more.
        assert!(matches!(
            answer(&pos("e", 4), &run, 100, 1 << 20),
            Answer::Unknown
        ));
        // Other epoch, or ahead of the run: Redis decides.
        assert!(matches!(
            answer(&pos("f", 7), &run, 100, 1 << 20),
            Answer::Unknown
        ));
        assert!(matches!(
            answer(&pos("e", 11), &run, 100, 1 << 20),
            Answer::Unknown
        ));
        // More than the limit: lost whatever Redis holds.
        match answer(&pos("e", 1), &run, 5, 1 << 20) {
            Answer::Lost(h) => assert!(h.entries.is_empty() && !h.truncated),
            other => panic!("{other:?}"),
        }
        // More bytes than the read may return: lost, truncated.
        let two = [9, 10]
            .map(|o| envelope::encoded_len(&publication("e", o)) + READ_OVERHEAD)
            .iter()
            .sum();
        assert_eq!(recovered(answer(&pos("e", 8), &run, 100, two)), [9, 10]);
        match answer(&pos("e", 7), &run, 100, two) {
            Answer::Lost(h) => assert!(h.entries.is_empty() && h.truncated),
            other => panic!("{other:?}"),
        }
    }
}
