//! Admission of clients' history reads (recoveries, `history` requests,
//! `GET /api/history`): at most `--max-history-reads` run at once on a node, the
//! others wait their turn in order, for at most `--broker-timeout`.
//!
//! Each read holds up to `--max-history-bytes` in the node and takes Redis time
//! from every publish of the cluster; without a bound, many clients reading at once
//! (a reconnect storm, a hostile client on many connections) would take both. The
//! node's own reads (position checks, repairs) do not come through here: they keep
//! delivery exact and are bounded elsewhere.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::metrics::Metrics;

/// The node's history-read slots.
#[derive(Debug)]
pub(crate) struct HistoryReads {
    slots: Semaphore,
    /// How many slots there are (for the refusal's message).
    size: usize,
    /// How long a read waits for a slot before it is refused.
    wait: Duration,
    metrics: Arc<Metrics>,
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
    pub(crate) fn new(slots: usize, wait: Duration, metrics: Arc<Metrics>) -> Self {
        HistoryReads {
            slots: Semaphore::new(slots),
            size: slots,
            wait,
            metrics,
        }
    }

    /// Waits for a slot (first come, first served).
    pub(crate) async fn admit(&self) -> Result<Admitted<'_>, Busy> {
        self.metrics.history_reads_waiting.inc();
        let permit = tokio::time::timeout(self.wait, self.slots.acquire()).await;
        self.metrics.history_reads_waiting.dec();
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
