//! Write pacing that follows the node's load: the interval a WebSocket writer keeps
//! between two writes while its messages keep coming (`--write-pacing`), and the
//! longer ones it keeps while the node is busy, up to `--write-pacing-busy`.
//!
//! Every 100 ms the node looks at how much of that time its runtime's worker
//! threads spent working rather than parked. Past 80% it steps its interval up
//! the ladder from the normal interval to the busy one: at most three steps, each
//! the same factor (5, 10, 20 ms by default: twice), one step per look and none in
//! the look right after a step (that one measured both intervals).
//! It steps down again once the workers are under 50% *and* the deliveries it
//! queues per second are under 70% of the most it queued at that step (or the
//! workers are under 20%, whatever the deliveries).
//!
//! Why steps: a node that a 10 ms interval brings under 80% stays there and
//! keeps its latency (at 100k deliveries a second on a shared core: p99 16 ms,
//! against ~25 ms at 20 ms); one that 10 ms leaves saturated (a million
//! deliveries a second on one core: 0.9–1.0 CPU-s per million, late by hundreds
//! of ms) goes on to 20 ms (0.66–0.80, p99 25–30 ms; BENCHMARKS.md).
//!
//! Why the deliveries too: the longer interval is what lowers the workers' share,
//! so the share alone cannot say whether the load that made the node busy is
//! gone. Where the workers do not have a core to themselves (two nodes and Redis
//! on one core, in BENCHMARKS.md; noisy neighbours), a node paced at 10 ms under
//! a million deliveries a second measured itself under 50%, went back to 5 ms,
//! saturated again within 100 ms, and flapped every few hundred milliseconds,
//! each 5 ms spell leaving a backlog behind. The deliveries per second do not
//! depend on the interval, so they tell that the load really went down. They are
//! smoothed over about half a second: counted per 100 ms they swing with every
//! burst the node drains, and a peak taken from a burst would make the ordinary
//! load look eased. The peak is the most since the last step and does not decay:
//! a node whose load settles above 70% of it stays at the longer interval (its
//! workers under 20% excepted) — some latency kept for CPU, never a flap.
//!
//! Why: each write costs the kernel about the same whatever its size, and writes
//! are most of what a delivery costs, so a saturated node delivers more per
//! CPU-second by writing less often (at a million deliveries a second, 10 ms
//! against 5 ms is ~15% less CPU per delivery, BENCHMARKS.md); its messages are
//! late by then anyway, so the longer interval adds little. A node with room to
//! spare keeps the short interval, which costs busy subscribers little latency. An
//! idle connection's next message never waits either way.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often the load is looked at.
const PERIOD: Duration = Duration::from_millis(100);
/// Weight of the last period in the smoothed deliveries per second (time
/// constant ~4.5 periods).
const SMOOTHING: f64 = 0.2;
/// At or past this share of the workers' time spent working, the node is busy:
/// a step up.
const BUSY: f64 = 0.8;
/// At or below this share, a step down, if its deliveries also went down (see
/// [`EASED`]).
const CALM: f64 = 0.5;
/// At or below this share, a step down, whatever its deliveries.
const IDLE: f64 = 0.2;
/// A step down once the deliveries per second are at or under this share of the
/// most made at the current step: at the shorter interval each delivery costs
/// more (~20% from 10 ms to 5 ms, BENCHMARKS.md), and the load must fit in that.
const EASED: f64 = 0.7;
/// Most steps between the normal interval and the busy one.
const MAX_STEPS: usize = 3;

/// The node's current pacing interval, read by every writer before it waits.
#[derive(Debug)]
pub(crate) struct Pacing {
    normal: Duration,
    busy: Duration,
    /// The intervals, from the normal one up to the busy one, each the same
    /// factor longer than the one before.
    ladder: Vec<Duration>,
    /// The current interval in microseconds.
    current_us: AtomicU64,
    /// What the follower alone changes.
    state: std::sync::Mutex<Steps>,
}

/// Where the pacing stands on its ladder.
#[derive(Debug, Default)]
struct Steps {
    /// The current interval's place in the ladder.
    step: usize,
    /// The most deliveries per second seen at this step (above the first).
    peak_rate: f64,
    /// The interval changed at the last look: the next one measured both.
    settling: bool,
}

