//! Admission of clients' history reads (recoveries, `history` requests,
//! `GET /api/history`): at most `--max-history-reads` run at once on a node, the
//! others wait their turn in order, for at most `--broker-timeout`.
//!
//! **Recoveries take turns** ([`HistoryReads::turn`]): at most `--max-recoveries`
//! run at once on a node, from before their subscription is made until the
//! connection's writer has taken their replay (its queue is under half its bounds
//! again, or `--broker-timeout` at most, so a client that does not read cannot keep
//! its turn); the writer then sends it 64 KiB at a time, yielding between writes.
//! A reconnect storm's replays are the node's work for seconds; while tens of
//! thousands of connections write theirs at once, every other task (a publisher's
//! request, its ack) waits behind all of them in the runtime's queue. Taking turns
//! keeps that queue short; the others wait parked, in order, before anything of
//! theirs is held back.
//!
//! Each read holds up to `--max-history-bytes` in the node and takes Redis time
//! from every publish of the cluster; without a bound, many clients reading at once
//! (a reconnect storm, a hostile client on many connections) would take both. The
//! node's own reads (position checks, repairs) do not come through here: they keep
//! delivery exact and are bounded elsewhere.
//!
//! **Identical reads share one** ([`HistoryReads::read`]). When a drained node's
//! clients come back, most of them recover the same channel from the same offset:
//! a read that finds the same read (channel, position, limits) still waiting for
//! its turn waits for that one's answer instead of taking a slot and Redis time of
//! its own. Only a read not yet sent can be joined: every client that joins it is
//! subscribed (held back, see `hub`) before the read runs in Redis, so the answer
//! covers what each of them missed, and the live publications after it reach each
//! of them; the hold-back drops what both carry, as for a read of its own.
//!
//! **A channel's fill is waited for** ([`HistoryReads::fill`]). A recovery the
//! node's cache of recent history could not answer reads the channel's tail to fill
//! it; a recovery of the same channel arriving while that read is waiting *or on its
//! way* waits for it to end, then asks the cache again. Its answer is the cache's,
//! read after the client was held back, so it does not matter when the tail was
//! read; only the client that ran the read uses its answer.
//!
//! **At most [`FILLS`] fills run at once** on a node, each in a slot too. A fill is
//! the largest read a node makes (a channel's whole tail, up to `history-size`
//! messages); the reads of a node share one connection, and Redis runs what a
//! connection pipelined back to back, so every fill in flight is Redis time a
//! publish of the cluster waits behind. At a reconnect storm's start each node
//! fills every channel once: with the slots alone (64), tens of fills at once
//! held publishes up to 75–113 ms (p99 56–84 ms); two at a time, 31–65 ms (p99
//! 26–43 ms; BENCHMARKS.md). Redis runs one read at a time whatever the number
//! sent, so the storm takes no longer.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OnceCell, Semaphore, SemaphorePermit};

use crate::broker::recent::Tail;
use crate::broker::{BrokerError, History, HistoryRequest};
use crate::metrics::Metrics;

/// A read and the clients waiting for it.
type Key = (String, HistoryRequest);

/// One read that clients of this node wait for, answering a `T`; joinable while
/// it is listed in its [`Flights`].
#[derive(Debug)]
struct Flight<T> {
    answer: OnceCell<Result<T, BrokerError>>,
}

/// Most fills of a node's cache of recent history running at once (see the module
/// doc).
const FILLS: usize = 2;

/// The node's history-read slots.
#[derive(Debug)]
pub(crate) struct HistoryReads {
    slots: Semaphore,
    /// Fills running (at most [`FILLS`]), each also in one of the `slots`.
    fill_slots: Semaphore,
    /// How many slots there are (for the refusal's message).
    size: usize,
    /// How long a read waits for a slot before it is refused.
    wait: Duration,
    metrics: Arc<Metrics>,
    /// The reads not sent yet, which an identical read joins. Bounded by the
    /// reads waiting (each leaves when it is sent, or when its last client gives
    /// up).
    flights: Flights<Key, History>,
    /// The fills of channels' caches in progress, which recoveries of the same
    /// channel wait for. One entry per channel being filled (it leaves when its
    /// read ends, or when its last client gave up).
    fills: Flights<String, Tail>,
    /// Recoveries' turns (`--max-recoveries`).
    turns: Semaphore,
}

