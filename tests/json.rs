//! The generated JSON encoders against an independent one: prost-reflect's
//! reflective proto3 JSON, which the bridge used before. For every message
//! type of `proto/`, messages with every field set (each oneof member in
//! turn, odd strings, extreme numbers, unknown enum values, maps, nested
//! `Any`) must encode to the same JSON value both ways, and so must every
//! message the simulator generates.

use std::collections::HashMap;

use evbridge::normalize::json::{JsonWriter, ProtoJson};
use evbridge::pb;
use evbridge::sim::world::{GenConfig, generate};
use prost::Message;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, Value,
};
use serde_json::Value as Json;

fn pool() -> DescriptorPool {
    DescriptorPool::decode(pb::DESCRIPTOR_SET).unwrap()
}

/// What prost-reflect writes for `msg` (default options: camelCase,
/// defaults skipped, 64-bit integers as strings, enums by name).
fn witness(msg: &DynamicMessage) -> Json {
    serde_json::from_str(&serde_json::to_string(msg).unwrap()).unwrap()
}

/// What the generated encoder writes for the same bytes, reached through
/// the `Any` registry so that every message type is covered.
fn ours_via_any(full_name: &str, bytes: Vec<u8>) -> (Json, Vec<String>) {
    let mut w = JsonWriter::default();
    w.any(&prost_types::Any {
        type_url: format!("type.googleapis.com/{full_name}"),
        value: bytes,
    });
    let (text, problems) = w.finish();
    (serde_json::from_str(&text).unwrap(), problems)
}

fn ours<T: ProtoJson>(msg: &T) -> Json {
    let mut w = JsonWriter::default();
    msg.write_json(&mut w);
    let (text, problems) = w.finish();
    assert!(problems.is_empty(), "{problems:?}");
    serde_json::from_str(&text).unwrap()
}

/// A non-default value of `kind`; `variant` varies the choice.
fn sample(pool: &DescriptorPool, kind: &Kind, variant: usize, depth: usize) -> Value {
    match kind {
        Kind::String => Value::String(format!("s{variant} \"q\" \\ \n\t\u{1} é😀")),
        Kind::Bytes => Value::Bytes(vec![0, 0xff, variant as u8, 0x3e].into()),
        Kind::Bool => Value::Bool(true),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32([i32::MIN, -1, 7][variant % 3]),
        Kind::Uint32 | Kind::Fixed32 => Value::U32([u32::MAX, 1][variant % 2]),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64([i64::MIN, -1_234_567_890_123, i64::MAX][variant % 3])
        }
        Kind::Uint64 | Kind::Fixed64 => Value::U64([u64::MAX, 3][variant % 2]),
        Kind::Float => Value::F32([0.1, -2.5e-8, 3.0e38][variant % 3]),
        Kind::Double => Value::F64([0.1, 1e300, -7.25][variant % 3]),
        // A known value by turns with a number this build does not know.
        Kind::Enum(e) => {
            let known: Vec<i32> = e.values().map(|v| v.number()).filter(|n| *n != 0).collect();
            match variant % 3 {
                2 => Value::EnumNumber(99),
                _ if known.is_empty() => Value::EnumNumber(99),
                _ => Value::EnumNumber(known[variant % known.len()]),
            }
        }
        Kind::Message(m) => Value::Message(filled(pool, m, variant, depth + 1)),
    }
}

/// A message of type `desc` with every field set (the `variant`-th member
/// of each oneof), down to a few levels.
fn filled(
    pool: &DescriptorPool,
    desc: &MessageDescriptor,
    variant: usize,
    depth: usize,
) -> DynamicMessage {
    let mut msg = DynamicMessage::new(desc.clone());
    match desc.full_name() {
        "google.protobuf.Timestamp" => {
            msg.set_field_by_name("seconds", Value::I64(1_795_564_800 + variant as i64));
            msg.set_field_by_name("nanos", Value::I32([0, 250_000_000, 1_500][variant % 3]));
            return msg;
        }
        "google.protobuf.Duration" => {
            msg.set_field_by_name("seconds", Value::I64(2 + variant as i64));
            msg.set_field_by_name("nanos", Value::I32([0, 500_000_000, 7][variant % 3]));
            return msg;
        }
        "google.protobuf.Any" => {
            // A known message inside, expanded with `@type`.
            let inner = pool
                .get_message_by_name("build_event_stream.BuildEventId")
                .unwrap();
            let inner = filled(pool, &inner, variant, depth + 1);
            msg.set_field_by_name(
                "type_url",
                Value::String("type.googleapis.com/build_event_stream.BuildEventId".into()),
            );
            msg.set_field_by_name("value", Value::Bytes(inner.encode_to_vec().into()));
            return msg;
        }
        _ => {}
    }
    if depth > 3 {
        return msg;
    }
    let fields: Vec<FieldDescriptor> = desc.fields().collect();
    for f in &fields {
        if let Some(o) = f.containing_oneof().filter(|o| !o.is_synthetic()) {
            let members: Vec<_> = o.fields().collect();
            if members[variant % members.len()].number() != f.number() {
                continue;
            }
        }
        let value = if f.is_map() {
            let Kind::Message(entry) = f.kind() else {
                unreachable!()
            };
            let key_kind = entry.map_entry_key_field().kind();
            let value_kind = entry.map_entry_value_field().kind();
            let mut map = HashMap::new();
            for i in 0..3 {
                let key = match key_kind {
                    Kind::String => MapKey::String(format!("k{i}\"")),
                    Kind::Bool => MapKey::Bool(i % 2 == 0),
                    _ => MapKey::I32(i as i32),
                };
                map.insert(key, sample(pool, &value_kind, variant + i, depth));
            }
            Value::Map(map)
        } else if f.is_list() {
            Value::List(
                (0..2)
                    .map(|i| sample(pool, &f.kind(), variant + i, depth))
                    .collect(),
            )
        } else {
            sample(pool, &f.kind(), variant, depth)
        };
        msg.set_field(f, value);
    }
    msg
}

