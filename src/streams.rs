//! This node's streaming sessions (SSE and HTTP streaming), by session id: where a
//! client's requests are handed to its session. A streaming client sends requests
//! with `POST /stream/request` to *any* node (no sticky sessions): the node that
//! holds the session takes them here directly, another one forwards them through
//! the broker to this node's control channel, and they land here too.
//!
//! A session id is `<secret>.<route>`: the secret (128 random bits) names the
//! session and is what authorises sending requests into it; the route (random per
//! node process) names the node's control channel. Nothing else routes: the node id
//! may be configured twice by mistake, a route never is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tungstenite::Utf8Bytes;

use crate::client::ClientHandle;

/// The streaming sessions of one node.
#[derive(Debug, Clone)]
pub struct Streams {
    /// This node's route: the second half of its session ids, the name of its
    /// control channel.
    route: Arc<str>,
    /// Why a std mutex: entries are added and removed once per session and looked
    /// up once per request, never across an `.await`.
    sessions: Arc<Mutex<HashMap<String, Entry>>>,
}

#[derive(Debug)]
struct Entry {
    /// The session's requests, bounded: a client sends the next one when the
    /// previous ones were taken.
    requests: mpsc::Sender<Utf8Bytes>,
    /// Where an error goes when a forwarded request finds the queue full.
    client: ClientHandle,
}

/// What became of a request handed to a session.
#[derive(Debug)]
pub enum Handed {
    /// Queued for the session.
    Queued,
    /// The session has as many requests waiting as it takes (the client sends
    /// faster than its session handles them).
    Full(ClientHandle),
    /// No such session on this node (it ended, or never was).
    Unknown,
}

impl Default for Streams {
    fn default() -> Self {
        Streams::new()
    }
}

impl Streams {
    /// An empty table with a fresh route.
    pub fn new() -> Streams {
        Streams {
            route: format!("{:016x}", rand::random::<u64>()).into(),
            sessions: Arc::default(),
        }
    }

    /// This node's route (its control channel's name).
    pub fn route(&self) -> &str {
        &self.route
    }

    /// Adds a session: its id, and the receiving end of its requests (at most
    /// `capacity` waiting).
    pub fn open(
        &self,
        client: ClientHandle,
        capacity: usize,
    ) -> (String, mpsc::Receiver<Utf8Bytes>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let secret = format!("{:032x}", rand::random::<u128>());
        let id = format!("{secret}.{}", self.route);
        self.lock().insert(
            secret,
            Entry {
                requests: tx,
                client,
            },
        );
        (id, rx)
    }

    /// Removes a session (its requests are refused from now on).
    pub fn close(&self, id: &str) {
        if let Some((secret, _)) = split(id) {
            self.lock().remove(secret);
        }
    }

    /// Hands a request to the session `secret` names, without waiting.
    pub fn hand(&self, secret: &str, request: Utf8Bytes) -> Handed {
        let sessions = self.lock();
        let Some(entry) = sessions.get(secret) else {
            return Handed::Unknown;
        };
        match entry.requests.try_send(request) {
            Ok(()) => Handed::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => Handed::Full(entry.client.clone()),
            Err(mpsc::error::TrySendError::Closed(_)) => Handed::Unknown,
        }
    }

    /// Takes a request another node forwarded through the broker (`<secret>` LF
    /// `<request>`, see [`forwarded_payload`]): hands it to its session. A request
    /// that finds the session's queue full gets an `error` frame on the session's
    /// stream (its sender's HTTP answer is already given). Returns whether the
    /// session is here.
    pub fn forwarded(&self, payload: bytes::Bytes) -> bool {
        let Some(at) = payload.iter().position(|&b| b == b'\n') else {
            return false;
        };
        let secret = std::str::from_utf8(&payload[..at])
            .unwrap_or_default()
            .to_owned();
        let Ok(request) = Utf8Bytes::try_from(payload.slice(at + 1..)) else {
            return false;
        };
        match self.hand(&secret, request.clone()) {
            Handed::Queued => true,
            Handed::Full(client) => {
                let id = crate::protocol::parse_request(&request)
                    .ok()
                    .and_then(|r| r.id());
                client.send(crate::protocol::encode_error(
                    id,
                    crate::protocol::ErrorCode::LimitExceeded,
                    "too many requests waiting for this session",
                ));
                true
            }
            Handed::Unknown => false,
        }
    }

    /// Sessions open on this node.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // Plain map operations: a panic elsewhere cannot leave it torn.
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a node forwards to the node holding a session: the secret, a line feed,
/// the request.
pub fn forwarded_payload(secret: &str, request: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(secret.len() + 1 + request.len());
    payload.extend_from_slice(secret.as_bytes());
    payload.push(b'\n');
    payload.extend_from_slice(request);
    payload
}

/// `(secret, route)` of a session id, if it has that shape: 32 hex digits, a dot,
/// a route of 1 to 64 characters of `[0-9a-f]`.
pub fn split(id: &str) -> Option<(&str, &str)> {
    let (secret, route) = id.split_once('.')?;
    let hex = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_hexdigit())
    };
    (secret.len() == 32 && hex(secret, 32) && hex(route, 64)).then_some((secret, route))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::QueueBounds;

    #[test]
    fn requests_reach_the_session_their_id_names_and_no_other() {
        let streams = Streams::new();
        let (client, _queue) = ClientHandle::new(1, QueueBounds::frames(8));
        let (id, mut rx) = streams.open(client, 2);
        let (secret, route) = split(&id).expect("well formed");
        assert_eq!(route, streams.route());
        assert!(matches!(streams.hand(secret, "a".into()), Handed::Queued));
        assert!(matches!(streams.hand(secret, "b".into()), Handed::Queued));
        assert!(matches!(streams.hand(secret, "c".into()), Handed::Full(_)));
        assert_eq!(rx.try_recv().unwrap(), "a");
        let other = format!("{:032x}", 7u128);
        assert!(matches!(streams.hand(&other, "x".into()), Handed::Unknown));
        streams.close(&id);
        assert!(matches!(streams.hand(secret, "d".into()), Handed::Unknown));
        assert!(streams.is_empty());
    }

    #[test]
    fn only_well_formed_ids_split() {
        let good = format!("{:032x}.{:016x}", 1u128, 2u64);
        assert!(split(&good).is_some());
        for bad in [
            "",
            ".",
            "abc.def",
            &format!("{:032x}", 1u128),
            &format!("{:032x}.", 1u128),
            &format!("{:032x}.zz", 1u128),
        ] {
            assert!(split(bad).is_none(), "{bad:?}");
        }
    }
}