/// A recovery's turn: it runs while this lives.
#[derive(Debug)]
pub(crate) struct Turn<'a> {
    _permit: SemaphorePermit<'a>,
    metrics: &'a Metrics,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.metrics.recoveries_running.dec();
    }
}

/// How a recovery's wait for a channel's fill ended.
#[derive(Debug)]
pub(crate) enum Fill {
    /// This client ran the read (read after it was held back): its answer.
    Led(Result<Tail, BrokerError>),
    /// Another client's read ended (it may have been read before this client was
    /// held back: ask the cache again), or this client's found no slot in time
    /// and read nothing (the same: the cache, then a read of its own).
    Joined,
}

/// A slot taken: the read runs while it lives.
#[derive(Debug)]
pub(crate) struct Admitted<'a> {
    _permit: SemaphorePermit<'a>,
    metrics: &'a Metrics,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.metrics.history_reads_running.dec();
    }
}

/// No slot came free in time.
#[derive(Debug, thiserror::Error)]
#[error("{0} history reads are running on this node; none finished within {1:?}")]
pub(crate) struct Busy(usize, Duration);

impl HistoryReads {
    pub(crate) fn new(
        slots: usize,
        recoveries: usize,
        wait: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        HistoryReads {
            turns: Semaphore::new(recoveries),
            slots: Semaphore::new(slots),
            fill_slots: Semaphore::new(FILLS),
            size: slots,
            wait,
            metrics,
            flights: Flights::default(),
            fills: Flights::default(),
        }
    }

