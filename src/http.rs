//! HTTP surface of a node: the WebSocket endpoint, probes and the built-in chat page.
//!
//! Everything a client can get wrong before the upgrade (a bad channel name, a node
//! that is draining) is answered here with an HTTP status and a JSON body, so a
//! WebSocket is only opened when it can be served.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::node::NodeState;
use crate::{protocol, session};

/// tungstenite reads into a buffer of this size per connection, allocated and
/// zero-filled up front; its 128 KiB default would dominate the memory of an idle
/// connection (most are). Client requests are small; a larger message takes one
/// read per 512 bytes.
const READ_BUFFER_BYTES: usize = 512;

const INDEX_HTML: &str = include_str!("../static/index.html");

pub(crate) fn router(state: Arc<NodeState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/ws", get(websocket))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(node): State<Arc<NodeState>>) -> Response {
    let reason = if node.is_draining() {
        Some("draining")
    } else if !node.broker.is_ready() {
        Some("broker unavailable")
    } else {
        None
    };
    match reason {
        None => Json(json!({"status": "ready", "node": node.node_id})).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "reason": reason, "node": node.node_id})),
        )
            .into_response(),
    }
}

async fn metrics(State(node): State<Arc<NodeState>>) -> Response {
    let body = node.metrics.render(node.registry.stats());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            // The body is OpenMetrics (`# EOF`, `_total` counters): say so, so that
            // Prometheus parses it as such.
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

fn http_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": code, "message": message.into()})),
    )
        .into_response()
}

async fn websocket(
    State(node): State<Arc<NodeState>>,
    RawQuery(query): RawQuery,
    upgrade: WebSocketUpgrade,
) -> Response {
    if node.is_draining() {
        return http_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "node is shutting down; connect to another node",
        );
    }
    let channels = match connect_channels(query.as_deref(), &node.config.default_channel) {
        Ok(channels) => channels,
        Err(message) => return http_error(StatusCode::BAD_REQUEST, "invalid_channel", message),
    };
    let limit = node.config.max_message_bytes;
    upgrade
        .max_message_size(limit)
        .max_frame_size(limit)
        .read_buffer_size(READ_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            let sessions = node.sessions.clone();
            sessions.track_future(session::run(socket, node, channels))
        })
}

/// The `channel` query parameters (repeatable), deduplicated in order; the default
/// channel when there are none.
fn connect_channels(query: Option<&str>, default_channel: &str) -> Result<Vec<String>, String> {
    let mut channels: Vec<String> = Vec::new();
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if key != "channel" {
            continue;
        }
        protocol::validate_channel(&value).map_err(|e| format!("channel {value:?}: {e}"))?;
        if !channels.iter().any(|c| *c == value) {
            channels.push(value.into_owned());
        }
    }
    if channels.is_empty() {
        channels.push(default_channel.to_owned());
    }
    Ok(channels)
}

#[cfg(test)]
mod tests {
    use super::connect_channels;

    #[test]
    fn connect_channels_from_query() {
        assert_eq!(connect_channels(None, "global").unwrap(), vec!["global"]);
        assert_eq!(
            connect_channels(Some("token=x"), "global").unwrap(),
            vec!["global"]
        );
        assert_eq!(
            connect_channels(Some("channel=a&channel=b&channel=a"), "global").unwrap(),
            vec!["a", "b"]
        );
        assert_eq!(
            connect_channels(Some("channel=room%3A1"), "g").unwrap(),
            vec!["room:1"]
        );
        assert!(
            connect_channels(Some("channel=a%20b"), "g")
                .unwrap_err()
                .contains("a b")
        );
        assert!(connect_channels(Some("channel="), "g").is_err());
    }
}