impl Pacing {
    pub(crate) fn new(normal: Duration, busy: Duration) -> Pacing {
        let ladder = ladder(normal, busy);
        Pacing {
            normal,
            busy,
            ladder,
            current_us: AtomicU64::new(micros(normal)),
            state: Default::default(),
        }
    }

    /// The interval to keep between two writes now.
    pub(crate) fn current(&self) -> Duration {
        Duration::from_micros(self.current_us.load(Ordering::Relaxed))
    }

    /// Takes the share of the last period the workers spent working and the
    /// deliveries per second queued lately (smoothed); returns the interval when
    /// it changed.
    fn judge(&self, working: f64, rate: f64) -> Option<Duration> {
        // Only the follower's task calls this: the lock is never contended.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if std::mem::take(&mut state.settling) {
            return None;
        }
        let top = self.ladder.len().saturating_sub(1);
        let step = if working >= BUSY && state.step < top {
            state.peak_rate = rate;
            state.step + 1
        } else if state.step > 0 {
            state.peak_rate = state.peak_rate.max(rate);
            let eased = working <= CALM && rate <= state.peak_rate * EASED;
            if eased || working <= IDLE {
                // Measured again at the shorter interval.
                state.peak_rate = rate;
                state.step - 1
            } else {
                state.step
            }
        } else {
            state.step
        };
        (step != state.step).then(|| {
            state.step = step;
            state.settling = true;
            let next = self.ladder[step];
            self.current_us.store(micros(next), Ordering::Relaxed);
            next
        })
    }

    /// Follows the load of the runtime it runs on until `shutdown`. Nothing to do
    /// when both intervals are the same.
    pub(crate) async fn follow_load(
        &self,
        runtime: Handle,
        metrics: &Metrics,
        shutdown: CancellationToken,
    ) {
        metrics.write_pacing.set(self.normal.as_secs_f64());
        if self.normal == self.busy {
            return;
        }
        let runtime = runtime.metrics();
        let workers = runtime.num_workers();
        let worked = || -> Duration {
            (0..workers)
                .map(|w| runtime.worker_total_busy_duration(w))
                .sum()
        };
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let delivered = || metrics.messages_delivered.get();
        let mut last = (tokio::time::Instant::now(), worked(), delivered());
        let mut smoothed = 0.0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = (tokio::time::Instant::now(), worked(), delivered());
            let elapsed = (now.0 - last.0).as_secs_f64().max(f64::EPSILON);
            let share = (now.1.saturating_sub(last.1)).as_secs_f64()
                / (elapsed * workers as f64).max(f64::EPSILON);
            let rate = now.2.saturating_sub(last.2) as f64 / elapsed;
            smoothed += SMOOTHING * (rate - smoothed);
            last = now;
            if let Some(interval) = self.judge(share, smoothed) {
                tracing::debug!(
                    share,
                    rate = smoothed,
                    ?interval,
                    "write pacing follows the load"
                );
                metrics.write_pacing.set(interval.as_secs_f64());
            }
        }
    }
}