    /// Waits for a recovery's turn, in order (each turn ends within
    /// `--broker-timeout` of its replay being queued, so every wait ends).
    pub(crate) async fn turn(&self) -> Turn<'_> {
        // Counted down however the wait ends (the client may leave meanwhile).
        let waiting = Waiting::new(&self.metrics.recoveries_waiting);
        let permit = self.turns.acquire().await;
        drop(waiting);
        self.metrics.recoveries_running.inc();
        Turn {
            // The semaphore is never closed.
            _permit: permit.expect("the turns' semaphore is never closed"),
            metrics: &self.metrics,
        }
    }

    /// Fills `channel`'s cache with `read` (after waiting for a slot), unless a fill
    /// of the channel is in progress: then waits for it to end instead, without a
    /// slot (bounded by that read's own wait and `--broker-timeout`).
    pub(crate) async fn fill<F, Fut>(&self, channel: &str, read: F) -> Fill
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Tail, BrokerError>>,
    {
        let key = channel.to_owned();
        let flight = self.fills.join(&key, &self.metrics);
        let led = std::sync::atomic::AtomicBool::new(false);
        // No slot came in time: nothing was read, and the client reads on its own
        // as a joiner would (the recovery is not refused for the fills' limit).
        let no_slot = std::sync::atomic::AtomicBool::new(false);
        let answer = flight
            .answer
            .get_or_init(|| async {
                // Runs in the first client, or in the next one if it gave up.
                led.store(true, std::sync::atomic::Ordering::Relaxed);
                // Out of the map however the read ends: a recovery arriving later
                // finds the cache filled, or fills it again.
                let _ended = self.fills.unlisted_on_drop(&key, &flight);
                // One wait, bounded as a read's: for a fill's turn, then a slot.
                let deadline = tokio::time::Instant::now() + self.wait;
                let filling = tokio::time::timeout_at(deadline, self.fill_slots.acquire()).await;
                let Ok(Ok(_filling)) = filling else {
                    no_slot.store(true, std::sync::atomic::Ordering::Relaxed);
                    return Err(BrokerError::Unavailable(format!(
                        "{FILLS} fills of the history cache are running on this node; none finished within {:?}",
                        self.wait
                    )));
                };
                let _admitted = match self.admit_by(deadline).await {
                    Ok(admitted) => admitted,
                    Err(busy) => {
                        no_slot.store(true, std::sync::atomic::Ordering::Relaxed);
                        return Err(BrokerError::Unavailable(busy.to_string()));
                    }
                };
                read().await
            })
            .await;
        if led.into_inner() && !no_slot.into_inner() {
            Fill::Led(answer.clone())
        } else {
            Fill::Joined
        }
    }

    /// Reads `request` of `channel` with `read`, after waiting for a slot when
    /// `admit` (a recovery, or a client's `history`; a position is a few bytes and
    /// does not wait) — unless the same read is already waiting for its turn on
    /// this node: then its answer is this one's too, and no slot is taken.
    ///
    /// The caller must have subscribed the client (held back) before: the read it
    /// joins is sent to Redis after that.
    pub(crate) async fn read<F, Fut>(
        &self,
        channel: &str,
        request: &HistoryRequest,
        admit: bool,
        read: F,
    ) -> Result<History, BrokerError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<History, BrokerError>>,
    {
        if !admit {
            // Sent at once: nobody could join it.
            return read().await;
        }
        let key = (channel.to_owned(), request.clone());
        let flight = self.flights.join(&key, &self.metrics);
        // The first client runs the read; one that joined runs it only if every
        // client before it gave up (its connection closed) before the answer.
        let answer = flight
            .answer
            .get_or_init(|| async {
                // Sealed however this ends: sent, refused, or given up.
                let _sealed = self.flights.unlisted_on_drop(&key, &flight);
                let _admitted = match self.admit().await {
                    Ok(admitted) => admitted,
                    Err(busy) => return Err(BrokerError::Unavailable(busy.to_string())),
                };
                // Nobody joins from here on: the read is on its way to Redis.
                self.flights.unlist(&key, &flight);
                read().await
            })
            .await;
        answer.clone()
    }

    /// Waits for a slot (first come, first served), up to `--broker-timeout`.
    async fn admit(&self) -> Result<Admitted<'_>, Busy> {
        self.admit_by(tokio::time::Instant::now() + self.wait).await
    }

    /// Waits for a slot until `deadline`.
    async fn admit_by(&self, deadline: tokio::time::Instant) -> Result<Admitted<'_>, Busy> {
        let waiting = Waiting::new(&self.metrics.history_reads_waiting);
        let permit = tokio::time::timeout_at(deadline, self.slots.acquire()).await;
        drop(waiting);
        match permit {
            Ok(Ok(permit)) => {
                self.metrics.history_reads_running.inc();
                Ok(Admitted {
                    _permit: permit,
                    metrics: &self.metrics,
                })
            }
            // The semaphore is never closed.
            Ok(Err(_)) | Err(_) => Err(Busy(self.size, self.wait)),
        }
    }
}

