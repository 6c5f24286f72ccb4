//! wsrelay: a horizontally scaled WebSocket relay.
//!
//! Each node accepts WebSocket clients, keeps a local registry of their channel
//! subscriptions, and exchanges published messages with the other nodes through a
//! broker (Redis pub/sub, or in-process for a single node). See
//! `docs/architecture.md` for the map of modules and the path of a message, and
//! `docs/protocol.md` for the wire protocol.
//!
//! The binary is a thin shell around [`run`]; tests drive nodes in-process through
//! [`Node`] on port 0.

pub mod auth;
pub mod broker;
pub mod client;
pub mod cluster;
pub mod config;
pub mod delivery;
mod drain;
pub mod envelope;
pub mod frame;
mod handshake_io;
pub mod healthcheck;
mod http;
mod hub;
mod join;
mod memory;
pub mod metrics;
mod node;
mod pacing;
pub mod protocol;
mod proxy;
pub mod publication;
mod readiness;
mod reads;
pub mod registry;
mod session;
pub mod shutdown;
pub mod streams;
pub mod telemetry;
mod transport;
pub mod users;

pub use config::Config;
pub use node::{Node, NodeError, NodeHandle, bind, run};
