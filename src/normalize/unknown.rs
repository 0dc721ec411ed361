//! Fields the schema does not know, found by walking the wire format.
//!
//! prost keeps no unknown fields: a field a newer Bazel or EngFlow adds
//! would vanish from the JSON without a trace. Normalization walks each
//! message's bytes against the field table generated from `proto/`
//! (`build/wire.rs`), descending into known messages and into `Any`
//! values of known types; when it finds a field number the schema lacks,
//! the envelope carries the original bytes (see `normalize`), and the
//! caller counts and warns through [`report`].

use std::collections::HashSet;
use std::sync::Mutex;

/// How a known field is walked.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Field {
    /// A message, by its index in [`MESSAGES`].
    Message(usize),
    /// A `google.protobuf.Any`: opened when its type is known.
    Any,
    /// A scalar, string, bytes or enum: skipped.
    Other,
}

/// One message's fields, sorted by number.
#[derive(Debug)]
pub(crate) struct Schema {
    pub(crate) name: &'static str,
    /// Bit `n` set: field `n` (< 64) is known and has nothing inside to
    /// walk, the common case, told without a search.
    pub(crate) plain: u64,
    pub(crate) fields: &'static [(u32, Field)],
}

/// Every message type by full name, looked up by hash.
static BY_NAME: std::sync::LazyLock<
    std::collections::HashMap<&'static str, usize, foldhash::fast::FixedState>,
> = std::sync::LazyLock::new(|| {
    MESSAGES
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name, i))
        .collect()
});

include!(concat!(env!("OUT_DIR"), "/wire.rs"));

/// prost's own nesting limit: deeper input does not decode anyway.
const MAX_DEPTH: usize = 100;

/// A field number the schema lacks, and the message it appeared in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnknownField {
    /// The message's full name, such as `build_event_stream.TestResult`.
    pub message: &'static str,
    /// The field number.
    pub number: u32,
}

impl std::fmt::Display for UnknownField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.message, self.number)
    }
}

/// The unknown fields in `bytes`, an encoded `message` (full name), each
/// once, sorted; empty when the type is not in the schema. Bytes that do
/// not parse stop the walk there (prost reports those itself).
pub fn find(message: &str, bytes: &[u8]) -> Vec<UnknownField> {
    let mut found = Vec::new();
    if let Some(&i) = BY_NAME.get(message) {
        let _ = walk(i, bytes, 0, &mut found);
    }
    if found.len() > 1 {
        found.sort_unstable();
        found.dedup();
    }
    found
}

/// Not a well-formed message.
struct Malformed;

fn varint(buf: &mut &[u8]) -> Result<u64, Malformed> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first().ok_or(Malformed)?;
        *buf = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Ok(value);
        }
    }
    Err(Malformed)
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], Malformed> {
    if buf.len() < n {
        return Err(Malformed);
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

/// One field's number, wire type and (for length-delimited ones) bytes.
fn next<'a>(buf: &mut &'a [u8]) -> Result<(u32, Option<&'a [u8]>), Malformed> {
    let key = varint(buf)?;
    let number = u32::try_from(key >> 3).map_err(|_| Malformed)?;
    let value = match key & 7 {
        0 => {
            varint(buf)?;
            None
        }
        1 => {
            take(buf, 8)?;
            None
        }
        2 => {
            let len = usize::try_from(varint(buf)?).map_err(|_| Malformed)?;
            Some(take(buf, len)?)
        }
        5 => {
            take(buf, 4)?;
            None
        }
        // Groups are not used by any schema here.
        _ => return Err(Malformed),
    };
    Ok((number, value))
}

fn walk(
    schema: usize,
    mut buf: &[u8],
    depth: usize,
    found: &mut Vec<UnknownField>,
) -> Result<(), Malformed> {
    if depth > MAX_DEPTH {
        return Err(Malformed);
    }
    let s = &MESSAGES[schema];
    while !buf.is_empty() {
        let (number, value) = next(&mut buf)?;
        if number < 64 && s.plain & (1 << number) != 0 {
            continue;
        }
        let field = s
            .fields
            .binary_search_by_key(&number, |(n, _)| *n)
            .ok()
            .map(|i| s.fields[i].1);
        match (field, value) {
            (None, _) => found.push(UnknownField {
                message: s.name,
                number,
            }),
            (Some(Field::Message(m)), Some(bytes)) => walk(m, bytes, depth + 1, found)?,
            (Some(Field::Any), Some(bytes)) => any(bytes, depth + 1, found)?,
            // A packed scalar or a string: nothing inside to know.
            _ => {}
        }
    }
    Ok(())
}

/// An `Any`: its own fields, then its value when the type is known.
fn any(mut buf: &[u8], depth: usize, found: &mut Vec<UnknownField>) -> Result<(), Malformed> {
    let (mut type_url, mut value) = (&[][..], &[][..]);
    while !buf.is_empty() {
        match next(&mut buf)? {
            (1, Some(url)) => type_url = url,
            (2, Some(bytes)) => value = bytes,
            (number, _) => found.push(UnknownField {
                message: "google.protobuf.Any",
                number,
            }),
        }
    }
    let name = type_url.rsplit(|&b| b == b'/').next().unwrap_or_default();
    if let Some(&i) = std::str::from_utf8(name).ok().and_then(|n| BY_NAME.get(n)) {
        walk(i, value, depth, found)?;
    }
    Ok(())
}

/// `bytes` (an encoded message) without its top-level field `number`,
/// everything else as it was; bytes that do not parse are kept whole.
pub fn without_field(bytes: &[u8], number: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut buf = bytes;
    while !buf.is_empty() {
        let before = buf;
        let Ok((n, _)) = next(&mut buf) else {
            return bytes.to_vec();
        };
        if n != number {
            out.extend_from_slice(&before[..before.len() - buf.len()]);
        }
    }
    out
}

/// Message types already warned about, so each is warned about once.
static WARNED: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);

