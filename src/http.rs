//! HTTP surface of a node: the WebSocket endpoint, probes, metrics, the server API
//! and the built-in chat page.
//!
//! Everything a client can get wrong before the upgrade (a draining or full node, a
//! foreign origin, a missing or bad token, a bad or forbidden channel) is answered
//! here with an HTTP status and a JSON body, so a WebSocket is only opened when it
//! can be served.

mod cluster_api;

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tungstenite::Utf8Bytes;

use tokio_util::task::TaskTracker;

use crate::auth::{self, AuthError, Grants, OriginPolicy, Verifier};
use crate::broker::BrokerError;
use crate::hub::{Hub, Refusal};
use crate::protocol::{self, ErrorCode, Field, Since};
use crate::proxy;
use crate::readiness::Readiness;
use crate::session::{Identity, Transport};
use crate::streams::{self, Handed, Streams};
use crate::transport::{self, ConnSlot, stream::Format};
use crate::users::{self, Command};

/// What the HTTP handlers share: the hub, and what only the HTTP surface needs.
#[derive(Debug)]
pub(crate) struct AppState {
    pub(crate) hub: Arc<Hub>,
    /// Upgraded WebSocket sessions, which axum's graceful shutdown does not see.
    pub(crate) sessions: TaskTracker,
    /// Verifies client tokens; `None` when authentication is off.
    pub(crate) verifier: Option<Verifier>,
    pub(crate) origins: OriginPolicy,
    /// The grants of every connection when authentication is off, shared.
    pub(crate) anyone: Arc<Grants>,
    /// This node's streaming sessions (SSE, HTTP streaming), by id.
    pub(crate) streams: Streams,
}

const INDEX_HTML: &str = include_str!("../static/index.html");
const ADMIN_HTML: &str = include_str!("../static/admin.html");
/// The official JavaScript client, served as is (it needs no build): the chat page
/// imports it, and so may any page served by the same origin.
const CLIENT_JS: &str = include_str!("../clients/js/src/index.js");

pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/admin", get(admin))
        .route("/client.js", get(client_js))
        .route("/ws", get(websocket))
        .route("/sse", get(sse))
        .route("/stream", post(http_stream))
        // The body is read by the handler, bounded like a WebSocket message.
        .route("/stream/request", post(stream_request))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        // The body is read by the handler, after the API key, bounded in bytes and
        // time (`read_body`).
        .route("/api/publish", post(api_publish))
        .route("/api/channels", get(cluster_api::api_channels))
        .route("/api/nodes", get(cluster_api::api_nodes))
        .route("/api/nodes/history", get(cluster_api::api_nodes_history))
        .route("/api/history", get(api_history))
        .route("/api/presence", get(api_presence))
        .route("/api/presence_stats", get(api_presence_stats))
        .route("/api/disconnect", post(api_disconnect))
        .route("/api/subscribe", post(api_subscribe))
        .route("/api/unsubscribe", post(api_unsubscribe))
        .route("/api/refresh", post(api_refresh))
        .route("/api/revoke", post(api_revoke))
        .route("/api/connections", get(api_connections))
        .with_state(state)
}

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

async fn client_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        CLIENT_JS,
    )
        .into_response()
}

/// The operator's page; it asks for the API key and calls the server API with it.
async fn admin() -> Html<&'static str> {
    Html(ADMIN_HTML)
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// `/readyz`: 200 while the node can serve (see [`Readiness`]), else 503; the body
/// gives each Redis shard's state either way.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let readiness = Readiness::of(&state.hub);
    let status = if readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness.body(&state.hub.node_id))).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let body = state.hub.metrics.render(state.hub.registry.stats());
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

/// Why a request body was not read (see [`read_body`]).
#[derive(Debug)]
enum BodyRefusal {
    /// Over the limit (bytes), declared or as it arrived.
    TooLarge(usize),
    /// Not all there within the time allowed.
    Timeout(std::time::Duration),
    /// The connection failed while it was being read.
    Broken(String),
}

