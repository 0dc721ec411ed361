//! Canonical proto3 JSON written straight from the prost structs.
//!
//! `build/json.rs` generates a [`ProtoJson`] impl per message of `proto/`
//! and the `Any` registry; this module is the writer they call. Output is
//! what `prost-reflect` (the reflective encoder this replaced, still the
//! witness in `tests/json.rs`) writes: lowerCamelCase names, defaults
//! left out, 64-bit integers as strings, enums by name, bytes in base64,
//! `Any` expanded with `@type`. It is an order of magnitude cheaper
//! because nothing is decoded twice and nothing goes through reflection.
//!
//! An `Any` whose type is unknown, whose bytes do not decode, or that is
//! nested too deep is written as an `evbridge.v1.RawAny` holding the
//! original type URL and bytes plus the reason, and the reason is kept in
//! [`JsonWriter::problems`] for the caller to log: nothing is dropped and
//! the writer never fails.

use std::fmt::Write as _;

use base64::Engine as _;
use base64::prelude::BASE64_STANDARD;
use evbridge_sinks::push_json_str;

/// How many `Any` values deep expansion goes before leaving the rest raw.
pub const MAX_ANY_DEPTH: usize = 16;
/// Type URL of the stand-in for an `Any` that could not be expanded.
pub const RAW_ANY_TYPE_URL: &str = "type.googleapis.com/evbridge.v1.RawAny";

/// A message that can write itself as proto3 JSON.
pub trait ProtoJson {
    /// Writes the message's members, without the braces, so an `Any` can
    /// put `@type` first and a caller can append members of its own.
    fn write_members(&self, w: &mut JsonWriter);

    /// Writes the message as a JSON object.
    fn write_json(&self, w: &mut JsonWriter) {
        w.begin_object();
        self.write_members(w);
        w.end_object();
    }
}

/// A JSON text under construction plus what was left raw on the way.
#[derive(Debug, Default)]
pub struct JsonWriter {
    out: String,
    /// No member or element written yet in the innermost container.
    first: bool,
    depth: usize,
    problems: Vec<String>,
    /// A timestamp already written into `out`, at this range: an event's
    /// time is both the envelope's and its payload's.
    known_time: Option<(prost_types::Timestamp, std::ops::Range<usize>)>,
}

