//! Wire protocol v1: the only module that knows the JSON frames clients exchange with
//! a node (see `docs/protocol.md`).
//!
//! Decoding borrows from the received text: the `data` of a publish and the request
//! `id` are kept as raw JSON slices, so a message is forwarded exactly as published
//! and an `id` is echoed byte for byte. Encoding writes frames directly into one
//! buffer; a `msg` frame is built once per publish and its bytes are shared by every
//! recipient on every node.

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::frame::Frame;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::publication::{Epoch, Kind, MAX_OFFSET, Position, Publication};

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 128;

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// Zero bytes.
    #[error("channel name is empty")]
    Empty,
    /// Over [`MAX_CHANNEL_LEN`] bytes.
    #[error("channel name is longer than {MAX_CHANNEL_LEN} bytes")]
    TooLong,
    /// A character outside the alphabet.
    #[error(
        "channel name may only contain A-Z a-z 0-9 _ . : @ -, and end in # and a comma-separated list of users"
    )]
    BadCharacter,
    /// A user-limited channel whose list of users is empty or has an empty name.
    #[error("a channel's user list (after #) must name users, separated by commas")]
    BadUserList,
}

/// Checks a channel name: 1 to 128 bytes of `[A-Za-z0-9_.:@-]`, optionally ending in
/// `#` and a comma-separated list of user ids of the same alphabet (a user-limited
/// channel, see [`channel_users`]).
///
/// The alphabet is deliberately narrow: names never need JSON escaping, are safe in
/// Redis channel names, URLs and log lines.
pub fn validate_channel(name: &str) -> Result<(), ChannelError> {
    if name.is_empty() {
        return Err(ChannelError::Empty);
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(ChannelError::TooLong);
    }
    let plain = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-'))
    };
    let (base, users) = match name.split_once('#') {
        Some((base, users)) => (base, Some(users)),
        None => (name, None),
    };
    if !plain(base) {
        return Err(ChannelError::BadCharacter);
    }
    if let Some(users) = users {
        for user in users.split(',') {
            if user.is_empty() {
                return Err(ChannelError::BadUserList);
            }
            if !plain(user) {
                return Err(ChannelError::BadCharacter);
            }
        }
    }
    Ok(())
}

/// The users a user-limited channel (`dm:chat#alice,bob`, `#alice`) is limited to,
/// or `None` for any other channel. Only they may subscribe and publish to it, and
/// they need no grant for it.
pub fn channel_users(name: &str) -> Option<std::str::Split<'_, char>> {
    name.split_once('#').map(|(_, users)| users.split(','))
}

/// Error codes of `error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not JSON, not an object, or a missing/mistyped field.
    BadRequest,
    /// `op` is not one this node knows.
    UnknownOp,
    /// The channel name breaks the naming rules.
    InvalidChannel,
    /// The broker could not be reached in time; the request had no effect.
    Unavailable,
    /// The connection's token does not allow this channel.
    Forbidden,
    /// Publishing faster than the connection's rate limit.
    RateLimited,
    /// A limit of the node (subscriptions per connection, channels per node).
    LimitExceeded,
    /// Anything else that went wrong on the node, or an answer of the application
    /// backend that is not the documented JSON.
    Internal,
    /// The application backend refused the request (the frame carries its
    /// `app_code`, 4000 to 4999).
    Refused,
    /// A publish to a channel with history was stored on the Redis master and
    /// delivered, but not confirmed by the replicas `publish-durability` asks for in
    /// time: it may or may not survive a failover.
    NotDurable,
}

impl ErrorCode {
    /// The code as sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::Internal => "internal",
            ErrorCode::Refused => "refused",
            ErrorCode::NotDurable => "not_durable",
        }
    }
}

/// A request id: the raw JSON text of a string or number, echoed back unchanged.
#[derive(Debug, Clone, Copy)]
pub struct RequestId<'a>(&'a str);

impl<'a> RequestId<'a> {
    /// The id as JSON text (quoted when it is a string).
    pub fn as_json(&self) -> &'a str {
        self.0
    }
}