/// The intervals from `normal` to `busy`: as many steps as doubling needs, at
/// most [`MAX_STEPS`], each the same factor (from 0, a quarter, a half and all of
/// `busy`).
fn ladder(normal: Duration, busy: Duration) -> Vec<Duration> {
    if busy <= normal {
        return vec![normal];
    }
    if normal.is_zero() {
        return vec![Duration::ZERO, busy / 4, busy / 2, busy];
    }
    let ratio = busy.as_secs_f64() / normal.as_secs_f64();
    let steps = (ratio.log2().ceil() as usize).clamp(1, MAX_STEPS);
    let factor = ratio.powf(1.0 / steps as f64);
    // Whole microseconds, as the interval is kept.
    let mut ladder: Vec<Duration> = (0..steps)
        .map(|k| {
            let us = normal.as_micros() as f64 * factor.powi(k as i32);
            Duration::from_micros(us.round() as u64)
        })
        .collect();
    ladder.push(busy);
    ladder
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Option<Duration> {
        Some(Duration::from_millis(n))
    }

    #[test]
    fn the_ladder_doubles_from_the_normal_interval_to_the_busy_one() {
        let ladder = |normal, busy| {
            Pacing::new(Duration::from_millis(normal), Duration::from_millis(busy)).ladder
        };
        let ms = |v: &[u64]| {
            v.iter()
                .map(|&n| Duration::from_millis(n))
                .collect::<Vec<_>>()
        };
        let us = |v: &[u64]| {
            v.iter()
                .map(|&n| Duration::from_micros(n))
                .collect::<Vec<_>>()
        };
        assert_eq!(ladder(5, 20), ms(&[5, 10, 20]));
        assert_eq!(ladder(5, 10), ms(&[5, 10]));
        assert_eq!(ladder(5, 12), us(&[5000, 7746, 12000]), "one factor");
        assert_eq!(ladder(5, 5), ms(&[5]), "no adaptation");
        assert_eq!(
            ladder(1, 1000),
            ms(&[1, 10, 100, 1000]),
            "at most three steps"
        );
        assert_eq!(ladder(0, 20), ms(&[0, 5, 10, 20]), "from no pacing");
    }

    #[test]
    fn steps_up_past_80_percent_and_down_at_50_once_the_load_went_down() {
        let pacing = Pacing::new(Duration::from_millis(5), Duration::from_millis(20));
        assert_eq!(pacing.current(), Duration::from_millis(5));
        assert_eq!(pacing.judge(0.7, 1e6), None, "between the two: unchanged");
        assert_eq!(pacing.judge(0.85, 1e6), ms(10));
        assert_eq!(pacing.judge(0.95, 1e6), None, "the next look measured both");
        // 10 ms is enough: it stays there.
        assert_eq!(pacing.judge(0.6, 1e6), None);
        // Still saturated at 10 ms: 20 ms.
        assert_eq!(pacing.judge(0.9, 1e6), ms(20));
        assert_eq!(pacing.judge(0.45, 1e6), None, "settling");
        // The longer interval made the same load cheaper: not calm yet.
        assert_eq!(pacing.judge(0.45, 1e6), None, "the load is the same");
        assert_eq!(pacing.judge(0.45, 0.8e6), None, "the load is 80%");
        assert_eq!(pacing.judge(0.45, 0.7e6), ms(10));
        assert_eq!(pacing.judge(0.3, 0.7e6), None, "settling");
        // At 10 ms, against what it delivers there.
        assert_eq!(pacing.judge(0.45, 0.6e6), None, "86% of the load at 10 ms");
        assert_eq!(pacing.judge(0.45, 0.45e6), ms(5));
        assert_eq!(pacing.judge(0.3, 0.4e6), None, "settling");
        assert_eq!(pacing.judge(0.3, 0.1e6), None, "the shortest already");
        // Nearly idle: a step down whatever the deliveries.
        assert_eq!(pacing.judge(1.0, 2e6), ms(10));
        assert_eq!(pacing.judge(1.0, 2e6), None);
        assert_eq!(pacing.judge(0.15, 2e6), ms(5));
        // Busy from work that is no delivery (a connect storm): down once it ends.
        assert_eq!(pacing.judge(0.3, 100.0), None, "settling");
        assert_eq!(pacing.judge(0.95, 100.0), ms(10));
        assert_eq!(pacing.judge(0.3, 100.0), None, "settling");
        assert_eq!(pacing.judge(0.3, 100.0), None);
        assert_eq!(pacing.judge(0.1, 100.0), ms(5));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_runtime_paces_longer_and_a_calm_one_shorter() {
        let pacing = std::sync::Arc::new(Pacing::new(
            Duration::from_millis(5),
            Duration::from_millis(10),
        ));
        let metrics = std::sync::Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let follower = {
            let (pacing, metrics, shutdown) = (pacing.clone(), metrics.clone(), shutdown.clone());
            tokio::spawn(async move {
                pacing
                    .follow_load(Handle::current(), &metrics, shutdown)
                    .await
            })
        };
        // Both workers kept working (a spinning task each) until the node paces
        // at the busy interval.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinners: Vec<_> = (0..2)
            .map(|_| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        // A millisecond of work per poll, as a loaded node's tasks
                        // do (a poll of nothing would count the scheduler's
                        // overhead rather than work).
                        let until = std::time::Instant::now() + Duration::from_millis(1);
                        while std::time::Instant::now() < until {
                            std::hint::spin_loop();
                        }
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while pacing.current() != Duration::from_millis(10) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        for spinner in spinners {
            spinner.await.unwrap();
        }
        waited.expect("busy workers lengthen the interval");
        assert_eq!(metrics.write_pacing.get(), 0.010);
        tokio::time::timeout(Duration::from_secs(10), async {
            while pacing.current() != Duration::from_millis(5) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("calm workers shorten it again");
        shutdown.cancel();
        follower.await.unwrap();
    }
}