impl IntoResponse for BodyRefusal {
    fn into_response(self) -> Response {
        match self {
            BodyRefusal::TooLarge(limit) => http_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the body is over {limit} bytes (--max-api-body-bytes)"),
            ),
            BodyRefusal::Timeout(timeout) => http_error(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!("the body did not arrive within {timeout:?} (--handshake-timeout)"),
            ),
            BodyRefusal::Broken(e) => http_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("reading the body: {e}"),
            ),
        }
    }
}

/// Reads a request's body, bounded in bytes and in time: too large as soon as its
/// declared length, or what arrived, is over `limit`; refused unless the whole body
/// arrived within `timeout` (`--handshake-timeout`, as for the request head), so a
/// client that trickles a body cannot hold a connection.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, BodyRefusal> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(BodyRefusal::TooLarge(limit));
    }
    let read = async {
        let mut stream = body.into_data_stream();
        let mut buf = bytes::BytesMut::with_capacity(declared.unwrap_or(0) as usize);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| BodyRefusal::Broken(e.to_string()))?;
            if buf.len() + chunk.len() > limit {
                return Err(BodyRefusal::TooLarge(limit));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(BodyRefusal::Timeout(timeout)))
}

fn http_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": code, "message": message.into()})),
    )
        .into_response()
}

/// A JSON object response from the fields `protocol` wrote (shared with a frame,
/// which adds `op` and `id`).
fn json_fields(fields: String) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{{{fields}}}"),
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

/// A connection about to open: its channels, with the positions to recover from,
/// and who it is.
struct Admitted {
    channels: Vec<(String, Option<Since>)>,
    identity: Identity,
}

/// Everything checked before a connection opens, whatever its transport: the node
/// is not draining nor full, the origin is allowed, the token is valid, and the
/// channels (and their recoveries) are allowed. The channels, with the positions
/// to recover from, and the connection's grants; or the HTTP answer.
fn admit(
    state: &AppState,
    headers: &HeaderMap,
    query: Option<&str>,
    default_channel: Option<&str>,
    transport: Transport,
) -> Result<Admitted, Box<Response>> {
    let hub = &state.hub;
    if hub.is_draining() {
        return Err(Box::new(http_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "node is shutting down; connect to another node",
        )));
    }
    let max = hub.config.limits.max_connections;
    if hub.registry.stats().connections >= max {
        return Err(Box::new(http_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            format!("this node is at its limit of {max} connections; try another"),
        )));
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if !state.origins.allows(origin, host) {
        return Err(Box::new(http_error(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            format!(
                "origin {:?} is not allowed to connect",
                origin.unwrap_or_default()
            ),
        )));
    }
    let params = ConnectParams::parse(query, default_channel)
        .map_err(|(code, message)| Box::new(http_error(StatusCode::BAD_REQUEST, code, message)))?;
    // A token is verified here; without one, the connect proxy (when configured)
    // is asked once the connection is open, so that its refusal reaches the
    // client as a frame and a close code, which a browser can read.
    let token = bearer(headers).or(params.token.as_deref());
    let connect_proxy = hub.proxy.url(proxy::Kind::Connect).is_some();
    let grants = match (&state.verifier, token) {
        (None, _) if connect_proxy => None,
        (None, _) => Some(state.anyone.clone()),
        (Some(_), None) if connect_proxy => None,
        (Some(verifier), token) => match token
            .ok_or(AuthError::Missing)
            .and_then(|t| verifier.verify(t))
        {
            Ok(grants) => Some(Arc::new(grants)),
            Err(e) => {
                return Err(Box::new(http_error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    e.to_string(),
                )));
            }
        },
    };
    let mut channels = params.channels;
    // A reconnecting `EventSource` names where it was in `Last-Event-ID`: that
    // position wins over one in the URL, which is the page's first.
    if let Some(id) = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
    {
        let reached = transport::stream::parse_event_id(id).map_err(|e| {
            Box::new(http_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("Last-Event-ID: {e}"),
            ))
        })?;
        for (channel, since) in reached {
            if let Some((_, s)) = channels.iter_mut().find(|(c, _)| *c == channel) {
                *s = Some(since);
            }
        }
    }
    if let Some(grants) = &grants {
        let names = channels.iter().map(|(c, _)| c.as_str());
        hub.check_subscribe(grants, None, names, false)
            .and_then(|()| {
                channels
                    .iter()
                    .filter(|(_, since)| since.is_some())
                    .try_for_each(|(c, _)| hub.check_since(c))
            })
            .map_err(|refusal| Box::new(refusal_response(&refusal)))?;
    }
    let identity = Identity {
        grants,
        forwarded: hub.proxy.forwarded(headers),
        transport,
    };
    Ok(Admitted { channels, identity })
}

