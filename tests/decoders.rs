//! Random input for the two decoders that face untrusted bytes: client frames and
//! envelopes from Redis. Runs in every test run (see `fuzz/` for long runs).

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{Value, json};
use wsrelay::envelope;
use wsrelay::protocol::{self, ErrorCode, Request};
use wsrelay::publication::{Epoch, Kind, Position, Publication};

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,24}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn arb_frame() -> impl Strategy<Value = String> {
    let op = prop_oneof![
        Just(json!("sub")),
        Just(json!("unsub")),
        Just(json!("pub")),
        Just(json!("PUB")),
        Just(json!(7)),
        ".{0,6}".prop_map(Value::from),
    ];
    let ch = prop_oneof![
        "[A-Za-z0-9_.:@-]{1,20}".prop_map(Value::from),
        ".{0,140}".prop_map(Value::from),
        arb_json(),
    ];
    let id = prop_oneof![
        any::<u32>().prop_map(Value::from),
        ".{0,10}".prop_map(Value::from),
        arb_json()
    ];
    (
        op,
        prop::option::of(ch),
        prop::option::of(arb_json()),
        prop::option::of(id),
    )
        .prop_map(|(op, ch, data, id)| {
            let mut frame = serde_json::Map::new();
            frame.insert("op".into(), op);
            if let Some(ch) = ch {
                frame.insert("ch".into(), ch);
            }
            if let Some(data) = data {
                frame.insert("data".into(), data);
            }
            if let Some(id) = id {
                frame.insert("id".into(), id);
            }
            Value::Object(frame).to_string()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_text_gets_a_request_or_an_error(text in ".{0,300}") {
        if protocol::parse_request(&text).is_ok() {
            prop_assert!(text.trim_start().starts_with('{'), "only objects are requests: {text}");
        }
    }

    /// Any JSON that is not an object — an array of a request's fields above all,
    /// which serde would read as the struct — is refused with `bad_request`.
    #[test]
    fn only_objects_are_requests(value in arb_json(), frame in arb_frame()) {
        let fields: Vec<Value> = serde_json::from_str::<serde_json::Map<String, Value>>(&frame)
            .unwrap()
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        for text in [value.to_string(), Value::Array(fields).to_string()] {
            if text.starts_with('{') {
                continue;
            }
            let e = protocol::parse_request(&text).unwrap_err();
            prop_assert_eq!(e.code, ErrorCode::BadRequest, "{}", text);
        }
    }

    #[test]
    fn json_shaped_frames_decode_consistently(frame in arb_frame()) {
        match protocol::parse_request(&frame) {
            Ok(Request::Publish { ch, data, .. }) => {
                let channel = ch.as_deref().unwrap_or("global");
                prop_assert!(protocol::validate_channel(channel).is_ok());
                let publication = Publication {
                    kind: Kind::Message,
                    data: Bytes::copy_from_slice(data.get().as_bytes()),
                    from: None,
                    position: None,
                    traceparent: Bytes::new(),
                    published_at_us: 0,
                };
                let msg: Value = serde_json::from_str(protocol::encode_publication(channel, &publication).as_str()).unwrap();
                let sent: Value = serde_json::from_str(&frame).unwrap();
                prop_assert_eq!(&msg["data"], &sent["data"], "data forwarded unchanged");
            }
            Ok(
                Request::Subscribe { ch, .. }
                | Request::Unsubscribe { ch, .. }
                | Request::History { ch, .. }
                | Request::Presence { ch, .. }
                | Request::PresenceStats { ch, .. },
            ) => {
                prop_assert!(protocol::validate_channel(&ch).is_ok());
            }
            Ok(Request::Ping { .. }) => {}
            Ok(Request::Rpc { method, data, id }) => {
                // The answer frame carries the id and the data as JSON.
                prop_assert!(!method.is_empty());
                let answer = protocol::encode_rpc(id, data.unwrap_or(&serde_json::value::RawValue::from_string("null".into()).unwrap()));
                prop_assert!(serde_json::from_str::<Value>(answer.as_str()).is_ok());
            }
            Err(e) => {
                // The error frame itself is valid JSON, with the id when there was a readable one.
                let error: Value = serde_json::from_str(protocol::encode_error(e.id, e.code, &e.message).as_str()).unwrap();
                prop_assert_eq!(&error["code"], &json!(e.code.as_str()));
                if e.code == ErrorCode::InvalidChannel {
                    prop_assert!(serde_json::from_str::<Value>(&frame).unwrap().get("ch").is_some());
                }
            }
        }
    }

    #[test]
    fn any_bytes_from_redis_are_decoded_or_refused(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(p) = envelope::decode(bytes.clone().into()) {
            prop_assert!(std::str::from_utf8(&p.data).is_ok());
            prop_assert!(p.data.len() + p.traceparent.len() < bytes.len());
        }
    }

    #[test]
    fn envelopes_round_trip(
        data in ".{0,200}",
        traceparent in "[0-9a-f-]{0,60}",
        from in proptest::option::of(".{1,40}"),
        offset in proptest::option::of(1u64..(1 << 53)),
        epoch in "[a-z0-9]{1,32}",
    ) {
        let publication = Publication {
            kind: Kind::Message,
            data: Bytes::from(data),
            from: from.map(Bytes::from),
            position: offset.map(|offset| Position { epoch: Epoch::parse(&epoch).unwrap(), offset }),
            traceparent: Bytes::from(traceparent),
            published_at_us: 7,
        };
        prop_assert_eq!(envelope::decode(envelope::encode(&publication)).unwrap(), publication);
    }
}
