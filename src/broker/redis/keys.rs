//! Key and pub/sub channel names. Every key of a channel carries the hash tag
//! `{<channel>}`, so on a Redis Cluster a channel's history, presence and (sharded)
//! pub/sub channel share one slot, and a script touching them runs where they live.

use super::conn::PubSub;

/// Names of keys and pub/sub channels under `--redis-prefix`.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
    pubsub: PubSub,
}

impl Keys {
    pub(super) fn new(prefix: String, pubsub: PubSub) -> Keys {
        Keys { prefix, pubsub }
    }

    /// The pub/sub channel of `channel`: `<prefix><channel>`, or on a cluster
    /// `<prefix>{<channel>}`, whose hash tag puts it on the slot of the channel's
    /// history and presence keys (a script may only publish to its keys' slot).
    pub(super) fn pubsub(&self, channel: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + channel.len() + 2);
        key.push_str(&self.prefix);
        match self.pubsub {
            PubSub::Classic => key.push_str(channel),
            PubSub::Sharded => {
                key.push('{');
                key.push_str(channel);
                key.push('}');
            }
        }
        key
    }

    /// The channel of a pub/sub channel name made by [`pubsub`](Self::pubsub).
    pub(super) fn channel_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        let rest = key.strip_prefix(self.prefix.as_str())?;
        match self.pubsub {
            PubSub::Classic => Some(rest),
            PubSub::Sharded => rest.strip_prefix('{')?.strip_suffix('}'),
        }
    }

    /// A cluster-wide key (the cluster view's): `<prefix><name>`, or on a cluster
    /// `<prefix>{nodes}:<name>`, so all of them share a slot and one transaction
    /// may touch them.
    pub(super) fn node(&self, name: &str) -> String {
        match self.pubsub {
            PubSub::Classic => format!("{}{name}", self.prefix),
            PubSub::Sharded => format!("{}{{nodes}}:{name}", self.prefix),
        }
    }

    /// `<prefix>{<channel>}:<suffix>`: the hash tag keeps a channel's keys together.
    pub(super) fn history(&self, channel: &str, suffix: &str) -> String {
        format!("{}{{{channel}}}:{suffix}", self.prefix)
    }

    /// A channel's presence keys (same shape as its history keys).
    pub(super) fn presence(&self, channel: &str, suffix: &str) -> String {
        self.history(channel, suffix)
    }

    /// A node's control channel, where other nodes forward the requests of its
    /// streaming sessions: `<prefix>{<route>}:control`. No client channel maps to
    /// it (braces are not allowed in channel names), and on a cluster each node's
    /// lives in the slot of its route.
    pub(super) fn control(&self, route: &str) -> String {
        format!("{}{{{route}}}:control", self.prefix)
    }

    /// The cluster-wide control channel, where the server API's commands on users
    /// reach every node: `<prefix>{users}:control`.
    pub(super) fn users_control(&self) -> String {
        format!("{}{{users}}:control", self.prefix)
    }

    /// A user's keys: `<prefix>{user:<id>}:<suffix>` (its connections, its
    /// revocation time), together in one slot.
    pub(super) fn user(&self, user: &str, suffix: &str) -> String {
        format!("{}{{user:{user}}}:{suffix}", self.prefix)
    }

    /// The revocation of one token: `<prefix>{jti:<jti>}:revoked`.
    pub(super) fn revoked_jti(&self, jti: &str) -> String {
        format!("{}{{jti:{jti}}}:revoked", self.prefix)
    }
}
