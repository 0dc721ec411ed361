//! Generates `ProtoJson` impls: canonical proto3 JSON for every message of
//! `proto/`, written straight from the prost structs (no reflection), plus
//! the `Any` registry that decodes a known type URL into its struct.
//!
//! Names follow prost-build's rules (heck snake/camel case, raw
//! identifiers for keywords); a mismatch is a compile error in the
//! generated code, never a silent difference.

use std::fmt::Write as _;

use heck::{ToSnakeCase, ToUpperCamelCase};
use prost_reflect::{
    DescriptorPool, EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor, OneofDescriptor,
};

/// Fields that are transport state, not content: never written.
const SKIPPED: &[&str] = &["engflow.eventstore.v1.StreamedBuildEvent.continuation_token"];

/// Well-known types written in their special JSON form.
const TIMESTAMP: &str = "google.protobuf.Timestamp";
const DURATION: &str = "google.protobuf.Duration";
const ANY: &str = "google.protobuf.Any";

fn sanitize(ident: String) -> String {
    match ident.as_str() {
        "as" | "break" | "const" | "continue" | "else" | "enum" | "false" | "fn" | "for" | "if"
        | "impl" | "in" | "let" | "loop" | "match" | "mod" | "move" | "mut" | "pub" | "ref"
        | "return" | "static" | "struct" | "trait" | "true" | "type" | "unsafe" | "use"
        | "where" | "while" | "dyn" | "abstract" | "become" | "box" | "do" | "final" | "macro"
        | "override" | "priv" | "typeof" | "unsized" | "virtual" | "yield" | "async" | "await"
        | "try" | "gen" => format!("r#{ident}"),
        "_" | "super" | "self" | "Self" | "extern" | "crate" => format!("{ident}_"),
        s if s.starts_with(|c: char| c.is_numeric()) => format!("_{ident}"),
        _ => ident,
    }
}

fn snake(s: &str) -> String {
    sanitize(s.to_snake_case())
}

fn camel(s: &str) -> String {
    sanitize(s.to_upper_camel_case())
}

/// Rust path of a message or enum: package modules, then one snake-case
/// module per enclosing message, then the type.
fn rust_path(package: &str, parent: Option<MessageDescriptor>, name: &str) -> String {
    let mut mods = Vec::new();
    let mut p = parent;
    while let Some(m) = p {
        mods.push(snake(m.name()));
        p = m.parent_message();
    }
    mods.reverse();
    let mut path = String::from("crate::pb");
    for part in package.split('.').filter(|s| !s.is_empty()) {
        path.push_str("::");
        path.push_str(part);
    }
    for m in mods {
        path.push_str("::");
        path.push_str(&m);
    }
    path.push_str("::");
    path.push_str(&camel(name));
    path
}

fn message_path(m: &MessageDescriptor) -> String {
    match m.full_name() {
        TIMESTAMP => "::prost_types::Timestamp".into(),
        DURATION => "::prost_types::Duration".into(),
        ANY => "::prost_types::Any".into(),
        _ => rust_path(m.package_name(), m.parent_message(), m.name()),
    }
}

fn enum_path(e: &EnumDescriptor) -> String {
    rust_path(e.package_name(), e.parent_message(), e.name())
}

fn is_real_oneof(o: &OneofDescriptor) -> bool {
    !o.is_synthetic()
}

/// Code writing the value `v` (a reference) of a field of kind `kind`.
fn write_value(kind: &Kind, field: &str) -> String {
    match kind {
        Kind::String => "w.str(v);".into(),
        Kind::Bytes => "w.bytes(v);".into(),
        Kind::Bool => "w.bool(*v);".into(),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => "w.i32(*v);".into(),
        Kind::Uint32 | Kind::Fixed32 => "w.u32(*v);".into(),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => "w.i64(*v);".into(),
        Kind::Uint64 | Kind::Fixed64 => "w.u64(*v);".into(),
        Kind::Float => "w.f32(*v);".into(),
        Kind::Double => "w.f64(*v);".into(),
        Kind::Enum(e) => format!(
            "w.enumeration(*v, {}::try_from(*v).ok().map(|e| e.as_str_name()));",
            enum_path(e)
        ),
        Kind::Message(m) => match m.full_name() {
            TIMESTAMP => "w.timestamp(v);".into(),
            DURATION => "w.duration(v);".into(),
            ANY => "w.any(v);".into(),
            // prost maps the wrappers onto the plain Rust type, and their
            // JSON is the wrapped value's.
            "google.protobuf.BoolValue" => "w.bool(*v);".into(),
            "google.protobuf.Int32Value" => "w.i32(*v);".into(),
            "google.protobuf.UInt32Value" => "w.u32(*v);".into(),
            "google.protobuf.Int64Value" => "w.i64(*v);".into(),
            "google.protobuf.UInt64Value" => "w.u64(*v);".into(),
            "google.protobuf.FloatValue" => "w.f32(*v);".into(),
            "google.protobuf.DoubleValue" => "w.f64(*v);".into(),
            "google.protobuf.StringValue" => "w.str(v);".into(),
            "google.protobuf.BytesValue" => "w.bytes(v);".into(),
            "google.protobuf.Empty" => "w.begin_object(); w.end_object();".into(),
            other if other.starts_with("google.protobuf.") => panic!(
                "{field}: JSON for `{other}` is not generated (build/json.rs handles \
                 Timestamp, Duration, Any, the wrappers and Empty)"
            ),
            _ => "v.write_json(w);".into(),
        },
    }
}