impl JsonWriter {
    /// A writer whose buffer starts with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        JsonWriter {
            out: String::with_capacity(capacity),
            ..Self::default()
        }
    }

    /// A writer appending to `out` (taken over; [`Self::finish`] gives it
    /// back), so a payload can be written straight into an envelope.
    pub fn over(out: String) -> Self {
        JsonWriter {
            out,
            ..Self::default()
        }
    }

    /// The JSON text and the reasons parts were left raw.
    pub fn finish(self) -> (String, Vec<String>) {
        (self.out, self.problems)
    }

    /// Reasons parts were left raw so far.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    /// Opens an object.
    pub fn begin_object(&mut self) {
        self.out.push('{');
        self.first = true;
    }

    /// Closes an object.
    pub fn end_object(&mut self) {
        self.out.push('}');
        self.first = false;
    }

    /// Opens an array.
    pub fn begin_array(&mut self) {
        self.out.push('[');
        self.first = true;
    }

    /// Closes an array.
    pub fn end_array(&mut self) {
        self.out.push(']');
        self.first = false;
    }

    fn comma(&mut self) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
    }

    /// Starts an array element.
    pub fn elem(&mut self) {
        self.comma();
    }

    /// Starts a member whose name needs no escaping (a proto JSON name).
    pub fn key(&mut self, name: &str) {
        self.comma();
        self.out.push('"');
        self.out.push_str(name);
        self.out.push_str("\":");
    }

    /// Starts a member whose name is data (a map key).
    pub fn key_str(&mut self, name: &str) {
        self.comma();
        self.str(name);
        self.out.push(':');
    }

    /// Starts a member named by a number or bool map key.
    pub fn key_display(&mut self, name: impl std::fmt::Display) {
        self.comma();
        let _ = write!(self.out, "\"{name}\":");
    }

    /// A JSON string, escaped as serde_json escapes it.
    pub fn str(&mut self, s: &str) {
        push_json_str(&mut self.out, s);
    }

    /// Members rendered earlier (`"a":1,"b":2`, possibly none), as if
    /// each had been written here.
    pub fn members(&mut self, json: &str) {
        if !json.is_empty() {
            self.comma();
            self.out.push_str(json);
        }
    }

    /// Text that is already valid JSON (a serde_json value's output).
    pub fn raw(&mut self, json: &str) {
        self.out.push_str(json);
    }

    /// Bytes as base64 with padding.
    pub fn bytes(&mut self, b: &[u8]) {
        self.out.push('"');
        BASE64_STANDARD.encode_string(b, &mut self.out);
        self.out.push('"');
    }

    /// A JSON boolean.
    pub fn bool(&mut self, b: bool) {
        self.out.push_str(if b { "true" } else { "false" });
    }

    /// 32-bit integers are JSON numbers.
    pub fn i32(&mut self, v: i32) {
        self.out.push_str(itoa::Buffer::new().format(v));
    }

    /// 32-bit integers are JSON numbers.
    pub fn u32(&mut self, v: u32) {
        self.out.push_str(itoa::Buffer::new().format(v));
    }

    /// 64-bit integers are strings in proto3 JSON.
    pub fn i64(&mut self, v: i64) {
        self.out.push('"');
        self.out.push_str(itoa::Buffer::new().format(v));
        self.out.push('"');
    }

    /// 64-bit integers are strings in proto3 JSON.
    pub fn u64(&mut self, v: u64) {
        self.out.push('"');
        self.out.push_str(itoa::Buffer::new().format(v));
        self.out.push('"');
    }

    /// Shortest round-trip form; NaN and infinities as strings.
    pub fn f32(&mut self, v: f32) {
        if v.is_finite() {
            self.out.push_str(ryu::Buffer::new().format_finite(v));
        } else {
            self.non_finite(v.is_nan(), v > 0.0);
        }
    }

    /// Shortest round-trip form; NaN and infinities as strings.
    pub fn f64(&mut self, v: f64) {
        if v.is_finite() {
            self.out.push_str(ryu::Buffer::new().format_finite(v));
        } else {
            self.non_finite(v.is_nan(), v > 0.0);
        }
    }

    fn non_finite(&mut self, nan: bool, positive: bool) {
        self.out.push_str(match (nan, positive) {
            (true, _) => "\"NaN\"",
            (false, true) => "\"Infinity\"",
            (false, false) => "\"-Infinity\"",
        });
    }

    /// An enum value by name, or by number when this build does not know it.
    pub fn enumeration(&mut self, number: i32, name: Option<&str>) {
        match name {
            Some(name) => {
                self.out.push('"');
                self.out.push_str(name);
                self.out.push('"');
            }
            None => self.i32(number),
        }
    }

    /// RFC 3339 UTC with 0, 3, 6 or 9 fractional digits.
    pub fn timestamp(&mut self, t: &prost_types::Timestamp) {
        self.out.push('"');
        match &self.known_time {
            Some((known, at)) if known == t && at.len() <= 32 => {
                // Copied rather than formatted again.
                let mut buf = [0u8; 32];
                let text = &mut buf[..at.len()];
                text.copy_from_slice(&self.out.as_bytes()[at.clone()]);
                self.out
                    .push_str(std::str::from_utf8(text).unwrap_or_default());
            }
            _ => push_timestamp(&mut self.out, t),
        }
        self.out.push('"');
    }

    /// Says that `t` was written at `at` in the text so far (as
    /// [`push_timestamp`] writes it), so [`Self::timestamp`] copies it.
    pub fn known_timestamp(&mut self, t: prost_types::Timestamp, at: std::ops::Range<usize>) {
        debug_assert!({
            let mut expected = String::new();
            push_timestamp(&mut expected, &t);
            self.out.get(at.clone()) == Some(expected.as_str())
        });
        self.known_time = Some((t, at));
    }

    /// Seconds with an `s` suffix, such as `1.5s`.
    pub fn duration(&mut self, d: &prost_types::Duration) {
        let _ = write!(self.out, "\"{d}\"");
    }

    /// An `Any`: expanded when its type is known and its bytes decode,
    /// otherwise a `RawAny` with the reason.
    pub fn any(&mut self, any: &prost_types::Any) {
        let url = any.type_url.as_str();
        let name = url.rsplit('/').next().unwrap_or_default();
        let problem = if self.depth >= MAX_ANY_DEPTH {
            format!("`Any` nested deeper than {MAX_ANY_DEPTH} levels left raw")
        } else {
            self.depth += 1;
            let written = KNOWN_ANY
                .get(name)
                .map(|write| write(self, url, &any.value));
            self.depth -= 1;
            match written {
                Some(Ok(())) => return,
                Some(Err(e)) => format!("`{url}` does not decode ({e}); left raw"),
                None => format!("unknown type `{url}` left raw"),
            }
        };
        self.begin_object();
        self.key("@type");
        self.str(RAW_ANY_TYPE_URL);
        self.raw_any_members(url, &any.value, &problem);
        self.end_object();
        self.problems.push(problem);
    }

    /// An `Any` already decoded by the caller, written as [`Self::any`]
    /// writes a known one (`@type` first, one level deeper).
    pub fn decoded_any(&mut self, type_url: &str, msg: &dyn ProtoJson) {
        self.depth += 1;
        self.begin_object();
        self.key("@type");
        self.str(type_url);
        msg.write_members(self);
        self.end_object();
        self.depth -= 1;
    }

    /// The members of an `evbridge.v1.RawAny`.
    pub fn raw_any_members(&mut self, type_url: &str, value: &[u8], error: &str) {
        if !type_url.is_empty() {
            self.key("typeUrl");
            self.str(type_url);
        }
        if !value.is_empty() {
            self.key("value");
            self.bytes(value);
        }
        if !error.is_empty() {
            self.key("error");
            self.str(error);
        }
    }

    /// Decodes a known message from an `Any` and writes it with `@type`;
    /// nothing is written when it does not decode.
    fn typed_any<T>(&mut self, type_url: &str, value: &[u8]) -> Result<(), prost::DecodeError>
    where
        T: prost::Message + Default + ProtoJson,
    {
        let msg = T::decode(value)?;
        self.begin_object();
        self.key("@type");
        self.str(type_url);
        msg.write_members(self);
        self.end_object();
        Ok(())
    }

    /// A well-known type inside an `Any`: `{"@type": …, "value": …}`.
    fn wkt_any<T>(
        &mut self,
        type_url: &str,
        value: &[u8],
        write: fn(&mut Self, &T),
    ) -> Result<(), prost::DecodeError>
    where
        T: prost::Message + Default,
    {
        let msg = T::decode(value)?;
        self.begin_object();
        self.key("@type");
        self.str(type_url);
        self.key("value");
        write(self, &msg);
        self.end_object();
        Ok(())
    }
}

