//! Gives memory freed by connection churn back to the system.
//!
//! A burst of connects (a reconnect storm) or disconnects frees many small
//! allocations: handshake buffers, closed sessions. glibc keeps freed memory in its
//! arenas and returns only the top of the heap on its own, so a node's resident size
//! after a storm stays at the storm's high-water mark. Once the churn has calmed
//! down, one `malloc_trim` returns the free pages. It is not done continuously: a
//! trim walks every arena under its lock.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::registry::Registry;

/// How often churn is looked at; a burst counts as over after one quiet period.
const PERIOD: Duration = Duration::from_millis(500);
/// Connections opened or closed since the last trim that make one worth it
/// (~4 KiB each, so at least a few MiB to give back).
const CHURN_WORTH_A_TRIM: u64 = 1024;

/// Decides when to trim from a running count of opened plus closed connections.
#[derive(Debug, Default)]
struct Trigger {
    /// Churn at the previous look.
    previous: u64,
    /// Churn at the last trim.
    trimmed_at: u64,
}

impl Trigger {
    /// Whether to trim now: enough churn since the last trim, and none since the
    /// previous look (the burst is over; trimming during one would be undone at once).
    fn should_trim(&mut self, churn: u64) -> bool {
        let quiet = churn == self.previous;
        self.previous = churn;
        if quiet && churn.saturating_sub(self.trimmed_at) >= CHURN_WORTH_A_TRIM {
            self.trimmed_at = churn;
            return true;
        }
        false
    }
}

/// Runs until the node shuts down.
pub(crate) async fn trim_after_churn(
    registry: Registry,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut trigger = Trigger::default();
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let opened = metrics.connections_opened.get();
        let open = registry.stats().connections as u64;
        // Every closed connection was opened: opened + closed = 2 * opened - open.
        // (Read a moment apart, the two can disagree by a connection in the middle
        // of opening; the count is only a trigger.)
        let churn = (2 * opened).saturating_sub(open);
        if trigger.should_trim(churn) {
            // Off the runtime's threads: a trim of a large heap takes a moment.
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only inspects and releases the allocator's free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_after_a_burst_has_calmed_down() {
        let mut t = Trigger::default();
        assert!(!t.should_trim(0), "nothing happened");
        assert!(!t.should_trim(600), "burst under way");
        assert!(!t.should_trim(2000), "burst under way");
        assert!(t.should_trim(2000), "quiet after 2,000 connects");
        assert!(!t.should_trim(2000), "already trimmed");
        assert!(!t.should_trim(2500), "churn resumed");
        assert!(!t.should_trim(2500), "quiet, but only 500 since the trim");
        assert!(!t.should_trim(3100));
        assert!(t.should_trim(3100), "1,100 since the trim, then quiet");
    }
}