async fn websocket(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    mut upgrade: transport::websocket::Upgrade,
) -> Response {
    // A client asking for the protocol's subprotocol gets it echoed, and no
    // implicit default channel.
    let default_channel = match upgrade.select_protocol(protocol::SUBPROTOCOL) {
        true => None,
        false => Some(state.hub.config.default_channel.as_str()),
    };
    let Admitted { channels, identity } = match admit(
        &state,
        &headers,
        query.as_deref(),
        default_channel,
        Transport::WebSocket,
    ) {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    upgrade.serve(
        state.hub.clone(),
        channels,
        identity,
        state.sessions.clone(),
    )
}

/// `GET /sse`: a session as Server-Sent Events (see `transport::stream`), with
/// the query of `/ws` (no implicit default channel).
async fn sse(
    State(state): State<Arc<AppState>>,
    slot: Option<Extension<ConnSlot>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    open_stream(
        &state,
        slot,
        &headers,
        query.as_deref(),
        Format::EventStream,
    )
}

/// `POST /stream`: a session as newline-delimited JSON (see `transport::stream`).
async fn http_stream(
    State(state): State<Arc<AppState>>,
    slot: Option<Extension<ConnSlot>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    open_stream(&state, slot, &headers, query.as_deref(), Format::NdJson)
}

fn open_stream(
    state: &AppState,
    slot: Option<Extension<ConnSlot>>,
    headers: &HeaderMap,
    query: Option<&str>,
    format: Format,
) -> Response {
    let transport = match format {
        Format::EventStream => Transport::Sse,
        Format::NdJson => Transport::Stream,
    };
    let Admitted { channels, identity } = match admit(state, headers, query, None, transport) {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    let response = transport::stream::open(
        state.hub.clone(),
        &state.streams,
        &state.sessions,
        slot.map(|Extension(slot)| slot),
        channels,
        identity,
        format,
    );
    // The origin passed `admit`.
    with_cors(headers, response)
}

/// Lets the page that made a request read the answer when it comes from another
/// origin (an allowed one: `admit` and `stream_request` check the origin first), as
/// `EventSource` and `fetch` require; a WebSocket needs no such header.
fn with_cors(headers: &HeaderMap, mut response: Response) -> Response {
    if let Some(origin) = headers.get(header::ORIGIN) {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.append(header::VARY, header::HeaderValue::from_static("origin"));
    }
    response
}

/// `POST /stream/request?session=<id>`: one request (the body, JSON as over a
/// WebSocket) for a streaming session, on any node: handed to the session here,
/// or forwarded to the node that holds it. The reply comes on the stream; this
/// answers 202 once the session has the request, 404 when no node holds it, 429
/// when it has too many waiting.
async fn stream_request(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Response {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if !state.origins.allows(origin, host) {
        return http_error(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            format!(
                "origin {:?} may not send requests",
                origin.unwrap_or_default()
            ),
        );
    }
    let response = stream_request_answer(&state, &headers, query, body).await;
    with_cors(&headers, response)
}

async fn stream_request_answer(
    state: &AppState,
    headers: &HeaderMap,
    query: Option<String>,
    body: Body,
) -> Response {
    let session = form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "session")
        .map(|(_, v)| v.into_owned());
    let Some((secret, route)) = session.as_deref().and_then(streams::split) else {
        return http_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected ?session=<id> as the welcome frame gave it",
        );
    };
    let limits = &state.hub.config.limits;
    let body = match read_body(
        headers,
        body,
        limits.max_message_bytes,
        limits.handshake_timeout,
    )
    .await
    {
        Ok(body) => body,
        Err(refusal) => return refusal.into_response(),
    };
    let accepted = || (StatusCode::ACCEPTED, Json(json!({"accepted": true}))).into_response();
    let unknown = || {
        http_error(
            StatusCode::NOT_FOUND,
            "unknown_session",
            "no node holds this session (it ended): open a new stream",
        )
    };
    if route == state.streams.route() {
        let Ok(request) = Utf8Bytes::try_from(body) else {
            return http_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the body is not UTF-8",
            );
        };
        let handed = state.streams.hand(secret, request);
        let metrics = &state.hub.metrics;
        return match handed {
            Handed::Queued => {
                metrics.stream_request("local");
                accepted()
            }
            Handed::Full(_) => {
                metrics.stream_request("full");
                http_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_requests",
                    "too many requests waiting for this session; send the next after a reply",
                )
            }
            Handed::Unknown => {
                metrics.stream_request("unknown");
                unknown()
            }
        };
    }
    if std::str::from_utf8(&body).is_err() {
        return http_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the body is not UTF-8",
        );
    }
    match state
        .hub
        .broker
        .forward(route, streams::forwarded_payload(secret, &body))
        .await
    {
        Ok(true) => {
            state.hub.metrics.stream_request("forwarded");
            accepted()
        }
        Ok(false) => {
            state.hub.metrics.stream_request("unknown");
            unknown()
        }
        Err(e) => http_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("could not reach the session's node: {e}"),
        ),
    }
}

