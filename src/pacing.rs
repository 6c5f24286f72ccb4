//! Write pacing that follows the node's load: the interval a WebSocket writer keeps
//! between two writes while its messages keep coming (`--write-pacing`), and the
//! longer one it keeps while the node is busy (`--write-pacing-busy`).
//!
//! Every 100 ms the node looks at how much of that time its runtime's worker
//! threads spent working rather than parked: past 80% it paces at the busy
//! interval, below 50% at the normal one again (the gap between the two keeps it
//! from flapping at the edge).
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
/// At or past this share of the workers' time spent working, the node is busy.
const BUSY: f64 = 0.8;
/// At or below this share, it is not busy any more.
const CALM: f64 = 0.5;

/// The node's current pacing interval, read by every writer before it waits.
#[derive(Debug)]
pub(crate) struct Pacing {
    normal: Duration,
    busy: Duration,
    /// The current interval in microseconds.
    current_us: AtomicU64,
}

impl Pacing {
    pub(crate) fn new(normal: Duration, busy: Duration) -> Pacing {
        Pacing {
            normal,
            busy,
            current_us: AtomicU64::new(micros(normal)),
        }
    }

    /// The interval to keep between two writes now.
    pub(crate) fn current(&self) -> Duration {
        Duration::from_micros(self.current_us.load(Ordering::Relaxed))
    }

    /// Takes the share of the last period the workers spent working; returns the
    /// interval when it changed.
    fn judge(&self, working: f64) -> Option<Duration> {
        let now = self.current();
        let next = if working >= BUSY {
            self.busy
        } else if working <= CALM {
            self.normal
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
        let mut last = (tokio::time::Instant::now(), worked());
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = (tokio::time::Instant::now(), worked());
            let elapsed = now.0 - last.0;
            let share = (now.1.saturating_sub(last.1)).as_secs_f64()
                / (elapsed.as_secs_f64() * workers as f64).max(f64::EPSILON);
            last = now;
            if let Some(interval) = self.judge(share) {
                tracing::debug!(share, ?interval, "write pacing follows the load");
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
    fn busy_past_80_percent_calm_again_at_50() {
        let pacing = Pacing::new(Duration::from_millis(5), Duration::from_millis(10));
        assert_eq!(pacing.current(), Duration::from_millis(5));
        assert_eq!(pacing.judge(0.7), None, "between the two: unchanged");
        assert_eq!(pacing.judge(0.85), Some(Duration::from_millis(10)));
        assert_eq!(pacing.current(), Duration::from_millis(10));
        assert_eq!(pacing.judge(0.6), None, "still busy until calm");
        assert_eq!(pacing.judge(0.5), Some(Duration::from_millis(5)));
        assert_eq!(pacing.judge(1.0), Some(Duration::from_millis(10)));
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
