//! Transports: how a session's requests and frames travel between a client and the
//! node. Each moves bytes only; what a connection does lives in `session`.
//!
//! - [`websocket`]: an upgraded HTTP/1.1 connection (RFC 6455), with
//! - [`deflate`]: permessage-deflate (RFC 7692) for it, compressed once per node.

mod deflate;
pub(crate) mod websocket;