/// The condition under which a singular proto3 scalar `v` (a reference)
/// is written: it is not the default.
fn not_default(kind: &Kind) -> &'static str {
    match kind {
        Kind::String | Kind::Bytes => "!v.is_empty()",
        Kind::Bool => "*v",
        Kind::Float | Kind::Double => "*v != 0.0",
        _ => "*v != 0",
    }
}

fn map_key(kind: &Kind) -> &'static str {
    match kind {
        Kind::String => "w.key_str(k);",
        Kind::Bool => "w.key_display(k);",
        _ => "w.key_display(k);",
    }
}

fn field_code(f: &FieldDescriptor, out: &mut String) {
    let name = format!("{}.{}", f.parent_message().full_name(), f.name());
    let rust = format!("self.{}", snake(f.name()));
    let json = f.json_name();
    let kind = f.kind();
    if f.is_map() {
        let Kind::Message(entry) = &kind else {
            unreachable!("map fields are entry messages")
        };
        let key = entry.map_entry_key_field().kind();
        let value = entry.map_entry_value_field().kind();
        writeln!(
            out,
            "        if !{rust}.is_empty() {{ w.key({json:?}); w.begin_object(); \
             let mut entries: Vec<_> = {rust}.iter().collect(); entries.sort_by(|a, b| a.0.cmp(b.0)); \
             for (k, v) in entries {{ {} {} }} w.end_object(); }}",
            map_key(&key),
            write_value(&value, &name)
        )
        .unwrap();
    } else if f.is_list() {
        writeln!(
            out,
            "        if !{rust}.is_empty() {{ w.key({json:?}); w.begin_array(); \
             for v in &{rust} {{ w.elem(); {} }} w.end_array(); }}",
            write_value(&kind, &name)
        )
        .unwrap();
    } else if matches!(kind, Kind::Message(_)) || f.supports_presence() {
        writeln!(
            out,
            "        if let Some(v) = &{rust} {{ w.key({json:?}); {} }}",
            write_value(&kind, &name)
        )
        .unwrap();
    } else {
        writeln!(
            out,
            "        {{ let v = &{rust}; if {} {{ w.key({json:?}); {} }} }}",
            not_default(&kind),
            write_value(&kind, &name)
        )
        .unwrap();
    }
}

fn oneof_code(m: &MessageDescriptor, o: &OneofDescriptor, out: &mut String) {
    let enum_path = format!(
        "{}::{}",
        rust_path(m.package_name(), Some(m.clone()), "").trim_end_matches("::"),
        camel(o.name())
    );
    writeln!(out, "        match &self.{} {{", snake(o.name())).unwrap();
    for f in o.fields() {
        if SKIPPED.contains(&f.full_name()) {
            writeln!(
                out,
                "            Some({enum_path}::{}(_)) => {{}}",
                camel(f.name())
            )
            .unwrap();
            continue;
        }
        writeln!(
            out,
            "            Some({enum_path}::{}(v)) => {{ w.key({:?}); {} }}",
            camel(f.name()),
            f.json_name(),
            write_value(&f.kind(), f.full_name())
        )
        .unwrap();
    }
    writeln!(out, "            None => {{}}\n        }}").unwrap();
}

/// The generated Rust source.
pub fn generate(pool: &DescriptorPool) -> String {
    let mut out = String::from("// @generated by build/json.rs from proto/. Do not edit.\n\n");
    let mut registry = Vec::new();
    for m in pool.all_messages() {
        if m.is_map_entry() || m.package_name() == "google.protobuf" {
            continue;
        }
        let path = message_path(&m);
        registry.push((m.full_name().to_string(), path.clone()));
        writeln!(out, "impl ProtoJson for {path} {{").unwrap();
        writeln!(
            out,
            "    #[allow(unused_variables, deprecated)]\n    fn write_members(&self, w: &mut JsonWriter) {{"
        )
        .unwrap();
        for f in m.fields() {
            if SKIPPED.contains(&f.full_name()) {
                continue;
            }
            if f.containing_oneof().is_some_and(|o| is_real_oneof(&o)) {
                continue;
            }
            field_code(&f, &mut out);
        }
        for o in m.oneofs().filter(is_real_oneof) {
            oneof_code(&m, &o, &mut out);
        }
        writeln!(out, "    }}\n}}\n").unwrap();
    }
    out.push_str(
        "/// Every known message by full name: decodes an `Any`'s bytes as that\n\
         /// message and writes it with `@type`.\n\
         static KNOWN_ANY: ::std::sync::LazyLock<::std::collections::HashMap<&'static str, AnyWriter>> =\n\
         \x20   ::std::sync::LazyLock::new(|| ::std::collections::HashMap::from([\n",
    );
    for (name, path) in &registry {
        writeln!(
            out,
            "        ({name:?}, JsonWriter::typed_any::<{path}> as AnyWriter),"
        )
        .unwrap();
    }
    writeln!(
        out,
        "        ({TIMESTAMP:?}, timestamp_any as AnyWriter),\n\
         \x20       ({DURATION:?}, duration_any as AnyWriter),\n    ]));"
    )
    .unwrap();
    out
}
