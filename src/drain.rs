//! Closing a draining node's connections: all at once, or over a window
//! (`--drain-spread`).
//!
//! Why: every client of a drained node reconnects at once to the other nodes, and
//! each recovers its channels from Redis; spread over the window, the other nodes
//! and Redis see a ramp instead of a storm. Until its turn a connection works as
//! before (the broker keeps running until the drain ends).
//!
//! Every 100 ms, from the drain's start, an equal share of the connections still
//! open is closed with 1001, the last share 100 ms before the end of the window;
//! after it, whatever is still open (a connection whose upgrade was under way when
//! the drain began) is closed every 100 ms until the node stops this.

use std::time::Duration;

use crate::client::CloseReason;
use crate::registry::Registry;

/// How often a share of the connections is closed.
const STEP: Duration = Duration::from_millis(100);

/// Without `--drain-spread`: asks every connection of `registry` to close with
/// 1001, which each does before its next request (a request under way is answered
/// first, see `ClientHandle::drain`); a connection that opens later learns of the
/// drain when it starts reading.
pub(crate) fn close_all(registry: &Registry) {
    for client in registry.open_connections() {
        client.drain();
    }
}

/// Closes the connections of `registry` with 1001 over `spread`, then any that
/// are still open every step after it; never returns (the node drops it once every
/// session ended).
pub(crate) async fn spread_closes(registry: &Registry, spread: Duration) -> ! {
    let steps = (spread.as_millis() / STEP.as_millis()).max(1) as usize;
    let mut tick = tokio::time::interval(STEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for left in (1..=steps).rev() {
        tick.tick().await;
        let open = registry.open_connections();
        let share = open.len().div_ceil(left);
        for client in open.into_iter().take(share) {
            client.close(CloseReason::Shutdown);
        }
    }
    loop {
        tick.tick().await;
        for client in registry.open_connections() {
            client.close(CloseReason::Shutdown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::QueueBounds;

    #[tokio::test(start_paused = true)]
    async fn shares_are_closed_every_step_until_the_window_ends() {
        let registry = Registry::new();
        let mut clients = Vec::new();
        for _ in 0..40 {
            clients.push(registry.register(QueueBounds::frames(8)));
        }
        let start = tokio::time::Instant::now();
        let drain = {
            let registry = registry.clone();
            tokio::spawn(async move { spread_closes(&registry, Duration::from_secs(1)).await })
        };
        let closed = || {
            clients
                .iter()
                .filter(|(h, _)| h.close_reason().is_some())
                .count()
        };
        let mut seen = Vec::new();
        while closed() < 40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            seen.push((start.elapsed(), closed()));
        }
        // 10 steps of 4: about 4 more every 100 ms, the last ones at the end.
        let at = |ms: u64| {
            seen.iter()
                .rev()
                .find(|(t, _)| *t <= Duration::from_millis(ms))
                .map_or(0, |(_, n)| *n)
        };
        assert!((4..=8).contains(&at(150)), "{seen:?}");
        assert!((16..=24).contains(&at(550)), "{seen:?}");
        assert!(at(850) < 40, "the last share waits for the end: {seen:?}");
        assert!(
            seen.last().unwrap().0 >= Duration::from_millis(900),
            "{seen:?}"
        );
        assert!(
            clients
                .iter()
                .all(|(h, _)| h.close_reason() == Some(CloseReason::Shutdown))
        );
        // A connection registered after the window is closed within a step.
        let (late, _queue) = registry.register(QueueBounds::frames(8));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(late.close_reason(), Some(CloseReason::Shutdown));
        drain.abort();
    }
}