#[test]
fn every_message_type_encodes_as_prost_reflect_does() {
    let pool = pool();
    let mut checked = 0;
    for desc in pool.all_messages() {
        if desc.is_map_entry() || desc.package_name() == "google.protobuf" {
            continue;
        }
        let oneof_width = desc.oneofs().map(|o| o.fields().len()).max().unwrap_or(1);
        for variant in 0..oneof_width.max(3) {
            let msg = filled(&pool, &desc, variant, 0);
            let mut want = witness(&msg);
            want.as_object_mut().unwrap().insert(
                "@type".into(),
                format!("type.googleapis.com/{}", desc.full_name()).into(),
            );
            // The one field the encoder leaves out on purpose.
            if desc.full_name() == "engflow.eventstore.v1.StreamedBuildEvent" {
                want.as_object_mut().unwrap().remove("continuationToken");
            }
            let (got, problems) = ours_via_any(desc.full_name(), msg.encode_to_vec());
            assert!(problems.is_empty(), "{}: {problems:?}", desc.full_name());
            assert_eq!(got, want, "{} variant {variant}", desc.full_name());
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} messages checked");
}

#[test]
fn well_known_types_inside_any_use_the_value_form() {
    let pool = pool();
    for name in ["google.protobuf.Timestamp", "google.protobuf.Duration"] {
        let desc = pool.get_message_by_name(name).unwrap();
        let msg = filled(&pool, &desc, 1, 0);
        let (got, problems) = ours_via_any(name, msg.encode_to_vec());
        assert!(problems.is_empty());
        let mut any = DynamicMessage::new(pool.get_message_by_name("google.protobuf.Any").unwrap());
        any.set_field_by_name(
            "type_url",
            Value::String(format!("type.googleapis.com/{name}")),
        );
        any.set_field_by_name("value", Value::Bytes(msg.encode_to_vec().into()));
        assert_eq!(got, witness(&any), "{name}");
    }
}

#[test]
fn simulated_traffic_encodes_as_prost_reflect_does() {
    let pool = pool();
    let world = generate(&GenConfig {
        builds: 20,
        events_per_invocation: 30,
        ..GenConfig::default()
    });
    let lifecycle = pool
        .get_message_by_name("engflow.eventstore.v1.BuildLifecycleEventNotification")
        .unwrap();
    let streamed = pool
        .get_message_by_name("engflow.eventstore.v1.StreamedBuildEvent")
        .unwrap();
    let mut checked = 0;
    for n in &world.notifications {
        let Some(any) = &n.payload else { continue };
        let Ok(typed) = pb::es::BuildLifecycleEventNotification::decode(any.value.as_slice())
        else {
            continue; // the generator's deliberately bad payloads
        };
        let dynamic = DynamicMessage::decode(lifecycle.clone(), any.value.as_slice()).unwrap();
        assert_eq!(ours(&typed), witness(&dynamic));
        checked += 1;
    }
    for ev in world
        .invocations
        .iter()
        .flat_map(|i| &i.events)
        .chain(world.builds.iter().flat_map(|b| &b.events))
    {
        let mut stripped = ev.clone();
        stripped.continuation_token.clear();
        let dynamic =
            DynamicMessage::decode(streamed.clone(), stripped.encode_to_vec().as_slice()).unwrap();
        assert_eq!(ours(ev), witness(&dynamic));
        checked += 1;
    }
    assert!(checked > 500, "only {checked} messages checked");
}