/// Counts the unknown fields of one envelope in `/metrics` (by message
/// type) and warns once per message type for the process's lifetime.
pub fn report(envelope: &str, fields: &[UnknownField]) {
    let mut types: Vec<&'static str> = fields.iter().map(|f| f.message).collect();
    types.dedup();
    for message in types {
        metrics::counter!(crate::metric_names::UNKNOWN_FIELDS, "message" => message).increment(1);
        let first = WARNED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(HashSet::new)
            .insert(message);
        if first {
            let numbers: Vec<String> = fields
                .iter()
                .filter(|f| f.message == message)
                .map(|f| f.number.to_string())
                .collect();
            tracing::warn!(
                %envelope,
                message,
                fields = %numbers.join(","),
                "fields this build's schema does not know; the envelope carries the original \
                 bytes (attribute unknown_fields, payload member original); warned once per type"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_sorted_and_closed() {
        assert!(MESSAGES.windows(2).all(|w| w[0].name < w[1].name));
        for s in MESSAGES {
            assert!(s.fields.windows(2).all(|w| w[0].0 < w[1].0), "{}", s.name);
            for (_, f) in s.fields {
                if let Field::Message(i) = f {
                    assert!(*i < MESSAGES.len());
                }
            }
        }
        assert!(BY_NAME.contains_key("build_event_stream.BuildEvent"));
        for (i, s) in MESSAGES.iter().enumerate() {
            assert_eq!(BY_NAME[s.name], i);
            for (n, f) in s.fields {
                let plain = *n < 64 && s.plain & (1 << n) != 0;
                assert_eq!(
                    plain,
                    *n < 64 && matches!(f, Field::Other),
                    "{}#{n}",
                    s.name
                );
            }
        }
    }

    #[test]
    fn the_only_any_in_bazels_schema_is_the_one_normalization_checks() {
        // `bep::holds_any` knows of ActionExecuted.strategy_details alone;
        // a schema update adding another must extend it.
        let bazel = [
            "build_event_stream.",
            "command_line.",
            "failure_details.",
            "options.",
            "blaze.",
            "devtools.",
        ];
        let anys: Vec<String> = MESSAGES
            .iter()
            .filter(|m| bazel.iter().any(|p| m.name.starts_with(p)))
            .flat_map(|m| {
                m.fields
                    .iter()
                    .filter(|(_, f)| matches!(f, Field::Any))
                    .map(move |(n, _)| format!("{}#{n}", m.name))
            })
            .collect();
        assert_eq!(anys, ["build_event_stream.ActionExecuted#14"]);
    }

    #[test]
    fn a_field_is_taken_out_and_the_rest_kept() {
        // 1: varint 1; 2: "ab"; 3: varint 150; 2 again.
        let bytes = [
            0x08, 0x01, 0x12, 0x02, b'a', b'b', 0x18, 0x96, 0x01, 0x12, 0x00,
        ];
        assert_eq!(without_field(&bytes, 2), [0x08, 0x01, 0x18, 0x96, 0x01]);
        assert_eq!(without_field(&bytes, 9), bytes);
        assert_eq!(
            without_field(&[0x12, 0x05], 1),
            [0x12, 0x05],
            "malformed: kept whole"
        );
    }

    #[test]
    fn malformed_bytes_stop_the_walk_without_panicking() {
        for bytes in [&[0x0a, 0x05, 1][..], &[0xff; 11], &[0x0b], &[0x08]] {
            assert!(find("build_event_stream.BuildEvent", bytes).len() <= 1);
        }
        assert!(find("no.such.Type", &[0xf8, 0x07, 1]).is_empty());
    }
}
