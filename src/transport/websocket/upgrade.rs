//! The WebSocket handshake (RFC 6455 §4.2) on an HTTP/1.1 request: the checks, the
//! `101` with the subprotocol and the compression agreed, and the upgraded socket
//! handed to tungstenite with the node's limits.
//!
//! Made here rather than by axum's `WebSocketUpgrade`, whose socket hides
//! tokio-tungstenite's stream: permessage-deflate needs the stream's raw frames
//! (RSV1) on the way out and an adapter below it on the way in. The checks and the
//! refusals (status and text) are axum's, so clients see no difference.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use futures_util::future::Either;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_util::task::TaskTracker;
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::{Role, WebSocketConfig};

use super::Gate;
use crate::hub::Hub;
use crate::protocol::Since;
use crate::session::Identity;
use crate::transport::deflate::{self, Compressor, InflatingIo};

/// tungstenite reads into a buffer of this size per connection, allocated and
/// zero-filled up front; its 128 KiB default would dominate the memory of an idle
/// connection (most are). Client requests are small; a larger message takes one
/// read per 512 bytes.
const READ_BUFFER_BYTES: usize = 512;

/// A request to open a WebSocket, checked as far as the handshake goes; what the
/// node checks before accepting it (origin, token, channels) is `http`'s.
#[derive(Debug)]
pub(crate) struct Upgrade {
    /// `Sec-WebSocket-Key`.
    key: HeaderValue,
    on_upgrade: OnUpgrade,
    /// The subprotocols the client asked for, in its order.
    requested: Vec<HeaderValue>,
    /// The one the node speaks, if the client asked for it.
    protocol: Option<&'static str>,
    /// The client offered permessage-deflate in terms the node accepts.
    deflate_offered: bool,
}

/// Why a request is not a WebSocket handshake (axum's refusals, word for word).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Rejection {
    #[error("Request method must be `GET`")]
    MethodNotGet,
    #[error("Connection header did not include 'upgrade'")]
    InvalidConnectionHeader,
    #[error("`Upgrade` header did not include 'websocket'")]
    InvalidUpgradeHeader,
    #[error("`Sec-WebSocket-Key` header missing")]
    WebSocketKeyHeaderMissing,
    #[error("`Sec-WebSocket-Version` header did not include '13'")]
    InvalidWebSocketVersionHeader,
    /// hyper cannot hand the connection over (not HTTP/1.1, or no upgrades).
    #[error("WebSocket request couldn't be upgraded since no upgrade state was present")]
    ConnectionNotUpgradable,
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let status = match self {
            Rejection::MethodNotGet => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::ConnectionNotUpgradable => StatusCode::UPGRADE_REQUIRED,
            _ => StatusCode::BAD_REQUEST,
        };
        (status, self.to_string()).into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Rejection> {
        let headers = &parts.headers;
        if parts.method != Method::GET {
            return Err(Rejection::MethodNotGet);
        }
        if !header_contains(headers, header::CONNECTION, "upgrade") {
            return Err(Rejection::InvalidConnectionHeader);
        }
        if !header_is(headers, header::UPGRADE, "websocket") {
            return Err(Rejection::InvalidUpgradeHeader);
        }
        let key = headers
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or(Rejection::WebSocketKeyHeaderMissing)?
            .clone();
        if !header_is(headers, header::SEC_WEBSOCKET_VERSION, "13") {
            return Err(Rejection::InvalidWebSocketVersionHeader);
        }
        let requested = headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .flat_map(|value| value.as_bytes().split(|&b| b == b','))
            .filter_map(|protocol| HeaderValue::from_bytes(protocol.trim_ascii()).ok())
            .collect();
        let deflate_offered = deflate::negotiate(
            headers
                .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                .iter()
                .filter_map(|value| value.to_str().ok()),
        );
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(Rejection::ConnectionNotUpgradable)?;
        Ok(Upgrade {
            key,
            on_upgrade,
            requested,
            protocol: None,
            deflate_offered,
        })
    }
}

impl Upgrade {
    /// Chooses `protocol` if the client asked for it (the `101` then names it).
    /// Returns whether it did.
    pub(crate) fn select_protocol(&mut self, protocol: &'static str) -> bool {
        if self.requested.iter().any(|p| p == protocol) {
            self.protocol = Some(protocol);
        }
        self.protocol.is_some()
    }

    /// Answers `101 Switching Protocols` and, once hyper hands the connection over,
    /// serves it as a session (tracked by `sessions`, which the drain waits for).
    /// Compression is agreed when the node has it on and the client offered it.
    pub(crate) fn serve(
        self,
        hub: Arc<Hub>,
        channels: Vec<(String, Option<Since>)>,
        identity: Identity,
        sessions: TaskTracker,
    ) -> Response {
        let deflate = hub.config.compression.compression && self.deflate_offered;
        let accept = match HeaderValue::try_from(derive_accept_key(self.key.as_bytes())) {
            Ok(accept) => accept,
            // Base64 is always a valid header value.
            Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        };
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        if let Some(protocol) = self.protocol {
            headers.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            );
        }
        if deflate {
            headers.insert(
                header::SEC_WEBSOCKET_EXTENSIONS,
                HeaderValue::from_static(deflate::RESPONSE),
            );
        }

        // The connection's one task. Chained rather than an `async` block, which
        // would keep what it captures for the life of the connection: each step's
        // inputs are gone once the next one runs.
        tokio::spawn(self.on_upgrade.then(move |upgraded| match upgraded {
            Ok(upgraded) => Either::Left(session(
                TokioIo::new(upgraded),
                hub,
                channels,
                identity,
                deflate,
                sessions,
            )),
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket upgrade failed");
                Either::Right(std::future::ready(()))
            }
        }));
        response
    }
}

/// Serves an upgraded connection: tungstenite over it with the node's limits
/// (inflating what the client compressed when `deflate` was agreed), then the
/// session, tracked by `sessions`.
fn session(
    upgraded: TokioIo<Upgraded>,
    hub: Arc<Hub>,
    channels: Vec<(String, Option<Since>)>,
    identity: Identity,
    deflate: bool,
    sessions: TaskTracker,
) -> impl Future<Output = ()> + Send {
    let max_message = hub.config.limits.max_message_bytes;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    if deflate {
        let compressor = Compressor::new(&hub.config.compression, hub.metrics.clone());
        let inflating = InflatingIo::new(upgraded, max_message);
        // Boxed: the larger socket would otherwise widen every connection's task,
        // compressed or not, for as long as it lives.
        let socket = Box::pin(WebSocketStream::from_raw_socket(
            Gate::new(inflating),
            Role::Server,
            Some(config),
        ));
        Either::Left(socket.then(move |socket| {
            sessions.track_future(super::run(
                socket,
                hub,
                channels,
                identity,
                Some(compressor),
            ))
        }))
    } else {
        let socket =
            WebSocketStream::from_raw_socket(Gate::new(upgraded), Role::Server, Some(config));
        Either::Right(socket.then(move |socket| {
            sessions.track_future(super::run(socket, hub, channels, identity, None))
        }))
    }
}

/// Whether the header's value is `value`, ignoring case.
fn header_is(headers: &HeaderMap, name: HeaderName, value: &str) -> bool {
    headers
        .get(&name)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

/// Whether the header's value contains `value` (lowercase), ignoring case.
fn header_contains(headers: &HeaderMap, name: HeaderName, value: &str) -> bool {
    headers
        .get(&name)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains(value))
}