/// A wait counted in a gauge (`wsrelay_recoveries_waiting`,
/// `wsrelay_history_reads_waiting`) while it lives, however it ends: a client may
/// leave while it waits (its future is dropped).
struct Waiting<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> Waiting<'a> {
    fn new(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Waiting(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Reads that clients may still join, by key: each entry leaves when its read is
/// sent (or ends), so the map holds one entry per distinct read waiting.
#[derive(Debug)]
struct Flights<K, T>(Mutex<HashMap<K, Arc<Flight<T>>>>);

impl<K, T> Default for Flights<K, T> {
    fn default() -> Self {
        Flights(Mutex::new(HashMap::new()))
    }
}

impl<K: std::hash::Hash + Eq + Clone, T> Flights<K, T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Arc<Flight<T>>>> {
        // Inserts and removes only: a panic elsewhere cannot leave it torn.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The flight of `key`: the one listed (joined, and counted as such), or a
    /// new one listed now.
    fn join(&self, key: &K, metrics: &Metrics) -> Arc<Flight<T>> {
        let mut flights = self.lock();
        if let Some(flight) = flights.get(key) {
            metrics.history_reads_coalesced.inc();
            return flight.clone();
        }
        let flight = Arc::new(Flight {
            answer: OnceCell::new(),
        });
        flights.insert(key.clone(), flight.clone());
        flight
    }

    /// Takes `flight` out of the map (if it is still there).
    fn unlist(&self, key: &K, flight: &Arc<Flight<T>>) {
        let mut flights = self.lock();
        if flights.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            flights.remove(key);
        }
    }

    /// Takes `flight` out of the map when the guard is dropped, whichever way
    /// its read's future ends.
    fn unlisted_on_drop<'a>(&'a self, key: &'a K, flight: &'a Arc<Flight<T>>) -> Unlist<'a, K, T> {
        Unlist {
            flights: self,
            key,
            flight,
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// See [`Flights::unlisted_on_drop`].
struct Unlist<'a, K: std::hash::Hash + Eq + Clone, T> {
    flights: &'a Flights<K, T>,
    key: &'a K,
    flight: &'a Arc<Flight<T>>,
}

impl<K: std::hash::Hash + Eq + Clone, T> Drop for Unlist<'_, K, T> {
    fn drop(&mut self) {
        self.flights.unlist(self.key, self.flight);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::publication::{Epoch, Position};

    fn request(offset: u64) -> HistoryRequest {
        HistoryRequest {
            since: Some((Epoch::parse("e1").unwrap(), offset)),
            limit: 10,
            all_or_nothing: true,
            subscribing: true,
            max_bytes: Some(1000),
        }
    }

    fn answer(top: u64) -> History {
        History {
            top: Position {
                epoch: Epoch::parse("e1").unwrap(),
                offset: top,
            },
            publications: Vec::new(),
            truncated: false,
        }
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !cond() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"));
    }

    #[tokio::test]
    async fn identical_reads_waiting_for_a_slot_share_one() {
        let metrics = Arc::new(Metrics::new());
        let reads = Arc::new(HistoryReads::new(
            1,
            64,
            Duration::from_secs(5),
            metrics.clone(),
        ));
        let runs = Arc::new(AtomicUsize::new(0));
        let read = |reads: &Arc<HistoryReads>, offset: u64| {
            let (reads, runs) = (reads.clone(), runs.clone());
            tokio::spawn(async move {
                reads
                    .read("ch", &request(offset), true, || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok(answer(40 + offset))
                    })
                    .await
            })
        };
        // The only slot is taken: the reads wait, and the same ones join the first.
        let held = reads.admit().await.unwrap();
        let same: Vec<_> = (0..5).map(|_| read(&reads, 7)).collect();
        let other = read(&reads, 8);
        until("four joined", || metrics.history_reads_coalesced.get() == 4).await;
        drop(held);
        for waiting in same {
            assert_eq!(waiting.await.unwrap().unwrap().top.offset, 47);
        }
        assert_eq!(other.await.unwrap().unwrap().top.offset, 48);
        assert_eq!(runs.load(Ordering::SeqCst), 2, "one read each");
        // A read sent is not joined: the next one reads again.
        read(&reads, 7).await.unwrap().unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert!(reads.flights.is_empty(), "nothing kept");
    }

    #[tokio::test]
    async fn recoveries_wait_for_a_fill_in_progress_even_once_it_was_sent() {
        let metrics = Arc::new(Metrics::new());
        let reads = Arc::new(HistoryReads::new(
            4,
            64,
            Duration::from_secs(5),
            metrics.clone(),
        ));
        let runs = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let fill = |channel: &'static str| {
            let (reads, runs, release) = (reads.clone(), runs.clone(), release.clone());
            tokio::spawn(async move {
                let filled = reads
                    .fill(channel, || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        // On its way to Redis: slots are free, others still wait.
                        let _go = release.acquire().await;
                        Ok(Tail::read("ch", &answer(47)))
                    })
                    .await;
                matches!(filled, Fill::Led(Ok(_)))
            })
        };
        let first = fill("ch");
        until("the read is sent", || runs.load(Ordering::SeqCst) == 1).await;
        let joined: Vec<_> = (0..3).map(|_| fill("ch")).collect();
        let other = fill("other");
        until("three joined", || {
            metrics.history_reads_coalesced.get() == 3
        })
        .await;
        until("the other channel reads", || {
            runs.load(Ordering::SeqCst) == 2
        })
        .await;
        release.add_permits(2);
        assert!(first.await.unwrap(), "the first ran the read");
        for j in joined {
            assert!(!j.await.unwrap(), "the others joined it");
        }
        assert!(other.await.unwrap());
        assert_eq!(runs.load(Ordering::SeqCst), 2, "one read per channel");
        assert!(reads.fills.is_empty(), "nothing kept");
    }

    /// Fills of `channels`, each started in a task of its own and held open until
    /// `release` gets a permit: how many are running, the release, and the tasks
    /// (each answers how its fill ended).
    #[allow(clippy::type_complexity)]
    fn held_fills(
        reads: &Arc<HistoryReads>,
        channels: &[&'static str],
    ) -> (
        Arc<AtomicUsize>,
        Arc<tokio::sync::Semaphore>,
        Vec<tokio::task::JoinHandle<Fill>>,
    ) {
        let running = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let fills = channels
            .iter()
            .map(|&channel| {
                let (reads, running, release) = (reads.clone(), running.clone(), release.clone());
                tokio::spawn(async move {
                    reads
                        .fill(channel, || async move {
                            running.fetch_add(1, Ordering::SeqCst);
                            let _go = release.acquire().await;
                            Ok(Tail::read(channel, &answer(47)))
                        })
                        .await
                })
            })
            .collect();
        (running, release, fills)
    }

    #[tokio::test]
    async fn at_most_two_fills_run_at_once() {
        let metrics = Arc::new(Metrics::new());
        let reads = Arc::new(HistoryReads::new(
            64,
            64,
            Duration::from_secs(5),
            metrics.clone(),
        ));
        let (running, release, fills) = held_fills(&reads, &["a", "b", "c"]);
        until("two fills run", || running.load(Ordering::SeqCst) == 2).await;
        // The third had every chance to start (one thread: each yield runs the
        // other tasks): it waits for a fill to end, though slots are free.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(running.load(Ordering::SeqCst), 2);
        assert_eq!(metrics.history_reads_running.get(), 2);
        release.add_permits(1);
        until("the third runs", || running.load(Ordering::SeqCst) == 3).await;
        release.add_permits(2);
        for fill in fills {
            assert!(
                matches!(fill.await.unwrap(), Fill::Led(Ok(_))),
                "each ran its own channel's read"
            );
        }
    }

    #[tokio::test]
    async fn a_fill_that_finds_no_slot_in_time_leaves_its_client_to_read_alone() {
        let metrics = Arc::new(Metrics::new());
        let reads = Arc::new(HistoryReads::new(
            64,
            64,
            Duration::from_millis(100),
            metrics.clone(),
        ));
        let (running, release, busy) = held_fills(&reads, &["a", "b"]);
        until("two fills run", || running.load(Ordering::SeqCst) == 2).await;
        let third = reads
            .fill("c", || async { Ok(Tail::read("c", &answer(47))) })
            .await;
        assert!(
            matches!(third, Fill::Joined),
            "not an error for the client: {third:?}"
        );
        release.add_permits(2);
        for fill in busy {
            assert!(matches!(fill.await.unwrap(), Fill::Led(Ok(_))));
        }
    }

    #[tokio::test]
    async fn a_wait_for_a_slot_given_up_is_no_longer_counted() {
        let metrics = Arc::new(Metrics::new());
        let reads = Arc::new(HistoryReads::new(
            1,
            4,
            Duration::from_secs(5),
            metrics.clone(),
        ));
        let held = reads.admit().await.unwrap();
        let waiting = {
            let reads = reads.clone();
            tokio::spawn(async move { reads.admit().await.is_ok() })
        };
        until("the second waits", || {
            metrics.history_reads_waiting.get() == 1
        })
        .await;
        // Its client left (an HTTP client of /api/history that hung up).
        waiting.abort();
        let _ = waiting.await;
        assert_eq!(metrics.history_reads_waiting.get(), 0);
        drop(held);
    }

    #[tokio::test]
    async fn recoveries_take_turns_in_order() {
        let metrics = Arc::new(Metrics::new());
        let reads = Arc::new(HistoryReads::new(
            4,
            2,
            Duration::from_secs(5),
            metrics.clone(),
        ));
        let first = reads.turn().await;
        let second = reads.turn().await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiting: Vec<_> = (0..3)
            .map(|i| {
                let (reads, order) = (reads.clone(), order.clone());
                tokio::spawn(async move {
                    let _turn = reads.turn().await;
                    order.lock().unwrap().push(i);
                })
            })
            .collect();
        until("three wait", || metrics.recoveries_waiting.get() == 3).await;
        assert_eq!(metrics.recoveries_running.get(), 2);
        drop(first);
        drop(second);
        for w in waiting {
            w.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [0, 1, 2], "in order");
        assert_eq!(metrics.recoveries_running.get(), 0);
        assert_eq!(metrics.recoveries_waiting.get(), 0);

        // A client that leaves while it waits is no longer counted as waiting.
        let held = (reads.turn().await, reads.turn().await);
        let gone = {
            let reads = reads.clone();
            tokio::spawn(async move {
                let _turn = reads.turn().await;
            })
        };
        until("it waits", || metrics.recoveries_waiting.get() == 1).await;
        gone.abort();
        let _ = gone.await;
        assert_eq!(metrics.recoveries_waiting.get(), 0);
        drop(held);
        assert_eq!(metrics.recoveries_running.get(), 0);
    }

    #[tokio::test]
    async fn a_joined_read_whose_first_client_left_is_run_by_the_next() {
        let metrics = Arc::new(Metrics::new());
        let reads = Arc::new(HistoryReads::new(
            1,
            64,
            Duration::from_secs(5),
            metrics.clone(),
        ));
        let runs = Arc::new(AtomicUsize::new(0));
        let held = reads.admit().await.unwrap();
        let spawn = || {
            let (reads, runs) = (reads.clone(), runs.clone());
            tokio::spawn(async move {
                reads
                    .read("ch", &request(7), true, || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok(answer(47))
                    })
                    .await
            })
        };
        let first = spawn();
        until("the first waits", || {
            metrics.history_reads_waiting.get() == 1
        })
        .await;
        let second = spawn();
        until("the second joined", || {
            metrics.history_reads_coalesced.get() == 1
        })
        .await;
        // The first client's connection closed while it waited.
        first.abort();
        let _ = first.await;
        drop(held);
        assert_eq!(second.await.unwrap().unwrap().top.offset, 47);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(reads.flights.is_empty(), "nothing kept");

        // Refused for want of a slot: every client waiting for it hears so.
        let reads = Arc::new(HistoryReads::new(1, 64, Duration::from_millis(50), metrics));
        let _held = reads.admit().await.unwrap();
        let refused = reads
            .read("ch", &request(7), true, || async { Ok(answer(47)) })
            .await;
        assert!(
            matches!(refused, Err(BrokerError::Unavailable(_))),
            "{refused:?}"
        );
        assert!(reads.flights.is_empty(), "nothing kept");
    }
}
