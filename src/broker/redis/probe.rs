//! The delivery probes of one shard: node-private pub/sub channels on which the
//! node publishes a nonce every health tick, through its publishing connection, and
//! expects it back through its own subscriber connection within the broker timeout.
//! A connection that is up but no longer delivers is found this way.
//!
//! One channel per standalone or Sentinel shard. A Redis Cluster delivers a shard
//! channel only through the master that owns its slot, so there is one probe per
//! master, each named so that its slot is one that master serves.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::conn::PubSub;

/// Number of hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// The probes of one shard.
pub(super) struct Probes {
    prefix: String,
    pubsub: PubSub,
    /// Makes this node's probe channels its own.
    token: u64,
    /// What every probe channel name of this node starts with: pushes are told
    /// apart from publications without taking the lock.
    stem: String,
    timeout: Duration,
    probes: Mutex<Vec<Probe>>,
}

struct Probe {
    /// The pub/sub channel.
    channel: String,
    /// What it checks, for the reason in `/readyz`: the shard, or a cluster master.
    target: String,
    /// The nonce in flight and when it was sent.
    in_flight: Option<(u64, Instant)>,
    /// The round trip of the last nonce that came back, for the cluster view.
    last_rtt: Option<Duration>,
}

/// What the health tick does about the probes.
pub(super) enum Step {
    /// Publish these nonces on these channels (probes not in flight).
    Send(Vec<(String, u64)>),
    /// A probe is later than the broker timeout: through this target.
    Overdue(String),
}

impl Probes {
    /// One probe channel, checking `target` (on a cluster, until the masters are
    /// known: see [`Probes::set_cluster_masters`]).
    pub(super) fn new(prefix: &str, pubsub: PubSub, target: &str, timeout: Duration) -> Probes {
        let token: u64 = rand::random();
        let stem = match pubsub {
            PubSub::Classic => format!("{prefix}probe:{token:016x}"),
            PubSub::Sharded => format!("{prefix}{{probe:{token:016x}:"),
        };
        let probes = Probes {
            prefix: prefix.to_owned(),
            pubsub,
            token,
            stem,
            timeout,
            probes: Mutex::new(Vec::new()),
        };
        let channel = probes.channel(0);
        *probes.lock() = vec![Probe {
            channel,
            target: target.to_owned(),
            in_flight: None,
            last_rtt: None,
        }];
        probes
    }

