//! Write pacing that follows the node's load: the interval a WebSocket writer keeps
//! between two writes while its messages keep coming (`--write-pacing`), and the
//! longer one it keeps while the node is busy (`--write-pacing-busy`).
//!
//! Every 100 ms the node looks at how much of that time its runtime's worker
//! threads spent working rather than parked: past 80% it paces at the busy
//! interval. It goes back to the normal one once the workers are under 50% *and*
//! the deliveries it queues per second are under 70% of the most it queued while
//! busy (or the workers are under 20%, whatever the deliveries).
//!
//! Why the deliveries too: the busy interval is what lowers the workers' share,
//! so the share alone cannot say whether the load that made the node busy is
//! gone. Where the workers do not have a core to themselves (two nodes and Redis
//! on one core, in BENCHMARKS.md; noisy neighbours), a node paced at 10 ms under
//! a million deliveries a second measured itself under 50%, went back to 5 ms,
//! saturated again within 100 ms, and flapped every few hundred milliseconds,
//! each 5 ms spell leaving a backlog behind: p99 of 100–200 ms instead of ~25 ms.
//! The deliveries per second do not depend on the interval, so they tell that
//! the load really went down. They are smoothed over about a second: counted per
//! 100 ms they swing with every burst the node drains, and a peak taken from a
//! burst would make the ordinary load look eased.
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
/// constant ~5 periods).
const SMOOTHING: f64 = 0.2;
/// At or past this share of the workers' time spent working, the node is busy.
const BUSY: f64 = 0.8;
/// At or below this share, it is not busy any more, if its deliveries also went
/// down (see [`EASED`]).
const CALM: f64 = 0.5;
/// At or below this share, it is not busy any more, whatever its deliveries.
const IDLE: f64 = 0.2;
/// A busy node is calm again once its deliveries per second are at or under this
/// share of the most it made while busy: at the normal interval each delivery
/// costs ~20% more (BENCHMARKS.md), and the load must fit in that.
const EASED: f64 = 0.7;

/// The node's current pacing interval, read by every writer before it waits.
#[derive(Debug)]
pub(crate) struct Pacing {
    normal: Duration,
    busy: Duration,
    /// The current interval in microseconds.
    current_us: AtomicU64,
    /// While busy: the most deliveries per second seen since it became busy.
    peak_rate: std::sync::Mutex<f64>,
}

impl Pacing {
    pub(crate) fn new(normal: Duration, busy: Duration) -> Pacing {
        Pacing {
            normal,
            busy,
            current_us: AtomicU64::new(micros(normal)),
            peak_rate: std::sync::Mutex::new(0.0),
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
        let now = self.current();
        // Only the follower's task calls this: the lock is never contended.
        let mut peak = self.peak_rate.lock().unwrap_or_else(|e| e.into_inner());
        let busy = now == self.busy && self.busy != self.normal;
        let next = if working >= BUSY {
            *peak = if busy { peak.max(rate) } else { rate };
            self.busy
        } else if busy {
            *peak = peak.max(rate);
            let eased = working <= CALM && rate <= *peak * EASED;
            if eased || working <= IDLE {
                self.normal
            } else {
                now
            }
        } else {
            now
        };
        (next != now).then(|| {
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
                tracing::debug!(share, rate, ?interval, "write pacing follows the load");
                metrics.write_pacing.set(interval.as_secs_f64());
            }
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_past_80_percent_calm_again_at_50_once_the_load_went_down() {
        let pacing = Pacing::new(Duration::from_millis(5), Duration::from_millis(10));
        assert_eq!(pacing.current(), Duration::from_millis(5));
        assert_eq!(pacing.judge(0.7, 1e6), None, "between the two: unchanged");
        assert_eq!(pacing.judge(0.85, 1e6), Some(Duration::from_millis(10)));
        assert_eq!(pacing.current(), Duration::from_millis(10));
        assert_eq!(pacing.judge(0.6, 1e6), None, "still busy until calm");
        // The longer interval made the same load cheaper: not calm yet.
        assert_eq!(pacing.judge(0.45, 1e6), None, "the load is the same");
        assert_eq!(pacing.judge(0.45, 0.8e6), None, "the load is 80%");
        assert_eq!(pacing.judge(0.45, 0.7e6), Some(Duration::from_millis(5)));
        assert_eq!(pacing.judge(1.0, 0.9e6), Some(Duration::from_millis(10)));
        // Measured against the most seen while busy.
        assert_eq!(pacing.judge(0.9, 2e6), None);
        assert_eq!(pacing.judge(0.4, 1.5e6), None, "75% of the peak");
        // Nearly idle: calm whatever the deliveries.
        assert_eq!(pacing.judge(0.15, 1.9e6), Some(Duration::from_millis(5)));
        // Busy from work that is no delivery (a connect storm): calm once it ends.
        assert_eq!(pacing.judge(0.95, 100.0), Some(Duration::from_millis(10)));
        assert_eq!(pacing.judge(0.3, 100.0), None);
        assert_eq!(pacing.judge(0.1, 100.0), Some(Duration::from_millis(5)));
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
