//! The cluster view's API: `GET /api/nodes` (each node with its state and the
//! totals), `GET /api/nodes/history` (the samples the admin page charts) and `GET
//! /api/channels` (cluster-wide, or one channel node by node). Totals leave out the
//! silent nodes ([`cluster::NodeState::Silent`]) and name them in `left_out`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{AppState, api_key_refusal, http_error, query_params, refusal_response};
use crate::cluster::{self, NodeView, Totals};
use crate::envelope;
use crate::hub::{Hub, Refusal};
use crate::protocol::{self, ErrorCode};

/// The live nodes with their state by this node's clock, and the totals.
async fn nodes_view(hub: &Hub) -> Result<(Vec<NodeView>, Totals), Refusal> {
    let nodes = hub.broker.nodes().await.map_err(Refusal::from)?;
    Ok(cluster::view(
        nodes,
        envelope::now_us() / 1000,
        own_interval(hub),
    ))
}

fn own_interval(hub: &Hub) -> std::time::Duration {
    cluster::interval(hub.config.presence.node_ttl)
}

/// `GET /api/nodes`: every live node's announcement with its `state` and
/// `heard_ms_ago`, the `totals` over the nodes heard from, and `silent_after_ms`.
pub(super) async fn api_nodes(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(refused) = api_key_refusal(&state, &headers) {
        return refused;
    }
    match nodes_view(&state.hub).await {
        Ok((nodes, totals)) => Json(json!({
            "nodes": nodes,
            "totals": totals,
            "silent_after_ms": cluster::silent_after(own_interval(&state.hub)).as_millis() as u64,
        }))
        .into_response(),
        Err(refusal) => refusal_response(&refusal),
    }
}

/// `GET /api/nodes/history`: the samples of each live node's announcements over the
/// last 15 minutes (at most [`cluster::history_len`] per node), oldest first.
pub(super) async fn api_nodes_history(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = api_key_refusal(&state, &headers) {
        return refused;
    }
    match state.hub.broker.node_history().await {
        Ok(history) => {
            let nodes: Vec<_> = history
                .into_iter()
                .map(|(id, samples)| json!({"id": id, "samples": samples}))
                .collect();
            Json(json!({
                "window_ms": cluster::HISTORY_WINDOW.as_millis() as u64,
                "nodes": nodes,
            }))
            .into_response()
        }
        Err(e) => refusal_response(&Refusal::from(e)),
    }
}

/// `GET /api/channels`: every channel with subscribers on a live node and their
/// count across the nodes heard from (from the nodes' announcements, a few seconds
/// old at most), and `left_out`, the silent nodes not counted; `?ch=..`: that
/// channel node by node; `?node=local`: this node's channels, exact.
pub(super) async fn api_channels(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Some(refused) = api_key_refusal(&state, &headers) {
        return refused;
    }
    let hub = &state.hub;
    let [node, ch] = match query_params(query.as_deref(), ["node", "ch"]) {
        Ok(params) => params,
        Err(refusal) => return refusal_response(&refusal),
    };
    let local = node.as_deref() == Some("local");
    if let Some(ch) = &ch {
        if local {
            return http_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest.as_str(),
                "ch and node=local do not go together",
            );
        }
        if let Err(e) = protocol::validate_channel(ch) {
            return http_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidChannel.as_str(),
                format!("channel {ch:?}: {e}"),
            );
        }
    }
    if local {
        let channels: Vec<_> = hub
            .registry
            .channel_counts()
            .into_iter()
            .map(|(ch, subscribers)| json!({"ch": ch, "subscribers": subscribers}))
            .collect();
        return Json(json!({"node": hub.node_id, "channels": channels})).into_response();
    }
    let read = async {
        let (nodes, totals) = nodes_view(hub).await?;
        let mut per_node = hub.broker.node_channels().await.map_err(Refusal::from)?;
        // Two reads: a node whose announcement expired between them is gone, and
        // only the nodes of the view are counted or listed.
        per_node.retain(|(id, _)| nodes.iter().any(|n| n.info.id == *id));
        Ok::<_, Refusal>((nodes, totals.left_out, per_node))
    };
    let (nodes, left_out, per_node) = match read.await {
        Ok(read) => read,
        Err(refusal) => return refusal_response(&refusal),
    };
    let Some(ch) = ch else {
        let channels: Vec<_> = cluster::channel_totals(&per_node, &left_out)
            .into_iter()
            .map(|(ch, subscribers)| json!({"ch": ch, "subscribers": subscribers}))
            .collect();
        return Json(json!({"channels": channels, "left_out": left_out})).into_response();
    };
    // One channel: every node with subscribers to it, the silent ones too (with
    // their state), and the total without them.
    let mut total = 0;
    let by_node: Vec<_> = per_node
        .iter()
        .filter_map(|(id, channels)| {
            let (_, count) = channels.iter().find(|(c, _)| *c == ch)?;
            let state = nodes.iter().find(|n| n.info.id == *id)?.state;
            if !left_out.contains(id) {
                total += count;
            }
            Some(json!({"node": id, "subscribers": count, "state": state}))
        })
        .collect();
    Json(json!({"ch": ch, "subscribers": total, "nodes": by_node, "left_out": left_out}))
        .into_response()
}