/// The HTTP answer to a refused request.
fn refusal_response(refusal: &Refusal) -> Response {
    let status = match refusal.code {
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::LimitExceeded if refusal.node_full => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::NotDurable => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_REQUEST,
    };
    http_error(status, refusal.code.as_str(), refusal.message.clone())
}

/// What the query string of `/ws` carries.
#[derive(Debug)]
struct ConnectParams {
    /// `channel` parameters (repeatable), deduplicated in order, each with the
    /// position its `since` parameter names; the default channel when there are none
    /// (unless the client speaks the subprotocol).
    channels: Vec<(String, Option<Since>)>,
    /// `token`, for browsers, which cannot set headers on a WebSocket.
    token: Option<String>,
}

impl ConnectParams {
    /// Parses the query; a refusal is `(error code, message)`.
    fn parse(
        query: Option<&str>,
        default_channel: Option<&str>,
    ) -> Result<ConnectParams, (&'static str, String)> {
        let mut channels: Vec<(String, Option<Since>)> = Vec::new();
        let mut since = Vec::new();
        let mut token = None;
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match key.as_ref() {
                "channel" => {
                    protocol::validate_channel(&value)
                        .map_err(|e| ("invalid_channel", format!("channel {value:?}: {e}")))?;
                    if !channels.iter().any(|(c, _)| *c == value) {
                        channels.push((value.into_owned(), None));
                    }
                }
                // `<channel>:<epoch>:<offset>`: channel names may contain `:`, so the
                // position is the last two fields.
                "since" => {
                    let bad = |m: &str| {
                        (
                            "bad_request",
                            format!("since {value:?}: {m} (expected <channel>:<epoch>:<offset>)"),
                        )
                    };
                    let mut fields = value.rsplitn(3, ':');
                    let (Some(offset), Some(epoch), Some(channel)) =
                        (fields.next(), fields.next(), fields.next())
                    else {
                        return Err(bad("too few fields"));
                    };
                    let position = Since::parse_pair(epoch, offset).map_err(bad)?;
                    since.push((channel.to_owned(), position));
                }
                "token" => token = Some(value.into_owned()),
                _ => {}
            }
        }
        if channels.is_empty()
            && let Some(default_channel) = default_channel
        {
            channels.push((default_channel.to_owned(), None));
        }
        for (channel, position) in since {
            let Some(entry) = channels.iter_mut().find(|(c, _)| *c == channel) else {
                return Err((
                    "bad_request",
                    format!("since names {channel:?}, which is not among the channel parameters"),
                ));
            };
            if entry.1.is_some() {
                return Err(("bad_request", format!("since given twice for {channel:?}")));
            }
            entry.1 = Some(position);
        }
        Ok(ConnectParams { channels, token })
    }
}

