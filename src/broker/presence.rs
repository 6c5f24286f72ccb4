//! This node's presence entries: for each presence channel, the entries of the local
//! subscribers (member → entry JSON). The memory broker answers presence from it; the
//! Redis broker registers it in Redis and refreshes it there in bulk, which is also
//! how entries come back after Redis lost them.
//!
//! Bounded by the node's subscriptions to presence channels: an entry is removed
//! with its subscription. The same table keeps this node's connections by user
//! (keyed by user rather than channel), which the users' keys are made of.

use std::collections::HashMap;

use bytes::Bytes;
use dashmap::DashMap;

/// One subscriber in a channel's presence: its member key (`<node>/<conn>`, unique
/// in the cluster) and its entry (`{"conn":..,"node":..,"user":..,"info":..}`).
#[derive(Debug, Clone)]
pub struct Entry {
    /// `<node>/<conn>`.
    pub member: String,
    /// The entry as JSON.
    pub json: Bytes,
    /// The entry's user, for counting distinct users.
    pub user: Option<String>,
}

/// The presence entries of this node's subscribers.
#[derive(Debug, Default)]
pub(super) struct Table {
    /// Why a `DashMap`: sessions on many threads add and remove entries of different
    /// channels; the refresh reads a snapshot.
    channels: DashMap<String, HashMap<String, Entry>>,
}

impl Table {
    pub(super) fn add(&self, channel: &str, entry: Entry) {
        self.channels
            .entry(channel.to_owned())
            .or_default()
            .insert(entry.member.clone(), entry);
    }

    /// Removes an entry; returns whether it was there.
    pub(super) fn remove(&self, channel: &str, member: &str) -> bool {
        let Some(mut entries) = self.channels.get_mut(channel) else {
            return false;
        };
        let removed = entries.remove(member).is_some();
        if entries.is_empty() {
            drop(entries);
            self.channels.remove_if(channel, |_, e| e.is_empty());
        }
        removed
    }

    /// Up to `max` entries of a channel, and how many there are.
    pub(super) fn list(&self, channel: &str, max: usize) -> (Vec<Bytes>, usize) {
        let Some(entries) = self.channels.get(channel) else {
            return (Vec::new(), 0);
        };
        let listed = entries.values().take(max).map(|e| e.json.clone()).collect();
        (listed, entries.len())
    }

    /// Clients and distinct users of a channel.
    pub(super) fn stats(&self, channel: &str) -> (usize, usize) {
        let Some(entries) = self.channels.get(channel) else {
            return (0, 0);
        };
        (
            entries.len(),
            count_users(entries.values().map(|e| e.user.as_deref())),
        )
    }

    /// The entries of one channel.
    pub(super) fn snapshot_of(&self, channel: &str) -> Vec<Entry> {
        self.channels
            .get(channel)
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every entry, per channel, for a bulk refresh.
    pub(super) fn snapshot(&self) -> Vec<(String, Vec<Entry>)> {
        self.channels
            .iter()
            .map(|c| (c.key().clone(), c.values().cloned().collect()))
            .collect()
    }
}

/// Distinct users among entries; anonymous entries (no user) each count as one.
pub(super) fn count_users<'a>(users: impl Iterator<Item = Option<&'a str>>) -> usize {
    let mut named = std::collections::HashSet::new();
    let mut anonymous = 0;
    for user in users {
        match user {
            Some(user) => {
                named.insert(user);
            }
            None => anonymous += 1,
        }
    }
    named.len() + anonymous
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(member: &str, user: Option<&str>) -> Entry {
        Entry {
            member: member.into(),
            json: Bytes::from(format!(r#"{{"conn":"{member}"}}"#)),
            user: user.map(Into::into),
        }
    }

    #[test]
    fn entries_come_and_go_with_their_channel() {
        let t = Table::default();
        t.add("c", entry("n/1", Some("ada")));
        t.add("c", entry("n/2", Some("ada")));
        t.add("c", entry("n/3", None));
        assert_eq!(t.stats("c"), (3, 2));
        assert_eq!(t.list("c", 2).0.len(), 2);
        assert_eq!(t.list("c", 2).1, 3);
        assert!(t.remove("c", "n/1"));
        assert!(!t.remove("c", "n/1"));
        t.remove("c", "n/2");
        t.remove("c", "n/3");
        assert!(t.snapshot().is_empty(), "an empty channel leaves nothing");
    }
}
