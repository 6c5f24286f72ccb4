//! The golden frames of `docs/protocol/examples.json`: every client frame decodes to
//! its request, and every server frame is exactly what the relay's encoders write
//! for the same values. The JavaScript client's tests read the same file.

use bytes::Bytes;
use serde_json::Value;
use wsrelay::protocol::{self, ChannelPosition, Request};
use wsrelay::publication::{Epoch, Kind, Position, Publication};

fn examples() -> Value {
    let text = include_str!("../docs/protocol/examples.json");
    serde_json::from_str(text).unwrap()
}

fn position(frame: &Value) -> Position {
    Position {
        epoch: Epoch::parse(frame["epoch"].as_str().unwrap()).unwrap(),
        offset: frame["offset"].as_u64().unwrap(),
    }
}

fn publication(
    kind: Kind,
    data: &Value,
    from: Option<&str>,
    position: Option<Position>,
) -> Publication {
    Publication {
        kind,
        data: Bytes::from(data.to_string()),
        from: from.map(|f| Bytes::copy_from_slice(f.as_bytes())),
        position,
        traceparent: Bytes::new(),
        published_at_us: 0,
    }
}

/// The id of a frame as a request id, by parsing a request that carries it.
fn with_id<T>(frame: &Value, f: impl FnOnce(Option<protocol::RequestId<'_>>) -> T) -> T {
    let text = match frame.get("id") {
        Some(id) => format!(r#"{{"op":"ping","id":{id}}}"#),
        None => r#"{"op":"ping"}"#.to_owned(),
    };
    let request = protocol::parse_request(&text).unwrap();
    f(request.id())
}

#[test]
fn client_frames_decode() {
    for example in examples()["client"].as_array().unwrap() {
        let frame = &example["frame"];
        let text = frame.to_string();
        let request = protocol::parse_request(&text)
            .unwrap_or_else(|e| panic!("{}: {}", example["name"], e.message));
        let op = match request {
            Request::Subscribe { .. } => "sub",
            Request::Unsubscribe { .. } => "unsub",
            Request::Publish { .. } => "pub",
            Request::History { .. } => "history",
            Request::Presence { .. } => "presence",
            Request::PresenceStats { .. } => "presence_stats",
            Request::Ping { .. } => "ping",
            Request::Rpc { .. } => "rpc",
        };
        assert_eq!(frame["op"], op, "{}", example["name"]);
        assert_eq!(
            request.id().map(|i| i.as_json().to_owned()),
            Some(frame["id"].to_string())
        );
    }
}

#[test]
fn server_frames_are_what_the_encoders_write() {
    for example in examples()["server"].as_array().unwrap() {
        let frame = &example["frame"];
        let name = example["name"].as_str().unwrap();
        let ch = frame["ch"].as_str().unwrap_or_default();
        let encoded = match frame["op"].as_str().unwrap() {
            "welcome" => {
                let positions: Vec<ChannelPosition> = frame["positions"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|p| ChannelPosition {
                        ch: p["ch"].as_str().unwrap().into(),
                        epoch: p["epoch"].as_str().unwrap().into(),
                        offset: p["offset"].as_u64().unwrap(),
                        recovered: p["recovered"].as_bool(),
                    })
                    .collect();
                let channels: Vec<String> =
                    serde_json::from_value(frame["channels"].clone()).unwrap();
                protocol::encode_stream_welcome(
                    frame["node"].as_str().unwrap(),
                    frame["conn"].as_str().unwrap(),
                    &channels,
                    &positions,
                    frame["session"].as_str(),
                )
            }
            "msg" => protocol::encode_publication(
                ch,
                &publication(
                    Kind::Message,
                    &frame["data"],
                    frame["from"].as_str(),
                    frame.get("offset").map(|_| Position {
                        epoch: Epoch::parse("e").unwrap(),
                        offset: frame["offset"].as_u64().unwrap(),
                    }),
                ),
            ),
            "ack" => with_id(frame, |id| {
                let id = id.unwrap();
                match (frame.get("epoch"), frame.get("offset")) {
                    (Some(_), _) => protocol::encode_subscribe_ack(
                        id,
                        &position(frame),
                        frame["recovered"].as_bool(),
                    ),
                    (None, Some(offset)) => {
                        protocol::encode_publish_ack(id, offset.as_u64().unwrap())
                    }
                    (None, None) => protocol::encode_ack(id),
                }
            }),
            "error" if frame["code"] == "refused" => with_id(frame, |id| {
                protocol::encode_refused(
                    id,
                    frame["app_code"].as_u64().unwrap() as u16,
                    frame["message"].as_str().unwrap(),
                )
            }),
            "rpc" => with_id(frame, |id| {
                let data = serde_json::value::RawValue::from_string(frame["data"].to_string())
                    .unwrap();
                protocol::encode_rpc(id, &data)
            }),
            "subscribed" => protocol::encode_subscribed(
                ch,
                frame.get("epoch").map(|_| position(frame)).as_ref(),
            ),
            "unsubscribed" => protocol::encode_unsubscribed(ch),
            "disconnect" => protocol::encode_disconnect(
                frame["code"].as_u64().unwrap() as u16,
                frame["reason"].as_str().unwrap(),
            ),
            "error" => with_id(frame, |id| {
                let code = match frame["code"].as_str().unwrap() {
                    "forbidden" => protocol::ErrorCode::Forbidden,
                    other => panic!("{name}: add {other} here"),
                };
                protocol::encode_error(id, code, frame["message"].as_str().unwrap())
            }),
            "gap" => protocol::encode_gap(ch, &position(frame)),
            "history" => {
                let messages: Vec<Publication> = frame["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| {
                        publication(
                            Kind::Message,
                            &m["data"],
                            None,
                            Some(Position {
                                epoch: Epoch::parse("e").unwrap(),
                                offset: m["offset"].as_u64().unwrap(),
                            }),
                        )
                    })
                    .collect();
                with_id(frame, |id| {
                    let truncated = frame["truncated"] == true;
                    protocol::encode_history(id, ch, &position(frame), &messages, truncated)
                })
            }
            "presence" => {
                let entries: Vec<Bytes> = frame["clients"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| Bytes::from(e.to_string()))
                    .collect();
                with_id(frame, |id| protocol::encode_presence(id, ch, &entries))
            }
            "presence_stats" => with_id(frame, |id| {
                protocol::encode_presence_stats(
                    id,
                    ch,
                    frame["clients"].as_u64().unwrap() as usize,
                    frame["users"].as_u64().unwrap() as usize,
                )
            }),
            op @ ("join" | "leave") => {
                let entry = protocol::presence_entry(
                    frame["conn"].as_str().unwrap(),
                    frame["node"].as_str().unwrap(),
                    frame["user"].as_str(),
                    frame
                        .get("info")
                        .filter(|i| !i.is_null())
                        .map(|i| i.to_string())
                        .as_deref(),
                );
                let kind = if op == "join" {
                    Kind::Join
                } else {
                    Kind::Leave
                };
                protocol::encode_presence_event(
                    ch,
                    &publication(kind, &serde_json::from_str(&entry).unwrap(), None, None),
                )
            }
            "pong" => with_id(frame, protocol::encode_pong),
            "close" => protocol::encode_close(
                frame["code"].as_u64().unwrap() as u16,
                frame["reason"].as_str().unwrap(),
                frame["reconnect"].as_bool().unwrap(),
            ),
            other => panic!("{name}: no encoder for {other}"),
        };
        let encoded: Value = serde_json::from_str(encoded.as_str()).unwrap();
        assert_eq!(&encoded, frame, "{name}");
    }
}