/// A decoded client request.
#[derive(Debug)]
pub enum Request<'a> {
    /// `sub`: start receiving `ch`, recovering what was missed after `since`.
    Subscribe {
        /// Channel (validated).
        ch: Cow<'a, str>,
        /// The last position the client saw, to recover from.
        since: Option<Since>,
        /// Request id, echoed in the reply.
        id: Option<RequestId<'a>>,
    },
    /// `unsub`: stop receiving `ch`.
    Unsubscribe {
        /// Channel (validated).
        ch: Cow<'a, str>,
        /// Request id, echoed in the reply.
        id: Option<RequestId<'a>>,
    },
    /// `pub`: send `data` to every subscriber of `ch`.
    Publish {
        /// `None` means the node's default channel.
        ch: Option<Cow<'a, str>>,
        /// The payload, as the raw JSON text the client sent.
        data: &'a RawValue,
        /// A W3C `traceparent` to continue (validated).
        tp: Option<Cow<'a, str>>,
        /// Request id, echoed in the reply.
        id: Option<RequestId<'a>>,
    },
    /// `ping`: an application-level heartbeat (browsers cannot see WebSocket pings).
    Ping {
        /// Request id, echoed in the reply.
        id: Option<RequestId<'a>>,
    },
    /// `presence`: who is subscribed to `ch`, cluster-wide.
    Presence {
        /// Channel (validated).
        ch: Cow<'a, str>,
        /// Request id, echoed in the reply.
        id: Option<RequestId<'a>>,
    },
    /// `presence_stats`: how many clients and users are subscribed to `ch`.
    PresenceStats {
        /// Channel (validated).
        ch: Cow<'a, str>,
        /// Request id, echoed in the reply.
        id: Option<RequestId<'a>>,
    },
    /// `rpc`: a call of the application backend (the rpc proxy) over the connection.
    Rpc {
        /// What the client calls (1 to 128 bytes).
        method: Cow<'a, str>,
        /// Its argument, as the raw JSON text the client sent (absent: `null`).
        data: Option<&'a RawValue>,
        /// Request id, echoed in the reply.
        id: Option<RequestId<'a>>,
    },
    /// `history`: read what the channel's history holds.
    History {
        /// Channel (validated).
        ch: Cow<'a, str>,
        /// Messages after this position; without it, the latest ones.
        since: Option<Since>,
        /// Most messages wanted (capped by the node).
        limit: Option<u64>,
        /// Request id, echoed in the reply.
        id: Option<RequestId<'a>>,
    },
}

/// A position a client names: `{"epoch":"k3x9","offset":40}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    /// The epoch the client saw.
    pub epoch: Epoch,
    /// The last offset the client received.
    pub offset: u64,
}

impl Since {
    /// Parses the connect-time form `<epoch>:<offset>` (the tail of a `since` query
    /// parameter after the channel name).
    pub fn parse_pair(epoch: &str, offset: &str) -> Result<Since, &'static str> {
        let epoch = Epoch::parse(epoch).ok_or(SINCE_EPOCH)?;
        let offset = offset
            .parse::<u64>()
            .ok()
            .filter(|o| *o <= MAX_OFFSET)
            .ok_or(SINCE_OFFSET)?;
        Ok(Since { epoch, offset })
    }
}

const SINCE_EPOCH: &str = "since.epoch must be 1 to 32 letters or digits";
const SINCE_OFFSET: &str = "since.offset must be an integer from 0 to 2^53-1";

impl<'a> Request<'a> {
    /// The request id, if the client gave one.
    pub fn id(&self) -> Option<RequestId<'a>> {
        match self {
            Request::Subscribe { id, .. }
            | Request::Unsubscribe { id, .. }
            | Request::Publish { id, .. }
            | Request::Ping { id }
            | Request::Presence { id, .. }
            | Request::PresenceStats { id, .. }
            | Request::Rpc { id, .. }
            | Request::History { id, .. } => *id,
        }
    }
}

/// A request that could not be decoded; carries the id when one could be read, so
/// the client can match the error to its request.
#[derive(Debug)]
pub struct RequestError<'a> {
    /// The request id, if it could be read.
    pub id: Option<RequestId<'a>>,
    /// What kind of mistake.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: Cow<'static, str>,
}

impl<'a> RequestError<'a> {
    fn new(
        id: Option<RequestId<'a>>,
        code: ErrorCode,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            id,
            code,
            message: message.into(),
        }
    }
}

/// A field that is either absent or present with any JSON value, `null` included
/// (serde maps `null` to `None` for an `Option`, which would make `"data":null`
/// indistinguishable from a missing `data`).
#[derive(Default)]
pub(crate) struct Field<'a>(pub(crate) Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(d).map(|raw| Field(Some(raw)))
    }
}

/// The envelope of every request, with each field kept raw so that one mistyped
/// field still lets us read the `id` and answer precisely.
#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow, default)]
    op: Field<'a>,
    #[serde(borrow, default)]
    ch: Field<'a>,
    #[serde(borrow, default)]
    data: Field<'a>,
    #[serde(borrow, default)]
    id: Field<'a>,
    #[serde(borrow, default)]
    tp: Field<'a>,
    #[serde(borrow, default)]
    since: Field<'a>,
    #[serde(borrow, default)]
    limit: Field<'a>,
    #[serde(borrow, default)]
    method: Field<'a>,
}

/// `since` as sent: an object with `epoch` and `offset` (other fields are ignored,
/// as everywhere in a request).
#[derive(Deserialize)]
struct RawSince<'a> {
    #[serde(borrow)]
    epoch: Cow<'a, str>,
    offset: u64,
}

fn parse_since<'a>(
    raw: Option<&RawValue>,
    id: Option<RequestId<'a>>,
) -> Result<Option<Since>, RequestError<'a>> {
    let Some(raw) = raw else { return Ok(None) };
    let bad = |m: &'static str| RequestError::new(id, ErrorCode::BadRequest, m);
    let since: RawSince<'_> = serde_json::from_str(raw.get())
        .map_err(|_| bad("since must be {\"epoch\":<string>,\"offset\":<integer>}"))?;
    let epoch = Epoch::parse(&since.epoch).ok_or_else(|| bad(SINCE_EPOCH))?;
    if since.offset > MAX_OFFSET {
        return Err(bad(SINCE_OFFSET));
    }
    Ok(Some(Since {
        epoch,
        offset: since.offset,
    }))
}

