//! This node's connections by user, and the server API's commands on users
//! (`POST /api/disconnect`, `/api/subscribe`, `/api/unsubscribe`, `/api/refresh`,
//! `/api/revoke`) as they reach every node.
//!
//! A command is published once, on the broker's cluster-wide control channel; each
//! node hands it here, and this table passes it to the mailbox of each local
//! connection of the user. The connection's session acts on it between two of its
//! client's requests, so a server-side subscription is ordered with the client's
//! own requests exactly as a `sub` would be. Only connections with a user have a
//! mailbox (and an entry here): the others cannot be named by the API.

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::auth::TokenId;
use crate::client::{ClientHandle, CloseReason, ConnId};

/// Commands one connection may have waiting: the API is an operator's tool, so a
/// full mailbox is a connection stuck in a slow request; a disconnect or revocation
/// then closes it directly, anything else is refused (and logged).
const MAILBOX: usize = 16;

/// The close code of `POST /api/disconnect` without one: the application's range,
/// "do not reconnect" half.
pub const DEFAULT_DISCONNECT_CODE: u16 = 4001;

/// A command of the server API, as it travels between nodes (JSON on the control
/// channel) and reaches a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Close the user's connections (or one of them, `<node>/<conn>`).
    Disconnect {
        /// The user.
        user: String,
        /// One connection only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conn: Option<String>,
        /// The close code (4000 to 4999).
        code: u16,
        /// Said to the client in the `disconnect` frame.
        reason: String,
    },
    /// Subscribe every connection of the user to `ch`, now.
    Subscribe {
        /// The user.
        user: String,
        /// The channel.
        ch: String,
    },
    /// End the subscription of every connection of the user to `ch`.
    Unsubscribe {
        /// The user.
        user: String,
        /// The channel.
        ch: String,
    },
    /// Set the expiry of every connection of the user (Unix seconds).
    Refresh {
        /// The user.
        user: String,
        /// The new expiry.
        expire_at: u64,
    },
    /// Close the user's connections whose token has this `jti`, or was issued
    /// before `issued_before`.
    Revoke {
        /// The user.
        user: String,
        /// One token.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        jti: Option<String>,
        /// Every token issued before this (Unix seconds).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        issued_before: Option<u64>,
    },
}

impl Command {
    /// The user the command is about.
    pub fn user(&self) -> &str {
        match self {
            Command::Disconnect { user, .. }
            | Command::Subscribe { user, .. }
            | Command::Unsubscribe { user, .. }
            | Command::Refresh { user, .. }
            | Command::Revoke { user, .. } => user,
        }
    }
}

/// Whether a revocation (`jti`, `issued_before`) covers a connection's token.
pub fn revokes(token: Option<&TokenId>, jti: Option<&str>, issued_before: Option<u64>) -> bool {
    let Some(token) = token else { return false };
    let by_id = jti.is_some_and(|jti| token.jti.as_deref() == Some(jti));
    // A token without `iat` cannot be shown to be newer: revoked with the others.
    let by_age = issued_before.is_some_and(|before| token.issued_at.is_none_or(|iat| iat < before));
    by_id || by_age
}

/// One local connection of a user.
#[derive(Debug)]
struct Conn {
    id: ConnId,
    client: ClientHandle,
    /// Boxed: the session's task keeps room for one received command.
    mailbox: mpsc::Sender<Box<Command>>,
    token: Option<TokenId>,
}

/// This node's connections with a user.
#[derive(Debug)]
pub struct Users {
    node_id: String,
    /// Why a `DashMap`: connections of different users open and close on many
    /// threads; a command reads one user's entry.
    by_user: DashMap<String, Vec<Conn>>,
}

impl Default for Users {
    /// A table for a node without a name (tests of the broker alone).
    fn default() -> Users {
        Users::new(String::new())
    }
}

impl Users {
    /// An empty table for the node `node_id`.
    pub fn new(node_id: String) -> Users {
        Users {
            node_id,
            by_user: DashMap::new(),
        }
    }

    /// Adds a connection of `user`; returns the mailbox its session reads.
    pub fn register(
        &self,
        user: &str,
        client: &ClientHandle,
        token: Option<TokenId>,
    ) -> mpsc::Receiver<Box<Command>> {
        let (tx, rx) = mpsc::channel(MAILBOX);
        self.by_user.entry(user.to_owned()).or_default().push(Conn {
            id: client.id(),
            client: client.clone(),
            mailbox: tx,
            token,
        });
        rx
    }

    /// Removes a connection.
    pub fn deregister(&self, user: &str, conn: ConnId) {
        if let Some(mut conns) = self.by_user.get_mut(user) {
            conns.retain(|c| c.id != conn);
            if conns.is_empty() {
                drop(conns);
                self.by_user.remove_if(user, |_, c| c.is_empty());
            }
        }
    }