/// Writes a known message found in an `Any` (see `KNOWN_ANY`).
type AnyWriter = fn(&mut JsonWriter, &str, &[u8]) -> Result<(), prost::DecodeError>;

fn timestamp_any(w: &mut JsonWriter, url: &str, value: &[u8]) -> Result<(), prost::DecodeError> {
    w.wkt_any(url, value, JsonWriter::timestamp)
}

fn duration_any(w: &mut JsonWriter, url: &str, value: &[u8]) -> Result<(), prost::DecodeError> {
    w.wkt_any(url, value, JsonWriter::duration)
}

include!(concat!(env!("OUT_DIR"), "/json.rs"));

/// Appends a timestamp in RFC 3339 UTC with 0, 3, 6 or 9 fractional
/// digits: exactly what `prost_types::Timestamp`'s `Display` writes,
/// without going through `fmt` for the usual years 0001–9999.
pub fn push_timestamp(out: &mut String, t: &prost_types::Timestamp) {
    let fast = u32::try_from(t.nanos)
        .is_ok_and(|nanos| evbridge_sinks::push_rfc3339(out, t.seconds, nanos));
    if !fast {
        let _ = write!(out, "{t}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_written_as_prost_types_displays_them() {
        let mut rng = fastrand::Rng::with_seed(3);
        let edges = [
            (0, 0),
            (-1, 999_999_999),
            (-62_135_596_800, 0),
            (-62_135_596_801, 5),
            (253_402_300_799, 999_000_000),
            (253_402_300_800, 0),
            (951_782_400, 1_000), // 2000-02-29
            (4_107_542_400, 120), // 2100-03-01
            (1_795_564_800, 250_000_000),
            (5, -3),
            (5, 1_000_000_000),
            (i64::MIN, 0),
        ];
        let random = (0..20_000).map(|_| {
            (
                rng.i64(-70_000_000_000..260_000_000_000),
                [
                    0,
                    rng.i32(0..1_000) * 1_000_000,
                    rng.i32(0..1_000_000) * 1_000,
                    rng.i32(0..1_000_000_000),
                ][rng.usize(0..4)],
            )
        });
        for (seconds, nanos) in edges.into_iter().chain(random) {
            let t = prost_types::Timestamp { seconds, nanos };
            let mut out = String::new();
            push_timestamp(&mut out, &t);
            assert_eq!(out, t.to_string(), "{seconds} {nanos}");
        }
    }

    #[test]
    fn numbers_are_written_like_serde_json() {
        let mut w = JsonWriter::default();
        w.begin_array();
        for v in [0.0, 1.0, -2.5, 1e20, 1.5e-7, f64::MAX] {
            w.elem();
            w.f64(v);
        }
        w.elem();
        w.f32(0.1);
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            w.elem();
            w.f64(v);
        }
        w.elem();
        w.i64(i64::MIN);
        w.elem();
        w.u64(u64::MAX);
        w.elem();
        w.i32(-7);
        w.elem();
        w.u32(u32::MAX);
        w.end_array();
        let (text, _) = w.finish();
        assert_eq!(
            text,
            "[0.0,1.0,-2.5,1e20,1.5e-7,1.7976931348623157e308,0.1,\"NaN\",\"Infinity\",\
             \"-Infinity\",\"-9223372036854775808\",\"18446744073709551615\",-7,4294967295]"
        );
    }
}