/// Decodes one client text frame.
pub fn parse_request(text: &str) -> Result<Request<'_>, RequestError<'_>> {
    // serde reads a struct from a JSON array too (fields in order): the protocol's
    // frames are objects only.
    if !text.trim_start().starts_with('{') {
        return Err(RequestError::new(
            None,
            ErrorCode::BadRequest,
            "frame is not a JSON object",
        ));
    }
    let raw: RawRequest<'_> = serde_json::from_str(text).map_err(|e| {
        RequestError::new(
            None,
            ErrorCode::BadRequest,
            format!("frame is not a JSON object: {e}"),
        )
    })?;

    let id = match raw.id.0 {
        None => None,
        Some(v) => {
            let s = v.get();
            if s.starts_with('"')
                || s.starts_with('-')
                || s.starts_with(|c: char| c.is_ascii_digit())
            {
                Some(RequestId(s))
            } else {
                return Err(RequestError::new(
                    None,
                    ErrorCode::BadRequest,
                    "id must be a string or a number",
                ));
            }
        }
    };

    let op: Cow<'_, str> = match raw.op.0 {
        None => {
            return Err(RequestError::new(
                id,
                ErrorCode::BadRequest,
                "missing field op",
            ));
        }
        Some(v) => serde_json::from_str(v.get())
            .map_err(|_| RequestError::new(id, ErrorCode::BadRequest, "op must be a string"))?,
    };

    let ch: Option<Cow<'_, str>> = match raw.ch.0 {
        None => None,
        Some(v) => Some(
            serde_json::from_str(v.get())
                .map_err(|_| RequestError::new(id, ErrorCode::BadRequest, "ch must be a string"))?,
        ),
    };
    if let Some(name) = &ch {
        validate_channel(name)
            .map_err(|e| RequestError::new(id, ErrorCode::InvalidChannel, e.to_string()))?;
    }

    match op.as_ref() {
        "ping" => Ok(Request::Ping { id }),
        "presence" | "presence_stats" => {
            let ch =
                ch.ok_or_else(|| RequestError::new(id, ErrorCode::BadRequest, "missing field ch"))?;
            Ok(if op == "presence" {
                Request::Presence { ch, id }
            } else {
                Request::PresenceStats { ch, id }
            })
        }
        "sub" | "unsub" | "history" => {
            let ch =
                ch.ok_or_else(|| RequestError::new(id, ErrorCode::BadRequest, "missing field ch"))?;
            let since = parse_since(raw.since.0, id)?;
            Ok(match op.as_ref() {
                "sub" => Request::Subscribe { ch, since, id },
                "unsub" => Request::Unsubscribe { ch, id },
                _ => {
                    let limit = match raw.limit.0 {
                        None => None,
                        Some(v) => Some(serde_json::from_str::<u64>(v.get()).map_err(|_| {
                            RequestError::new(
                                id,
                                ErrorCode::BadRequest,
                                "limit must be a non-negative integer",
                            )
                        })?),
                    };
                    Request::History {
                        ch,
                        since,
                        limit,
                        id,
                    }
                }
            })
        }
        "rpc" => {
            let method: Cow<'_, str> = match raw.method.0 {
                None => {
                    return Err(RequestError::new(
                        id,
                        ErrorCode::BadRequest,
                        "missing field method",
                    ));
                }
                Some(v) => serde_json::from_str(v.get()).map_err(|_| {
                    RequestError::new(id, ErrorCode::BadRequest, "method must be a string")
                })?,
            };
            if method.is_empty() || method.len() > MAX_CHANNEL_LEN {
                return Err(RequestError::new(
                    id,
                    ErrorCode::BadRequest,
                    format!("method must be 1 to {MAX_CHANNEL_LEN} bytes"),
                ));
            }
            Ok(Request::Rpc {
                method,
                data: raw.data.0,
                id,
            })
        }
        "pub" => {
            let data = raw.data.0.ok_or_else(|| {
                RequestError::new(id, ErrorCode::BadRequest, "missing field data")
            })?;
            let tp = match raw.tp.0 {
                None => None,
                Some(v) => Some(
                    serde_json::from_str::<Cow<'_, str>>(v.get())
                        .ok()
                        .filter(|t| is_traceparent(t))
                        .ok_or_else(|| {
                            RequestError::new(
                                id,
                                ErrorCode::BadRequest,
                                "tp must be a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)",
                            )
                        })?,
                ),
            };
            Ok(Request::Publish { ch, data, tp, id })
        }
        other => {
            let mut shown: String = other.chars().take(32).collect();
            if shown.len() < other.len() {
                shown.push('…');
            }
            Err(RequestError::new(
                id,
                ErrorCode::UnknownOp,
                format!(
                    "unknown op {shown:?} (expected sub, unsub, pub, history, presence, presence_stats, rpc or ping)"
                ),
            ))
        }
    }
}