    /// Hands a command to the local connections it names; returns how many took it.
    pub fn apply(&self, command: Command) -> usize {
        let Some(conns) = self.by_user.get(command.user()) else {
            return 0;
        };
        let mut reached = 0;
        for conn in conns.iter() {
            let close = match &command {
                Command::Disconnect {
                    conn: Some(only), ..
                } => {
                    if *only != format!("{}/{}", self.node_id, conn.id) {
                        continue;
                    }
                    true
                }
                Command::Disconnect { conn: None, .. } => true,
                Command::Revoke {
                    jti, issued_before, ..
                } => {
                    if !revokes(conn.token.as_ref(), jti.as_deref(), *issued_before) {
                        continue;
                    }
                    true
                }
                _ => false,
            };
            reached += 1;
            if conn.mailbox.try_send(Box::new(command.clone())).is_err() {
                if close {
                    // The session is stuck in a request: the close reaches it anyway.
                    conn.client.close(match &command {
                        Command::Disconnect { code, .. } => CloseReason::Application(*code),
                        _ => CloseReason::TokenRevoked,
                    });
                } else {
                    reached -= 1;
                    tracing::warn!(
                        conn = conn.id,
                        ?command,
                        "a connection's command mailbox is full; command not applied"
                    );
                }
            }
        }
        reached
    }

    /// Every local connection with a token: its user, connection id and token, for
    /// a check of all of them against the stored revocations.
    pub fn tokens(&self) -> Vec<(String, ConnId, TokenId)> {
        self.by_user
            .iter()
            .flat_map(|entry| {
                let user = entry.key().clone();
                entry
                    .value()
                    .iter()
                    .filter_map(|c| Some((user.clone(), c.id, c.token.clone()?)))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Closes one connection whose token was found revoked (a `disconnect` frame
    /// and 1008, as for a revocation command).
    pub fn revoked(&self, user: &str, conn: ConnId) {
        if let Some(conns) = self.by_user.get(user)
            && let Some(c) = conns.iter().find(|c| c.id == conn)
        {
            let revoke = Command::Revoke {
                user: user.to_owned(),
                jti: None,
                issued_before: None,
            };
            if c.mailbox.try_send(Box::new(revoke)).is_err() {
                c.client.close(CloseReason::TokenRevoked);
            }
        }
    }

    /// Takes a command from the control channel: JSON, from another node's API.
    pub fn apply_json(&self, payload: &[u8]) -> usize {
        match serde_json::from_slice::<Command>(payload) {
            Ok(command) => self.apply(command),
            Err(e) => {
                tracing::warn!(error = %e, "a control message that is not a command");
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::QueueBounds;

    #[test]
    fn commands_reach_the_connections_they_name() {
        let users = Users::new("n1".into());
        let (a, _qa) = ClientHandle::new(1, QueueBounds::frames(4));
        let (b, _qb) = ClientHandle::new(2, QueueBounds::frames(4));
        let token = |jti: &str, iat| TokenId {
            jti: Some(jti.into()),
            issued_at: Some(iat),
        };
        let mut ra = users.register("ada", &a, Some(token("t1", 100)));
        let mut rb = users.register("ada", &b, Some(token("t2", 200)));
        let subscribe = Command::Subscribe {
            user: "ada".into(),
            ch: "news".into(),
        };
        assert_eq!(users.apply(subscribe.clone()), 2);
        assert_eq!(*ra.try_recv().unwrap(), subscribe);
        assert_eq!(*rb.try_recv().unwrap(), subscribe);
        let one = Command::Disconnect {
            user: "ada".into(),
            conn: Some("n1/2".into()),
            code: 4001,
            reason: "bye".into(),
        };
        assert_eq!(users.apply(one), 1);
        assert!(ra.try_recv().is_err() && rb.try_recv().is_ok());
        let old = Command::Revoke {
            user: "ada".into(),
            jti: None,
            issued_before: Some(150),
        };
        assert_eq!(users.apply(old), 1, "only the older token");
        assert!(ra.try_recv().is_ok());
        let json = serde_json::to_vec(&Command::Revoke {
            user: "ada".into(),
            jti: Some("t2".into()),
            issued_before: None,
        })
        .unwrap();
        assert_eq!(users.apply_json(&json), 1);
        assert_eq!(users.apply_json(b"{\"op\":\"nonsense\"}"), 0);
        users.deregister("ada", 1);
        users.deregister("ada", 2);
        assert!(users.by_user.is_empty());
        assert_eq!(
            users.apply(Command::Refresh {
                user: "ada".into(),
                expire_at: 1
            }),
            0
        );
    }

    #[test]
    fn a_full_mailbox_still_closes_on_disconnect() {
        let users = Users::new("n1".into());
        let (a, _qa) = ClientHandle::new(1, QueueBounds::frames(4));
        let _rx = users.register("ada", &a, None);
        let refresh = Command::Refresh {
            user: "ada".into(),
            expire_at: 1,
        };
        for _ in 0..MAILBOX {
            assert_eq!(users.apply(refresh.clone()), 1);
        }
        assert_eq!(users.apply(refresh), 0, "full: refused, not queued");
        let kick = Command::Disconnect {
            user: "ada".into(),
            conn: None,
            code: 4002,
            reason: "x".into(),
        };
        assert_eq!(users.apply(kick), 1);
        assert_eq!(a.close_reason(), Some(CloseReason::Application(4002)));
    }
}