/// The refusal of an `/api/*` request without a configured API key, if it has none.
fn api_key_refusal(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let keys = &state.hub.config.auth.api_keys;
    if keys.is_empty() {
        return Some(http_error(
            StatusCode::FORBIDDEN,
            "api_disabled",
            "the server API is disabled on this node: start it with --api-key",
        ));
    }
    match bearer(headers) {
        Some(key) if auth::api_key_matches(keys, key) => None,
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
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let node = &state.hub;
    // The key first: a client without one never gets to send a body.
    if let Some(refused) = api_key_refusal(&state, &headers) {
        return refused;
    }
    let limits = &node.config.limits;
    let body = match read_body(
        &headers,
        body,
        limits.max_api_body_bytes,
        limits.handshake_timeout,
    )
    .await
    {
        Ok(body) => body,
        Err(refused) => return refused.into_response(),
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
    let mut offsets = Vec::with_capacity(batch.len());
    for (ch, data) in batch {
        match node.publish(ch, data, None, traceparent).await {
            Ok(offset) => offsets.push(offset),
            Err(e) => {
                let mut body = json!({"error": "unavailable", "message": e.to_string()});
                let status = match &e {
                    // Published and stored on the master, not confirmed by the
                    // replicas: the batch stops here as on any error, and this message
                    // counts as published, with its offset.
                    BrokerError::NotDurable { position, .. } => {
                        published += 1;
                        offsets.push(Some(position.offset));
                        body["error"] = json!(ErrorCode::NotDurable.as_str());
                        body["offsets"] = json!(offsets);
                        StatusCode::GATEWAY_TIMEOUT
                    }
                    BrokerError::Timeout(_) | BrokerError::Unavailable(_) => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                };
                body["published"] = json!(published);
                return (status, Json(body)).into_response();
            }
        }
        published += 1;
    }
    // Offsets (null on channels without history) only when any channel has history,
    // so answers about plain channels stay as they were.
    if offsets.iter().any(Option::is_some) {
        Json(json!({"published": published, "offsets": offsets})).into_response()
    } else {
        Json(json!({"published": published})).into_response()
    }
}

/// `GET /api/history?ch=..&limit=..&since_offset=..&epoch=..`: what a channel's
/// history holds, as the `history` frame says it (without `op` and `id`).
async fn api_history(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Some(refused) = api_key_refusal(&state, &headers) {
        return refused;
    }
    let bad = |code: ErrorCode, message: String| {
        http_error(StatusCode::BAD_REQUEST, code.as_str(), message)
    };
    let [ch, limit, since_offset, epoch] =
        match query_params(query.as_deref(), ["ch", "limit", "since_offset", "epoch"]) {
            Ok(params) => params,
            Err(refusal) => return refusal_response(&refusal),
        };
    let Some(ch) = ch else {
        return bad(ErrorCode::BadRequest, "missing query parameter ch".into());
    };
    if let Err(e) = protocol::validate_channel(&ch) {
        return bad(ErrorCode::InvalidChannel, format!("channel {ch:?}: {e}"));
    }
    let limit = match limit.map(|l| l.parse::<u64>()) {
        None => None,
        Some(Ok(limit)) => Some(limit),
        Some(Err(_)) => {
            return bad(
                ErrorCode::BadRequest,
                "limit must be a non-negative integer".into(),
            );
        }
    };
    let since = match (epoch, since_offset) {
        (None, None) => None,
        (Some(epoch), Some(offset)) => match Since::parse_pair(&epoch, &offset) {
            Ok(since) => Some(since),
            Err(e) => return bad(ErrorCode::BadRequest, e.into()),
        },
        _ => {
            return bad(
                ErrorCode::BadRequest,
                "since_offset and epoch go together".into(),
            );
        }
    };
    match state
        .hub
        .history(&state.anyone, &ch, since, limit, false)
        .await
    {
        Ok(history) => json_fields(protocol::history_body(
            &ch,
            &history.top,
            &history.publications,
            history.truncated,
        )),
        Err(refusal) => refusal_response(&refusal),
    }
}

/// The values of the query parameters `names` (others are ignored); a parameter
/// given twice is refused rather than one of its values picked silently.
fn query_params<const N: usize>(
    query: Option<&str>,
    names: [&str; N],
) -> Result<[Option<String>; N], Refusal> {
    let mut values: [Option<String>; N] = std::array::from_fn(|_| None);
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if let Some(i) = names.iter().position(|name| *name == key) {
            if values[i].is_some() {
                return Err(Refusal::new(
                    ErrorCode::BadRequest,
                    format!("query parameter {key} given twice"),
                ));
            }
            values[i] = Some(value.into_owned());
        }
    }
    Ok(values)
}

/// The `ch` query parameter of a channel API, checked; a refusal as a 400 body.
fn channel_param(query: Option<&str>) -> Result<String, Refusal> {
    let [ch] = query_params(query, ["ch"])?;
    let ch = ch.ok_or_else(|| Refusal::new(ErrorCode::BadRequest, "missing query parameter ch"))?;
    protocol::validate_channel(&ch)
        .map_err(|e| Refusal::new(ErrorCode::InvalidChannel, format!("channel {ch:?}: {e}")))?;
    Ok(ch)
}

/// A channel API: checks the API key and the `ch` parameter, then answers with
/// `answer(ch)`, or the refusal it returns.
async fn channel_api<F, Fut>(
    state: &AppState,
    headers: &HeaderMap,
    query: Option<&str>,
    answer: F,
) -> Response
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Result<Response, Refusal>>,
{
    if let Some(refused) = api_key_refusal(state, headers) {
        return refused;
    }
    let result = match channel_param(query) {
        Ok(ch) => answer(ch).await,
        Err(refusal) => Err(refusal),
    };
    result.unwrap_or_else(|refusal| refusal_response(&refusal))
}

/// `GET /api/presence?ch=..`: `{"ch":..,"clients":[..]}`, as the `presence` frame.
async fn api_presence(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let hub = &state.hub;
    let anyone = &state.anyone;
    channel_api(&state, &headers, query.as_deref(), |ch| async move {
        let entries = hub.presence(anyone, &ch, false).await?;
        Ok(json_fields(protocol::presence_body(&ch, &entries)))
    })
    .await
}

/// `GET /api/presence_stats?ch=..`: `{"ch":..,"clients":N,"users":M}`.
async fn api_presence_stats(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let hub = &state.hub;
    let anyone = &state.anyone;
    channel_api(&state, &headers, query.as_deref(), |ch| async move {
        let (clients, users) = hub.presence_stats(anyone, &ch, false).await?;
        Ok(Json(json!({"ch": ch, "clients": clients, "users": users})).into_response())
    })
    .await
}

/// Reads the JSON body of a server API call, after its key: bounded like
/// `/api/publish`; the parse error as a 400 naming what was expected.
async fn api_body<T: serde::de::DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    expected: &str,
) -> Result<T, Response> {
    if let Some(refused) = api_key_refusal(state, headers) {
        return Err(refused);
    }
    let limits = &state.hub.config.limits;
    let body = read_body(
        headers,
        body,
        limits.max_api_body_bytes,
        limits.handshake_timeout,
    )
    .await
    .map_err(IntoResponse::into_response)?;
    serde_json::from_slice(&body).map_err(|e| {
        http_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest.as_str(),
            format!("expected {expected}: {e}"),
        )
    })
}