/// Whether `s` is a W3C `traceparent` of version 00 with non-zero ids.
pub fn is_traceparent(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let hex = |p: &str, len: usize| {
        p.len() == len && p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let nonzero = |p: &str| p.bytes().any(|b| b != b'0');
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && nonzero(parts[1])
        && hex(parts[2], 16)
        && nonzero(parts[2])
        && hex(parts[3], 2)
}

/// `{"op":"msg","ch":..,"offset":..,"from":..,"data":..}` (`offset` on channels with
/// history, `from` when the publisher is exposed): built once per publication on each
/// node, shared by every local recipient.
pub fn encode_publication(ch: &str, publication: &Publication) -> Frame {
    debug_assert!(
        validate_channel(ch).is_ok(),
        "channel names never need escaping"
    );
    let data = publication.data_str();
    // Exact for everything but escapes in `from`: a frame kept in the node's
    // history cache keeps its buffer, spare room included.
    let from = publication.publisher().map_or(0, |f| f.len() + 10);
    let mut out = String::with_capacity(56 + ch.len() + from + data.len());
    out.push_str(r#"{"op":"msg","ch":""#);
    out.push_str(ch);
    out.push('"');
    if let Some(offset) = publication.offset() {
        let _ = write!(out, r#","offset":{offset}"#);
    }
    if let Some(from) = publication.publisher() {
        out.push_str(r#","from":"#);
        push_json_string(&mut out, from);
    }
    out.push_str(r#","data":"#);
    out.push_str(data);
    out.push('}');
    out.into()
}

/// `{"op":"join"|"leave","ch":..,"conn":..,"node":..,"user":..,"info":..}`: the
/// event's presence entry (a JSON object built by [`presence_entry`]) with `op` and
/// `ch` in front. Built once per event on each node.
pub fn encode_presence_event(ch: &str, publication: &Publication) -> Frame {
    let op = match publication.kind {
        Kind::Join => "join",
        Kind::Leave => "leave",
        Kind::Message => return encode_publication(ch, publication),
    };
    let entry = publication.data_str();
    let fields = entry.strip_prefix('{').unwrap_or("}");
    let mut out = String::with_capacity(24 + ch.len() + entry.len());
    let _ = write!(out, r#"{{"op":"{op}","ch":"{ch}""#);
    if fields != "}" {
        out.push(',');
    }
    out.push_str(fields);
    out.into()
}

/// A presence entry: `{"conn":..,"node":..,"user":..,"info":..}` (`user` and `info`
/// are null when unknown; `info` is the token's claim as sent).
pub fn presence_entry(conn: &str, node: &str, user: Option<&str>, info: Option<&str>) -> String {
    let mut out = String::with_capacity(48 + info.map_or(0, str::len));
    out.push_str(r#"{"conn":"#);
    push_json_string(&mut out, conn);
    out.push_str(r#","node":"#);
    push_json_string(&mut out, node);
    out.push_str(r#","user":"#);
    match user {
        Some(user) => push_json_string(&mut out, user),
        None => out.push_str("null"),
    }
    out.push_str(r#","info":"#);
    out.push_str(info.unwrap_or("null"));
    out.push('}');
    out
}

/// The fields of a presence reply, shared by the frame and `GET /api/presence`:
/// `"ch":..,"clients":[entry,..]` (without braces).
pub fn presence_body(ch: &str, entries: &[bytes::Bytes]) -> String {
    let size: usize = entries.iter().map(|e| e.len() + 1).sum();
    let mut out = String::with_capacity(24 + ch.len() + size);
    let _ = write!(out, r#""ch":"{ch}","clients":["#);
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(std::str::from_utf8(entry).unwrap_or("null"));
    }
    out.push(']');
    out
}

/// `{"op":"presence","id":..,"ch":..,"clients":[..]}`.
pub fn encode_presence(id: Option<RequestId<'_>>, ch: &str, entries: &[bytes::Bytes]) -> Frame {
    let mut out = String::from(r#"{"op":"presence","#);
    if let Some(id) = id {
        let _ = write!(out, r#""id":{},"#, id.as_json());
    }
    out.push_str(&presence_body(ch, entries));
    out.push('}');
    out.into()
}

/// `{"op":"presence_stats","id":..,"ch":..,"clients":N,"users":M}`.
pub fn encode_presence_stats(
    id: Option<RequestId<'_>>,
    ch: &str,
    clients: usize,
    users: usize,
) -> Frame {
    let mut out = String::from(r#"{"op":"presence_stats","#);
    if let Some(id) = id {
        let _ = write!(out, r#""id":{},"#, id.as_json());
    }
    let _ = write!(out, r#""ch":"{ch}","clients":{clients},"users":{users}}}"#);
    out.into()
}

fn push_json_string(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).expect("strings always serialise"));
}

/// The WebSocket subprotocol of this protocol version (`Sec-WebSocket-Protocol`).
/// A client that asks for it is protocol-aware: it is not put in the default
/// channel when it names none at connect.
pub const SUBPROTOCOL: &str = "wsrelay.v1";

/// `{"op":"pong","id":..}` (`id` when the ping had one).
pub fn encode_pong(id: Option<RequestId<'_>>) -> Frame {
    match id {
        Some(id) => format!(r#"{{"op":"pong","id":{}}}"#, id.as_json()).into(),
        None => Frame::from_static(r#"{"op":"pong"}"#),
    }
}

/// `{"op":"ack","id":..}`.
pub fn encode_ack(id: RequestId<'_>) -> Frame {
    format!(r#"{{"op":"ack","id":{}}}"#, id.as_json()).into()
}

/// The ack of a `pub` to a channel with history: `{"op":"ack","id":..,"offset":..}`.
pub fn encode_publish_ack(id: RequestId<'_>, offset: u64) -> Frame {
    format!(r#"{{"op":"ack","id":{},"offset":{offset}}}"#, id.as_json()).into()
}

/// The ack of a `sub` to a channel with history:
/// `{"op":"ack","id":..,"epoch":..,"offset":..,"recovered":..}` (`recovered` only
/// when the client asked to recover).
pub fn encode_subscribe_ack(
    id: RequestId<'_>,
    position: &Position,
    recovered: Option<bool>,
) -> Frame {
    let mut out = format!(
        r#"{{"op":"ack","id":{},"epoch":"{}","offset":{}"#,
        id.as_json(),
        position.epoch,
        position.offset
    );
    if let Some(recovered) = recovered {
        let _ = write!(out, r#","recovered":{recovered}"#);
    }
    out.push('}');
    out.into()
}

/// `{"op":"gap","ch":..,"epoch":..,"offset":..}`: messages of the channel up to this
/// position could not be delivered; delivery continues after it.
pub fn encode_gap(ch: &str, position: &Position) -> Frame {
    format!(
        r#"{{"op":"gap","ch":"{ch}","epoch":"{}","offset":{}}}"#,
        position.epoch, position.offset
    )
    .into()
}

/// The reply to `history`:
/// `{"op":"history","id":..,"ch":..,"epoch":..,"offset":..,"messages":[{"offset":..,"data":..},..]}`.
pub fn encode_history(
    id: Option<RequestId<'_>>,
    ch: &str,
    position: &Position,
    messages: &[Publication],
    truncated: bool,
) -> Frame {
    let mut out = String::from(r#"{"op":"history","#);
    if let Some(id) = id {
        let _ = write!(out, r#""id":{},"#, id.as_json());
    }
    out.push_str(&history_body(ch, position, messages, truncated));
    out.push('}');
    out.into()
}

/// The fields of a history reply, shared by the frame and `GET /api/history`:
/// `"ch":..,"epoch":..,"offset":..,"messages":[..]` (without braces), and
/// `"truncated":true` when messages were left out to bound the answer in bytes.
pub fn history_body(
    ch: &str,
    position: &Position,
    messages: &[Publication],
    truncated: bool,
) -> String {
    let size: usize = messages.iter().map(|m| m.data.len() + 32).sum();
    let mut out = String::with_capacity(64 + size);
    let _ = write!(
        out,
        r#""ch":"{ch}","epoch":"{}","offset":{},"messages":["#,
        position.epoch, position.offset
    );
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('{');
        if let Some(offset) = m.offset() {
            let _ = write!(out, r#""offset":{offset},"#);
        }
        if let Some(from) = m.publisher() {
            out.push_str(r#""from":"#);
            push_json_string(&mut out, from);
            out.push(',');
        }
        out.push_str(r#""data":"#);
        out.push_str(m.data_str());
        out.push('}');
    }
    out.push(']');
    if truncated {
        out.push_str(r#","truncated":true"#);
    }
    out
}

/// `{"op":"error","id":..,"code":..,"message":..}`; `id` is left out when unknown.
pub fn encode_error(id: Option<RequestId<'_>>, code: ErrorCode, message: &str) -> Frame {
    let mut out = String::with_capacity(64 + message.len());
    out.push_str(r#"{"op":"error","#);
    if let Some(id) = id {
        let _ = write!(out, r#""id":{},"#, id.as_json());
    }
    let _ = write!(
        out,
        r#""code":"{}","message":{}}}"#,
        code.as_str(),
        serde_json::Value::from(message)
    );
    out.into()
}

/// `{"op":"error","code":"refused","app_code":N,"message":..}`: the application
/// backend refused a request (or the connection) with its own code.
pub fn encode_refused(id: Option<RequestId<'_>>, app_code: u16, message: &str) -> Frame {
    let mut out = String::with_capacity(80 + message.len());
    out.push_str(r#"{"op":"error","#);
    if let Some(id) = id {
        let _ = write!(out, r#""id":{},"#, id.as_json());
    }
    let _ = write!(
        out,
        r#""code":"refused","app_code":{app_code},"message":{}}}"#,
        serde_json::Value::from(message)
    );
    out.into()
}

/// `{"op":"rpc","id":..,"data":..}`: the application backend's answer to an `rpc`.
pub fn encode_rpc(id: Option<RequestId<'_>>, data: &RawValue) -> Frame {
    let mut out = String::with_capacity(32 + data.get().len());
    out.push_str(r#"{"op":"rpc","#);
    if let Some(id) = id {
        let _ = write!(out, r#""id":{},"#, id.as_json());
    }
    let _ = write!(out, r#""data":{}}}"#, data.get());
    out.into()
}

/// `{"op":"subscribed","ch":..[,"epoch":..,"offset":..]}`: the server subscribed the
/// connection to `ch` (`POST /api/subscribe`); its messages follow.
pub fn encode_subscribed(ch: &str, position: Option<&Position>) -> Frame {
    match position {
        Some(p) => format!(
            r#"{{"op":"subscribed","ch":"{ch}","epoch":"{}","offset":{}}}"#,
            p.epoch, p.offset
        ),
        None => format!(r#"{{"op":"subscribed","ch":"{ch}"}}"#),
    }
    .into()
}

/// `{"op":"unsubscribed","ch":..}`: the server ended the connection's subscription.
pub fn encode_unsubscribed(ch: &str) -> Frame {
    format!(r#"{{"op":"unsubscribed","ch":"{ch}"}}"#).into()
}

/// `{"op":"disconnect","code":N,"reason":..}`: the server is closing the connection
/// (`POST /api/disconnect`, a revoked token); the close follows with the same code.
pub fn encode_disconnect(code: u16, reason: &str) -> Frame {
    format!(
        r#"{{"op":"disconnect","code":{code},"reason":{}}}"#,
        serde_json::Value::from(reason)
    )
    .into()
}

/// Where a connect-time channel with history stands, for `welcome`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChannelPosition {
    /// The channel.
    pub ch: String,
    /// Its history's epoch.
    pub epoch: String,
    /// Its top offset when the subscription went live.
    pub offset: u64,
    /// Whether the client's `since` was recovered (absent without `since`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
}

/// `{"op":"welcome","node":..,"conn":..,"channels":[..],"positions":[..]}`;
/// `positions` lists the connect-time channels with history (absent when none).
pub fn encode_welcome(
    node: &str,
    conn: &str,
    channels: &[String],
    positions: &[ChannelPosition],
) -> Frame {
    encode_stream_welcome(node, conn, channels, positions, None)
}

/// The `welcome` of a connection, with `session` (the id its client sends
/// requests with) on the streaming transports.
pub fn encode_stream_welcome(
    node: &str,
    conn: &str,
    channels: &[String],
    positions: &[ChannelPosition],
    session: Option<&str>,
) -> Frame {
    // A struct keeps the documented field order, `op` first like every other frame.
    #[derive(serde::Serialize)]
    struct Welcome<'a> {
        op: &'static str,
        node: &'a str,
        conn: &'a str,
        channels: &'a [String],
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        positions: &'a [ChannelPosition],
        #[serde(skip_serializing_if = "Option::is_none")]
        session: Option<&'a str>,
    }
    let welcome = Welcome {
        op: "welcome",
        node,
        conn,
        channels,
        positions,
        session,
    };
    serde_json::to_string(&welcome)
        .expect("strings always serialise")
        .into()
}

/// `{"op":"close","code":..,"reason":"..","reconnect":..}`: the last frame of a
/// streaming transport (SSE, HTTP streaming), which has no close frame of its own;
/// the code is the one a WebSocket would have been closed with, and `reconnect`
/// says whether connecting again (to any node) is the cure.
pub fn encode_close(code: u16, reason: &str, reconnect: bool) -> Frame {
    let mut out = String::with_capacity(64 + reason.len());
    out.push_str(r#"{"op":"close","code":"#);
    out.push_str(&code.to_string());
    out.push_str(r#","reason":"#);
    push_json_string(&mut out, reason);
    out.push_str(r#","reconnect":"#);
    out.push_str(if reconnect { "true" } else { "false" });
    out.push('}');
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn json(frame: &Frame) -> Value {
        serde_json::from_str(frame.as_str()).unwrap()
    }

    #[test]
    fn channel_rules() {
        assert!(validate_channel("room-1_a.b:c@d").is_ok());
        assert_eq!(validate_channel(""), Err(ChannelError::Empty));
        assert_eq!(validate_channel(&"a".repeat(128)), Ok(()));
        assert_eq!(
            validate_channel(&"a".repeat(129)),
            Err(ChannelError::TooLong)
        );
        for bad in ["a b", "a/b", "é", "a\"b", "a*"] {
            assert_eq!(
                validate_channel(bad),
                Err(ChannelError::BadCharacter),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_json_objects_are_requests() {
        // serde would read these as the struct's fields in order.
        for frame in [
            r#"["pub","ch",{"x":1},"id"]"#,
            r#"["ping"]"#,
            r#" ["sub","room1"]"#,
            "null",
            "42",
            r#""ping""#,
        ] {
            let e = parse_request(frame).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{frame}");
            assert!(
                e.message.contains("not a JSON object"),
                "{frame}: {}",
                e.message
            );
        }
        assert!(parse_request(r#" {"op":"ping"}"#).is_ok());
    }

    #[test]
    fn parses_the_three_ops() {
        match parse_request(r#"{"op":"sub","ch":"room1","id":1}"#).unwrap() {
            Request::Subscribe { ch, id, since } => {
                assert!(since.is_none());
                assert_eq!(ch, "room1");
                assert_eq!(id.unwrap().as_json(), "1");
            }
            other => panic!("{other:?}"),
        }
        match parse_request(r#"{"op":"unsub","ch":"room1"}"#).unwrap() {
            Request::Unsubscribe { ch, id } => {
                assert_eq!(ch, "room1");
                assert!(id.is_none());
            }
            other => panic!("{other:?}"),
        }
        match parse_request(r#"{"op":"pub","data":{"a": [1, 2]},"id":"x-1"}"#).unwrap() {
            Request::Publish { ch, data, id, tp } => {
                assert!(tp.is_none());
                assert!(ch.is_none());
                assert_eq!(data.get(), r#"{"a": [1, 2]}"#, "data kept byte for byte");
                assert_eq!(id.unwrap().as_json(), r#""x-1""#);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn null_data_is_a_value_not_a_missing_field() {
        match parse_request(r#"{"op":"pub","ch":"a","data":null}"#).unwrap() {
            Request::Publish { data, .. } => assert_eq!(data.get(), "null"),
            other => panic!("{other:?}"),
        }
        let e = parse_request(r#"{"op":"pub","ch":"a"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
    }

    #[test]
    fn traceparents_are_validated() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let frame = format!(r#"{{"op":"pub","ch":"a","data":1,"tp":"{tp}"}}"#);
        match parse_request(&frame).unwrap() {
            Request::Publish { tp: Some(got), .. } => assert_eq!(got, tp),
            other => panic!("{other:?}"),
        }
        for bad in [
            "nope",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        ] {
            let frame = format!(r#"{{"op":"pub","ch":"a","data":1,"tp":"{bad}","id":9}}"#);
            let e = parse_request(&frame).unwrap_err();
            assert_eq!(
                (e.code, e.id.map(|i| i.as_json())),
                (ErrorCode::BadRequest, Some("9")),
                "{bad}"
            );
        }
    }

    #[test]
    fn escaped_strings_are_decoded() {
        match parse_request(r#"{"op":"s\u0075b","ch":"r\u006fom"}"#).unwrap() {
            Request::Subscribe { ch, .. } => assert_eq!(ch, "room"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_carry_the_id_when_readable() {
        let cases = [
            (r#"{"op":"dance","id":7}"#, ErrorCode::UnknownOp, Some("7")),
            (
                r#"{"op":"sub","ch":"bad name","id":"q"}"#,
                ErrorCode::InvalidChannel,
                Some(r#""q""#),
            ),
            (r#"{"op":"sub","id":3}"#, ErrorCode::BadRequest, Some("3")),
            (r#"{"op":5,"id":3}"#, ErrorCode::BadRequest, Some("3")),
            (
                r#"{"op":"sub","ch":7,"id":3}"#,
                ErrorCode::BadRequest,
                Some("3"),
            ),
            (
                r#"{"ch":"a","id":-2.5}"#,
                ErrorCode::BadRequest,
                Some("-2.5"),
            ),
            (
                r#"{"op":"sub","ch":"a","id":{}}"#,
                ErrorCode::BadRequest,
                None,
            ),
            (
                r#"{"op":"sub","ch":"a","id":null}"#,
                ErrorCode::BadRequest,
                None,
            ),
            ("not json", ErrorCode::BadRequest, None),
            ("[1,2]", ErrorCode::BadRequest, None),
            (
                r#"{"op":"sub","ch":"a","ch":"b"}"#,
                ErrorCode::BadRequest,
                None,
            ),
        ];
        for (input, code, id) in cases {
            let e = parse_request(input).unwrap_err();
            assert_eq!(e.code, code, "{input}");
            assert_eq!(e.id.map(|i| i.as_json()), id, "{input}");
        }
    }

    #[test]
    fn since_and_history_requests() {
        match parse_request(
            r#"{"op":"sub","ch":"c:1","since":{"epoch":"k3x9","offset":40},"id":2}"#,
        )
        .unwrap()
        {
            Request::Subscribe { since, .. } => assert_eq!(
                since,
                Some(Since {
                    epoch: Epoch::parse("k3x9").unwrap(),
                    offset: 40
                })
            ),
            other => panic!("{other:?}"),
        }
        // Unknown fields are ignored inside `since` too, as everywhere in a request.
        match parse_request(
            r#"{"op":"history","ch":"c:1","since":{"epoch":"k3x9","offset":1,"x":2}}"#,
        )
        .unwrap()
        {
            Request::History { since, .. } => assert_eq!(since.map(|s| s.offset), Some(1)),
            other => panic!("{other:?}"),
        }
        match parse_request(r#"{"op":"history","ch":"c:1","limit":5}"#).unwrap() {
            Request::History { since, limit, .. } => {
                assert!(since.is_none());
                assert_eq!(limit, Some(5));
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            r#"{"op":"sub","ch":"a","since":5,"id":1}"#,
            r#"{"op":"sub","ch":"a","since":{"epoch":"x"},"id":1}"#,
            r#"{"op":"sub","ch":"a","since":{"epoch":"a b","offset":1},"id":1}"#,
            r#"{"op":"sub","ch":"a","since":{"epoch":"x","offset":-1},"id":1}"#,
            r#"{"op":"sub","ch":"a","since":{"epoch":"x","offset":9007199254740992},"id":1}"#,
            r#"{"op":"history","ch":"a","limit":"ten","id":1}"#,
            r#"{"op":"history","ch":"a","limit":-1,"id":1}"#,
        ] {
            let e = parse_request(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{bad}");
            assert_eq!(e.id.map(|i| i.as_json()), Some("1"), "{bad}");
        }
        assert_eq!(Since::parse_pair("k3x9", "40").unwrap().offset, 40);
        assert!(Since::parse_pair("k3x9", "x").is_err());
    }

    #[test]
    fn presence_frames() {
        let entry = presence_entry("17", "n1", Some("ada \"l\""), Some(r#"{"color":"red"}"#));
        assert_eq!(
            serde_json::from_str::<Value>(&entry).unwrap(),
            serde_json::json!({"conn":"17","node":"n1","user":"ada \"l\"","info":{"color":"red"}})
        );
        let event = Publication {
            kind: Kind::Join,
            data: bytes::Bytes::from(entry.clone()),
            from: None,
            position: None,
            traceparent: bytes::Bytes::new(),
            published_at_us: 0,
        };
        assert_eq!(
            json(&encode_presence_event("c:1", &event)),
            serde_json::json!({"op":"join","ch":"c:1","conn":"17","node":"n1","user":"ada \"l\"","info":{"color":"red"}})
        );
        let anonymous = presence_entry("3", "n2", None, None);
        assert_eq!(
            anonymous,
            r#"{"conn":"3","node":"n2","user":null,"info":null}"#
        );
        let id = parse_request(r#"{"op":"presence","ch":"c:1","id":5}"#)
            .unwrap()
            .id();
        let reply = json(&encode_presence(
            id,
            "c:1",
            &[entry.into(), anonymous.into()],
        ));
        assert_eq!(reply["op"], "presence");
        assert_eq!(reply["id"], 5);
        assert_eq!(reply["clients"][1]["conn"], "3");
        assert_eq!(
            json(&encode_presence_stats(id, "c:1", 2, 1)),
            serde_json::json!({"op":"presence_stats","id":5,"ch":"c:1","clients":2,"users":1})
        );
        assert!(matches!(
            parse_request(r#"{"op":"presence_stats","ch":"c:1"}"#).unwrap(),
            Request::PresenceStats { .. }
        ));
        assert_eq!(
            parse_request(r#"{"op":"presence","id":1}"#)
                .unwrap_err()
                .code,
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn encoders_produce_the_documented_frames() {
        use bytes::Bytes;
        let publication = |from: Option<&'static str>, offset: Option<u64>| Publication {
            kind: crate::publication::Kind::Message,
            data: Bytes::from_static(br#"{"text":"hi \"you\""}"#),
            from: from.map(|f| Bytes::from_static(f.as_bytes())),
            position: offset.map(|offset| Position {
                epoch: Epoch::parse("k3x9").unwrap(),
                offset,
            }),
            traceparent: Bytes::new(),
            published_at_us: 0,
        };
        let msg = encode_publication("room1", &publication(None, None));
        assert_eq!(
            msg.as_str(),
            r#"{"op":"msg","ch":"room1","data":{"text":"hi \"you\""}}"#
        );
        assert_eq!(json(&msg)["data"]["text"], "hi \"you\"");
        let from = encode_publication("room1", &publication(Some("ada \"l\""), Some(42)));
        assert_eq!(
            from.as_str(),
            r#"{"op":"msg","ch":"room1","offset":42,"from":"ada \"l\"","data":{"text":"hi \"you\""}}"#
        );

        let req = r#"{"op":"sub","ch":"a","id":"r-1"}"#;
        let id = parse_request(req).unwrap().id().unwrap();
        assert_eq!(encode_ack(id).as_str(), r#"{"op":"ack","id":"r-1"}"#);
        assert_eq!(
            encode_publish_ack(id, 43).as_str(),
            r#"{"op":"ack","id":"r-1","offset":43}"#
        );
        let position = Position {
            epoch: Epoch::parse("k3x9").unwrap(),
            offset: 42,
        };
        assert_eq!(
            encode_subscribe_ack(id, &position, Some(true)).as_str(),
            r#"{"op":"ack","id":"r-1","epoch":"k3x9","offset":42,"recovered":true}"#
        );
        assert_eq!(
            encode_subscribe_ack(id, &position, None).as_str(),
            r#"{"op":"ack","id":"r-1","epoch":"k3x9","offset":42}"#
        );
        assert_eq!(
            encode_gap("c:1", &position).as_str(),
            r#"{"op":"gap","ch":"c:1","epoch":"k3x9","offset":42}"#
        );
        let history = json(&encode_history(
            Some(id),
            "c:1",
            &position,
            &[
                publication(None, Some(41)),
                publication(Some("bo"), Some(42)),
            ],
            false,
        ));
        assert_eq!(
            history,
            serde_json::json!({"op":"history","id":"r-1","ch":"c:1","epoch":"k3x9","offset":42,
                "messages":[{"offset":41,"data":{"text":"hi \"you\""}},
                            {"offset":42,"from":"bo","data":{"text":"hi \"you\""}}]})
        );

        let err = json(&encode_error(
            Some(id),
            ErrorCode::Unavailable,
            "broker \"down\"",
        ));
        assert_eq!(err["op"], "error");
        assert_eq!(err["id"], "r-1");
        assert_eq!(err["code"], "unavailable");
        assert_eq!(err["message"], "broker \"down\"");
        let err = json(&encode_error(None, ErrorCode::BadRequest, "x"));
        assert!(err.get("id").is_none());

        let w = json(&encode_welcome("n1", "42", &["a".into(), "b".into()], &[]));
        assert_eq!(
            w,
            serde_json::json!({"op":"welcome","node":"n1","conn":"42","channels":["a","b"]})
        );
        let w = json(&encode_welcome(
            "n1",
            "42",
            &["c:1".into()],
            &[ChannelPosition {
                ch: "c:1".into(),
                epoch: "k3x9".into(),
                offset: 7,
                recovered: Some(false),
            }],
        ));
        assert_eq!(
            w["positions"],
            serde_json::json!([{"ch":"c:1","epoch":"k3x9","offset":7,"recovered":false}])
        );
    }
}
