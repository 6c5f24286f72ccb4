//! Readiness: whether this node can serve, as `/readyz` answers it, the cluster
//! view announces it (`ready`) and `wsrelay healthcheck` reports it.
//!
//! A node is not ready while it drains, nor while the broker can serve none of its
//! channels. Between the two, a Redis shard down makes only its channels
//! `unavailable`, and every node uses every shard: whether that shard alone makes
//! the node not ready is the operator's choice (`--ready-requires`). With
//! `any-shard` (the default) a load balancer keeps sending clients to nodes that
//! serve the other shards' channels; with `all-shards` it stops sending them
//! anywhere, as it would for a node that is broken.

use serde_json::{Value, json};

use crate::broker::ShardState;
use crate::config::ReadyRequires;
use crate::hub::Hub;

/// What readiness is decided from, read once: the drain, the shards, the policy.
#[derive(Debug, Clone)]
pub(crate) struct Readiness {
    draining: bool,
    /// Empty for the memory broker, which needs no shard.
    shards: Vec<ShardState>,
    requires: ReadyRequires,
}

impl Readiness {
    /// The node's readiness now.
    pub(crate) fn of(hub: &Hub) -> Readiness {
        Readiness::new(
            hub.is_draining(),
            hub.broker.shards(),
            hub.config.broker.ready_requires,
        )
    }

    fn new(draining: bool, shards: Vec<ShardState>, requires: ReadyRequires) -> Readiness {
        Readiness {
            draining,
            shards,
            requires,
        }
    }

    /// Whether the node answers `/readyz` with 200.
    pub(crate) fn is_ready(&self) -> bool {
        self.reason().is_none()
    }

    /// Why the node is not ready: `draining`, or `broker unavailable: ` and each
    /// shard that is not usable (`Redis shard <label>: <problem>`, joined by `; `).
    pub(crate) fn reason(&self) -> Option<String> {
        if self.draining {
            return Some("draining".to_owned());
        }
        let up = self.shards.iter().filter(|s| s.is_up()).count();
        let enough = match self.requires {
            // No shard at all is the memory broker, which serves every channel.
            ReadyRequires::AnyShard => self.shards.is_empty() || up > 0,
            ReadyRequires::AllShards => up == self.shards.len(),
        };
        if enough {
            return None;
        }
        let problems: Vec<String> = self
            .shards
            .iter()
            .filter_map(|s| {
                let problem = s.problem.as_ref()?;
                Some(format!("Redis shard {}: {problem}", s.label))
            })
            .collect();
        Some(format!("broker unavailable: {}", problems.join("; ")))
    }

    /// The `/readyz` body: `status`, `node`, `reason` when not ready, and each
    /// shard's state (`up`, or `down` with its reason) when the broker has shards.
    pub(crate) fn body(&self, node: &str) -> Value {
        let mut body = match self.reason() {
            None => json!({"status": "ready", "node": node}),
            Some(reason) => json!({"status": "not ready", "reason": reason, "node": node}),
        };
        if !self.shards.is_empty() {
            let shards: Vec<Value> = self
                .shards
                .iter()
                .map(|s| match &s.problem {
                    None => json!({"shard": s.label, "state": "up"}),
                    Some(problem) => {
                        json!({"shard": s.label, "state": "down", "reason": problem})
                    }
                })
                .collect();
            body["shards"] = Value::Array(shards);
        }
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(label: &str, problem: Option<&str>) -> ShardState {
        ShardState {
            label: label.to_owned(),
            problem: problem.map(str::to_owned),
            probe_rtt: None,
        }
    }

    #[test]
    fn any_shard_is_ready_while_one_shard_is_usable() {
        let one_down = vec![shard("a:1", None), shard("b:2", Some("not connected"))];
        let any = Readiness::new(false, one_down.clone(), ReadyRequires::AnyShard);
        assert!(any.is_ready());
        let body = any.body("n1");
        assert_eq!(body["status"], "ready");
        assert_eq!(body["shards"][0], json!({"shard": "a:1", "state": "up"}));
        assert_eq!(
            body["shards"][1],
            json!({"shard": "b:2", "state": "down", "reason": "not connected"})
        );
        assert!(body.get("reason").is_none(), "{body}");

        let all = Readiness::new(false, one_down, ReadyRequires::AllShards);
        assert_eq!(
            all.reason().as_deref(),
            Some("broker unavailable: Redis shard b:2: not connected")
        );
        assert_eq!(all.body("n1")["status"], "not ready");

        let all_down = vec![shard("a:1", Some("x")), shard("b:2", Some("y"))];
        let none = Readiness::new(false, all_down, ReadyRequires::AnyShard);
        assert_eq!(
            none.reason().as_deref(),
            Some("broker unavailable: Redis shard a:1: x; Redis shard b:2: y")
        );
    }

    #[test]
    fn draining_and_the_memory_broker() {
        let memory = Readiness::new(false, Vec::new(), ReadyRequires::AnyShard);
        assert!(memory.is_ready());
        assert!(memory.body("n1").get("shards").is_none());
        assert!(Readiness::new(false, Vec::new(), ReadyRequires::AllShards).is_ready());
        let draining = Readiness::new(true, vec![shard("a:1", None)], ReadyRequires::AnyShard);
        assert_eq!(draining.reason().as_deref(), Some("draining"));
        assert_eq!(draining.body("n1")["shards"][0]["state"], "up");
    }
}