/// Sends a command to every node; answers how many nodes received it.
async fn send_command(state: &AppState, command: Command) -> Response {
    let user = command.user();
    if user.is_empty() || user.len() > 256 {
        return http_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest.as_str(),
            "user must be 1 to 256 bytes",
        );
    }
    match state.hub.broker.command(&command).await {
        Ok(nodes) => Json(json!({"sent": true, "nodes": nodes})).into_response(),
        Err(e) => refusal_response(&Refusal::from(e)),
    }
}

/// The refusal of a command's channel, if its name is not one.
fn command_channel(ch: &str) -> Option<Response> {
    protocol::validate_channel(ch).err().map(|e| {
        http_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidChannel.as_str(),
            format!("channel {ch:?}: {e}"),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    user: String,
    #[serde(default)]
    conn: Option<String>,
    #[serde(default)]
    code: Option<u16>,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /api/disconnect` `{"user":..[,"conn":"<node>/<conn>"][,"code":4000..4999][,"reason":..]}`:
/// closes the user's connections (or one), on every node.
async fn api_disconnect(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request: DisconnectBody = match api_body(
        &state,
        &headers,
        body,
        r#"{"user":..,"conn"?:..,"code"?:4000..4999,"reason"?:..}"#,
    )
    .await
    {
        Ok(request) => request,
        Err(response) => return response,
    };
    let code = request.code.unwrap_or(users::DEFAULT_DISCONNECT_CODE);
    if !(4000..=4999).contains(&code) {
        return http_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest.as_str(),
            "code must be from 4000 to 4999 (4500 and up: the client may reconnect)",
        );
    }
    let reason = request.reason.unwrap_or_else(|| "disconnected".into());
    if reason.len() > 120 {
        return http_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest.as_str(),
            "reason must be at most 120 bytes (it goes in a close frame)",
        );
    }
    send_command(
        &state,
        Command::Disconnect {
            user: request.user,
            conn: request.conn,
            code,
            reason,
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserChannelBody {
    user: String,
    ch: String,
}

/// `POST /api/subscribe` `{"user":..,"ch":..}`: subscribes every connection of the
/// user, on every node, now.
async fn api_subscribe(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    user_channel_command(&state, &headers, body, |user, ch| Command::Subscribe {
        user,
        ch,
    })
    .await
}

/// `POST /api/unsubscribe` `{"user":..,"ch":..}`.
async fn api_unsubscribe(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    user_channel_command(&state, &headers, body, |user, ch| Command::Unsubscribe {
        user,
        ch,
    })
    .await
}

/// A command about one user and one channel (`{"user":..,"ch":..}`), checked and
/// sent to every node.
async fn user_channel_command(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    command: fn(String, String) -> Command,
) -> Response {
    let request: UserChannelBody =
        match api_body(state, headers, body, r#"{"user":..,"ch":..}"#).await {
            Ok(request) => request,
            Err(response) => return response,
        };
    if let Some(response) = command_channel(&request.ch) {
        return response;
    }
    send_command(state, command(request.user, request.ch)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    user: String,
    expire_at: u64,
}

/// `POST /api/refresh` `{"user":..,"expire_at":<unix seconds>}`.
async fn api_refresh(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request: RefreshBody = match api_body(
        &state,
        &headers,
        body,
        r#"{"user":..,"expire_at":<unix seconds>}"#,
    )
    .await
    {
        Ok(request) => request,
        Err(response) => return response,
    };
    send_command(
        &state,
        Command::Refresh {
            user: request.user,
            expire_at: request.expire_at,
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    user: String,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    expire_at: Option<u64>,
    #[serde(default)]
    issued_before: Option<u64>,
}

/// `POST /api/revoke` `{"user":..,"jti":..[,"expire_at":..]}` or
/// `{"user":..,"issued_before":..}`: stored (so the token is refused at connect and
/// refresh), and the live connections using it are closed on every node.
async fn api_revoke(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let expected = r#"{"user":..,"jti":..,"expire_at"?:..} or {"user":..,"issued_before":..}"#;
    let request: RevokeBody = match api_body(&state, &headers, body, expected).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    let config = &state.hub.config.users;
    if !config.token_revocation {
        return http_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest.as_str(),
            "token revocation is off on this node: start it with --token-revocation",
        );
    }
    if request.jti.is_none() == request.issued_before.is_none()
        || request
            .jti
            .as_ref()
            .is_some_and(|j| j.is_empty() || j.len() > 256)
    {
        return http_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest.as_str(),
            format!("expected {expected}"),
        );
    }
    // A token's revocation is kept until it would have expired anyway.
    let ttl = match request.expire_at {
        Some(at) => std::time::UNIX_EPOCH
            .checked_add(std::time::Duration::from_secs(at))
            .and_then(|t| t.duration_since(std::time::SystemTime::now()).ok())
            .map(|left| left + state.hub.config.auth.jwt_leeway)
            .unwrap_or(std::time::Duration::from_secs(1))
            .min(config.revocation_ttl),
        None => config.revocation_ttl,
    };
    if let Err(e) = state
        .hub
        .broker
        .revoke(
            &request.user,
            request.jti.as_deref(),
            request.issued_before,
            ttl,
        )
        .await
    {
        return refusal_response(&Refusal::from(e));
    }
    send_command(
        &state,
        Command::Revoke {
            user: request.user,
            jti: request.jti,
            issued_before: request.issued_before,
        },
    )
    .await
}

/// `GET /api/connections?user=..`: every connection of the user, cluster-wide, with
/// its node, transport and channels.
async fn api_connections(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Some(refused) = api_key_refusal(&state, &headers) {
        return refused;
    }
    let user = match query_params(query.as_deref(), ["user"]) {
        Ok([Some(user)]) if !user.is_empty() => user,
        Ok(_) => {
            return http_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest.as_str(),
                "missing query parameter user",
            );
        }
        Err(refusal) => return refusal_response(&refusal),
    };
    match state.hub.broker.user_connections(&user).await {
        Ok(entries) => {
            let list: Vec<&serde_json::value::RawValue> = entries
                .iter()
                .filter_map(|e| serde_json::from_slice(e).ok())
                .collect();
            Json(json!({"user": user, "connections": list})).into_response()
        }
        Err(e) => refusal_response(&Refusal::from(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::{ConnectParams, query_params};

    #[test]
    fn a_query_parameter_given_twice_is_refused() {
        let [ch, limit] = query_params(Some("ch=a&x=1&limit=5"), ["ch", "limit"]).unwrap();
        assert_eq!((ch.as_deref(), limit.as_deref()), (Some("a"), Some("5")));
        let e = query_params(Some("ch=a&ch=b"), ["ch"]).unwrap_err();
        assert!(e.message.contains("ch given twice"), "{}", e.message);
    }

    #[test]
    fn connect_params_from_query() {
        let channels = |q| {
            ConnectParams::parse(q, Some("global"))
                .map(|p| p.channels.into_iter().map(|(c, _)| c).collect::<Vec<_>>())
        };
        assert_eq!(channels(None).unwrap(), vec!["global"]);
        assert_eq!(channels(Some("token=x")).unwrap(), vec!["global"]);
        assert_eq!(
            channels(Some("channel=a&channel=b&channel=a")).unwrap(),
            vec!["a", "b"]
        );
        assert_eq!(channels(Some("channel=room%3A1")).unwrap(), vec!["room:1"]);
        assert!(
            channels(Some("channel=a%20b"))
                .unwrap_err()
                .1
                .contains("a b")
        );
        assert!(channels(Some("channel=")).is_err());
        let p =
            ConnectParams::parse(Some("channel=chat:1&since=chat:1:k3x9:40"), Some("g")).unwrap();
        let since = p.channels[0].1.as_ref().unwrap();
        assert_eq!((since.epoch.as_str(), since.offset), ("k3x9", 40));
        for bad in [
            "channel=a&since=a:k3x9:1&since=a:k3x9:2",
            "channel=a&since=a:k3x9",
            "channel=a&since=b:k3x9:1",
            "channel=a&since=a:k3x9:x",
            "channel=a&since=a:k-3:1",
        ] {
            assert_eq!(
                ConnectParams::parse(Some(bad), Some("g")).unwrap_err().0,
                "bad_request",
                "{bad}"
            );
        }
        let params = ConnectParams::parse(Some("token=abc.def&channel=x"), Some("g")).unwrap();
        assert_eq!(params.token.as_deref(), Some("abc.def"));
    }
}
