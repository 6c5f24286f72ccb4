//! Transports: how a session's requests and frames travel between a client and the
//! node. Each moves bytes only; what a connection does lives in `session`.
//!
//! - [`websocket`]: an upgraded HTTP/1.1 connection (RFC 6455).

pub(crate) mod websocket;