    /// The `n`th probe channel name of this node: `<prefix>probe:<token>`, or on a
    /// cluster `<prefix>{probe:<token>:<n>}` (the hash tag decides its slot).
    fn channel(&self, n: u32) -> String {
        match self.pubsub {
            PubSub::Classic => format!("{}probe:{:016x}", self.prefix, self.token),
            PubSub::Sharded => format!("{}{{probe:{:016x}:{n}}}", self.prefix, self.token),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Probe>> {
        self.probes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The channels to subscribe to.
    pub(super) fn channels(&self) -> Vec<String> {
        self.lock().iter().map(|p| p.channel.clone()).collect()
    }

    /// One probe per master of a Redis Cluster, from its slot ranges (`first`,
    /// `last`, master address).
    pub(super) fn set_cluster_masters(&self, ranges: &[(u16, u16, String)]) {
        let mut masters: Vec<&str> = ranges.iter().map(|r| r.2.as_str()).collect();
        masters.sort_unstable();
        masters.dedup();
        let mut probes = Vec::with_capacity(masters.len());
        let mut n = 0;
        for master in masters {
            // A few tries each: a master serves about 1/masters of the slots.
            while n < 1_000_000 {
                let channel = self.channel(n);
                n += 1;
                let slot = slot(&channel);
                if ranges
                    .iter()
                    .any(|(first, last, owner)| owner == master && (*first..=*last).contains(&slot))
                {
                    probes.push(Probe {
                        channel,
                        target: format!("cluster master {master}"),
                        in_flight: None,
                        last_rtt: None,
                    });
                    break;
                }
            }
        }
        if !probes.is_empty() {
            *self.lock() = probes;
        }
    }

    /// This health tick's step: the first overdue probe, or the probes to send (a
    /// probe is only sent again once the last one came back or was abandoned).
    pub(super) fn step(&self) -> Step {
        let mut probes = self.lock();
        if let Some(late) = probes.iter().find(|p| {
            p.in_flight
                .is_some_and(|(_, sent)| sent.elapsed() > self.timeout)
        }) {
            let target = late.target.clone();
            for probe in probes.iter_mut() {
                probe.in_flight = None;
            }
            return Step::Overdue(target);
        }
        let mut send = Vec::new();
        for probe in probes.iter_mut().filter(|p| p.in_flight.is_none()) {
            let nonce = rand::random::<u64>();
            probe.in_flight = Some((nonce, Instant::now()));
            send.push((probe.channel.clone(), nonce));
        }
        Step::Send(send)
    }

    /// Forgets the probe in flight on `channel` (it could not be sent), or all of
    /// them (the connection they were meant for is gone).
    pub(super) fn abandon(&self, channel: Option<&str>) {
        for probe in self.lock().iter_mut() {
            if channel.is_none_or(|c| c == probe.channel) {
                probe.in_flight = None;
            }
        }
    }

    /// A push on pub/sub channel `channel`: `None` when it is not a probe channel;
    /// otherwise whether it carried the nonce in flight.
    pub(super) fn returned(&self, channel: &[u8], payload: &[u8]) -> Option<bool> {
        // On the path of every publication: a prefix comparison, no lock.
        if !channel.starts_with(self.stem.as_bytes()) {
            return None;
        }
        let mut probes = self.lock();
        let probe = probes
            .iter_mut()
            .find(|p| p.channel.as_bytes() == channel)?;
        let expected = probe.in_flight.map(|(nonce, _)| nonce.to_string());
        if expected.as_deref().map(str::as_bytes) != Some(payload) {
            return Some(false);
        }
        probe.last_rtt = probe.in_flight.take().map(|(_, sent)| sent.elapsed());
        Some(true)
    }

    /// The round trip of the last probe that came back: the slowest of them when
    /// there are several (a Redis Cluster's masters), since that is the path a
    /// message may take. `None` before any came back.
    pub(super) fn last_rtt(&self) -> Option<Duration> {
        self.lock().iter().filter_map(|p| p.last_rtt).max()
    }
}

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag (the part
/// between the first `{` and the next `}`, when not empty) or of the whole key.
pub(super) fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|b| *b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|b| *b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    crc16::State::<crc16::XMODEM>::calculate(hashed) % SLOTS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values of CLUSTER KEYSLOT from Redis's own documentation and tests.
        assert_eq!(slot("123456789"), 12739);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("user1000"));
        assert_eq!(slot("foo{}{bar}"), slot("foo{}{bar}"));
        assert_ne!(
            slot("foo{}{bar}"),
            slot("bar"),
            "an empty tag hashes the whole key"
        );
    }

    #[test]
    fn one_probe_per_master_on_its_own_slots() {
        let probes = Probes::new("w:", PubSub::Sharded, "cluster", Duration::from_secs(1));
        let ranges = vec![
            (0, 5460, "a:1".to_owned()),
            (5461, 10922, "b:2".to_owned()),
            (10923, 16383, "c:3".to_owned()),
        ];
        probes.set_cluster_masters(&ranges);
        let channels = probes.channels();
        assert_eq!(channels.len(), 3);
        let owners: Vec<&str> = channels
            .iter()
            .map(|c| {
                let s = slot(c);
                ranges
                    .iter()
                    .find(|r| (r.0..=r.1).contains(&s))
                    .unwrap()
                    .2
                    .as_str()
            })
            .collect();
        assert_eq!(owners, ["a:1", "b:2", "c:3"]);
    }

    #[test]
    fn a_late_probe_is_overdue_and_a_returned_one_is_not() {
        let probes = Probes::new("w:", PubSub::Classic, "h:1", Duration::from_millis(0));
        let Step::Send(sent) = probes.step() else {
            panic!("nothing in flight yet")
        };
        let (channel, nonce) = &sent[0];
        assert_eq!(probes.returned(b"other", b"1"), None);
        assert_eq!(probes.returned(channel.as_bytes(), b"wrong"), Some(false));
        assert_eq!(probes.last_rtt(), None, "no probe came back yet");
        assert_eq!(
            probes.returned(channel.as_bytes(), nonce.to_string().as_bytes()),
            Some(true)
        );
        assert!(probes.last_rtt().is_some(), "its round trip is kept");
        let Step::Send(_) = probes.step() else {
            panic!("the returned probe is not late")
        };
        std::thread::sleep(Duration::from_millis(2));
        assert!(matches!(probes.step(), Step::Overdue(t) if t == "h:1"));
    }
}
