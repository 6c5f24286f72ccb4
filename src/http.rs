//! HTTP surface of a node: the WebSocket endpoint, probes, metrics, the server API
//! and the built-in chat page.
//!
//! Everything a client can get wrong before the upgrade (a draining or full node, a
//! foreign origin, a missing or bad token, a bad or forbidden channel) is answered
//! here with an HTTP status and a JSON body, so a WebSocket is only opened when it
//! can be served.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{self, AuthError};
use crate::node::NodeState;
use crate::protocol::{self, ErrorCode, Field};
use crate::session;

/// tungstenite reads into a buffer of this size per connection, allocated and
/// zero-filled up front; its 128 KiB default would dominate the memory of an idle
/// connection (most are). Client requests are small; a larger message takes one
/// read per 512 bytes.
const READ_BUFFER_BYTES: usize = 512;

const INDEX_HTML: &str = include_str!("../static/index.html");

pub(crate) fn router(state: Arc<NodeState>) -> Router {
    let api_body_limit = state.config.max_api_body_bytes;
    Router::new()
        .route("/", get(index))
        .route("/ws", get(websocket))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/api/publish",
            post(api_publish).layer(DefaultBodyLimit::max(api_body_limit)),
        )
        .route("/api/channels", get(api_channels))
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
            header::CONTENT_TYPE,
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

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

async fn websocket(
    State(node): State<Arc<NodeState>>,
    headers: HeaderMap,
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
    let max = node.config.max_connections;
    if node.registry.stats().connections >= max {
        return http_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            format!("this node is at its limit of {max} connections; try another"),
        );
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if !node.origins.allows(origin, host) {
        return http_error(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            format!(
                "origin {:?} is not allowed to connect",
                origin.unwrap_or_default()
            ),
        );
    }
    let params = match ConnectParams::parse(query.as_deref(), &node.config.default_channel) {
        Ok(params) => params,
        Err(message) => return http_error(StatusCode::BAD_REQUEST, "invalid_channel", message),
    };
    let grants = match &node.verifier {
        None => node.anyone.clone(),
        Some(verifier) => {
            let token = bearer(&headers).or(params.token.as_deref());
            match token
                .ok_or(AuthError::Missing)
                .and_then(|t| verifier.verify(t))
            {
                Ok(grants) => Arc::new(grants),
                Err(e) => {
                    return http_error(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string());
                }
            }
        }
    };
    if let Some(channel) = params.channels.iter().find(|c| !grants.may_subscribe(c)) {
        return http_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("not allowed to subscribe to {channel}"),
        );
    }
    let limit = node.config.max_subscriptions;
    if params.channels.len() > limit {
        return http_error(
            StatusCode::BAD_REQUEST,
            "limit_exceeded",
            format!("at most {limit} subscriptions per connection"),
        );
    }
    // The same node limit as a `sub` to a channel the node does not serve yet.
    let limit = node.config.max_channels;
    let new_channels = params
        .channels
        .iter()
        .filter(|c| !node.registry.has_subscribers(c))
        .count();
    if new_channels > 0 && node.registry.stats().channels + new_channels > limit {
        return http_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "limit_exceeded",
            format!("this node serves at most {limit} channels; try another"),
        );
    }
    let message_limit = node.config.max_message_bytes;
    let channels = params.channels;
    upgrade
        .max_message_size(message_limit)
        .max_frame_size(message_limit)
        .read_buffer_size(READ_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            let sessions = node.sessions.clone();
            sessions.track_future(session::run(socket, node, channels, grants))
        })
}

/// What the query string of `/ws` carries.
#[derive(Debug)]
struct ConnectParams {
    /// `channel` parameters (repeatable), deduplicated in order; the default channel
    /// when there are none.
    channels: Vec<String>,
    /// `token`, for browsers, which cannot set headers on a WebSocket.
    token: Option<String>,
}

impl ConnectParams {
    fn parse(query: Option<&str>, default_channel: &str) -> Result<ConnectParams, String> {
        let mut channels: Vec<String> = Vec::new();
        let mut token = None;
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match key.as_ref() {
                "channel" => {
                    protocol::validate_channel(&value)
                        .map_err(|e| format!("channel {value:?}: {e}"))?;
                    if !channels.iter().any(|c| *c == value) {
                        channels.push(value.into_owned());
                    }
                }
                "token" => token = Some(value.into_owned()),
                _ => {}
            }
        }
        if channels.is_empty() {
            channels.push(default_channel.to_owned());
        }
        Ok(ConnectParams { channels, token })
    }
}

/// The refusal of an `/api/*` request without a configured API key, if it has none.
fn api_key_refusal(node: &NodeState, headers: &HeaderMap) -> Option<Response> {
    if node.config.api_keys.is_empty() {
        return Some(http_error(
            StatusCode::FORBIDDEN,
            "api_disabled",
            "the server API is disabled on this node: start it with --api-key",
        ));
    }
    match bearer(headers) {
        Some(key) if auth::api_key_matches(&node.config.api_keys, key) => None,
        Some(_) => Some(http_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong API key",
        )),
        None => Some(http_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing API key: send Authorization: Bearer <key>",
        )),
    }
}

#[derive(Deserialize)]
struct ApiMessage<'a> {
    ch: String,
    #[serde(borrow, default)]
    data: Field<'a>,
}

/// Either one message (`ch`, `data`) or a batch (`messages`). Not an untagged enum:
/// serde buffers those, and borrowed raw values cannot come out of a buffer.
#[derive(Deserialize)]
struct ApiPublish<'a> {
    #[serde(borrow, default)]
    messages: Option<Vec<ApiMessage<'a>>>,
    #[serde(default)]
    ch: Option<String>,
    #[serde(borrow, default)]
    data: Field<'a>,
}

/// `POST /api/publish`: `{"ch":..,"data":..}` or `{"messages":[{"ch":..,"data":..},..]}`.
/// Messages of a batch are published in order. Answers `{"published": n}`.
async fn api_publish(
    State(node): State<Arc<NodeState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Some(refused) = api_key_refusal(&node, &headers) {
        return refused;
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let status = rejection.status();
            let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "too_large"
            } else {
                "bad_request"
            };
            return http_error(status, code, rejection.body_text());
        }
    };
    let request: ApiPublish<'_> = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return http_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest.as_str(),
                format!("expected {{\"ch\":..,\"data\":..}} or {{\"messages\":[..]}}: {e}"),
            );
        }
    };
    let messages = match request {
        ApiPublish {
            messages: Some(messages),
            ch: None,
            data: Field(None),
        } => messages,
        ApiPublish {
            messages: None,
            ch: Some(ch),
            data,
        } => vec![ApiMessage { ch, data }],
        _ => {
            return http_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest.as_str(),
                "expected {\"ch\":..,\"data\":..} or {\"messages\":[..]}",
            );
        }
    };
    // Validate the whole batch first: either every message goes out or none.
    let mut batch = Vec::with_capacity(messages.len());
    for (i, message) in messages.iter().enumerate() {
        let Some(data) = message.data.0 else {
            return http_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest.as_str(),
                format!("message {i}: missing field data"),
            );
        };
        batch.push((message.ch.as_str(), data));
        if let Err(e) = protocol::validate_channel(&message.ch) {
            return http_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidChannel.as_str(),
                format!("message {i}: channel {:?}: {e}", message.ch),
            );
        }
    }
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|tp| protocol::is_traceparent(tp));
    let mut published = 0;
    for (ch, data) in batch {
        let result = node.publish(ch, data, None, traceparent).await;
        if let Err(e) = result {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "unavailable", "message": e.to_string(), "published": published})),
            )
                .into_response();
        }
        published += 1;
    }
    Json(json!({"published": published})).into_response()
}

/// `GET /api/channels`: channels with subscribers on this node.
async fn api_channels(State(node): State<Arc<NodeState>>, headers: HeaderMap) -> Response {
    if let Some(refused) = api_key_refusal(&node, &headers) {
        return refused;
    }
    let channels: Vec<_> = node
        .registry
        .channel_counts()
        .into_iter()
        .map(|(ch, subscribers)| json!({"ch": ch, "subscribers": subscribers}))
        .collect();
    Json(json!({"node": node.node_id, "channels": channels})).into_response()
}

#[cfg(test)]
mod tests {
    use super::ConnectParams;

    #[test]
    fn connect_params_from_query() {
        let channels = |q| ConnectParams::parse(q, "global").map(|p| p.channels);
        assert_eq!(channels(None).unwrap(), vec!["global"]);
        assert_eq!(channels(Some("token=x")).unwrap(), vec!["global"]);
        assert_eq!(
            channels(Some("channel=a&channel=b&channel=a")).unwrap(),
            vec!["a", "b"]
        );
        assert_eq!(channels(Some("channel=room%3A1")).unwrap(), vec!["room:1"]);
        assert!(channels(Some("channel=a%20b")).unwrap_err().contains("a b"));
        assert!(channels(Some("channel=")).is_err());
        let params = ConnectParams::parse(Some("token=abc.def&channel=x"), "g").unwrap();
        assert_eq!(params.token.as_deref(), Some("abc.def"));
    }
}
