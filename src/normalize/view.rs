//! A lifecycle notification's payload decoded in place.
//!
//! prost decodes every string into a `String` of its own. A lifecycle
//! payload is a few ids and half a dozen keywords, and allocating,
//! copying and UTF-8-checking those was a sixth of the cost of
//! normalizing it (BENCHMARKS.md, `cargo bench --bench normalize`). [`LifecycleView`] borrows them from the payload
//! instead, and leaves the keywords unchecked: a set seen before (the
//! usual case) was checked then. The nested messages (auth context and
//! kind) are still merged by prost's generated code, field by field as
//! prost's own decoder does. Whatever this does not accept, the caller
//! gives to prost's decoder, so errors and their texts are prost's.
//!
//! It walks the wire format with `prost::encoding`, the functions prost's
//! generated code calls (public, though not meant for direct use): the
//! parity tests below would catch a change in a prost release.

use prost::Message as _;
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};

use crate::pb::engflow::auth::AuthContext;
use crate::pb::es::BuildLifecycleEventNotification;
use crate::pb::es::build_lifecycle_event_notification::Kind;

/// A `BuildLifecycleEventNotification` whose strings borrow its encoding.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct LifecycleView<'a> {
    /// Field 1.
    pub instance_name: &'a str,
    /// Field 2.
    pub build_id: &'a str,
    /// Field 3 (decoded by prost).
    pub auth_context: Option<AuthContext>,
    /// Field 4, each not yet checked to be UTF-8.
    pub keywords: Vec<&'a [u8]>,
    /// Fields 100–103 (decoded by prost).
    pub kind: Option<Kind>,
    /// The encoding may hold fields the schema does not know: one was
    /// skipped here, or a part prost decoded re-encodes shorter than it
    /// arrived (prost drops what it does not know). Only then does
    /// normalization walk the bytes to name them.
    pub maybe_unknown: bool,
}

impl<'a> LifecycleView<'a> {
    /// Decodes `buf` as prost would, or gives `None` for anything prost
    /// alone should judge (malformed input, a string that is not UTF-8).
    pub(crate) fn decode(mut buf: &'a [u8]) -> Option<Self> {
        let mut view = LifecycleView {
            keywords: Vec::with_capacity(8),
            ..LifecycleView::default()
        };
        let ctx = DecodeContext::default();
        while !buf.is_empty() {
            let (tag, wire_type) = decode_key(&mut buf).ok()?;
            match tag {
                1 | 2 | 4 => {
                    if wire_type != WireType::LengthDelimited {
                        return None;
                    }
                    let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
                    if len > buf.len() {
                        return None;
                    }
                    let (bytes, rest) = buf.split_at(len);
                    buf = rest;
                    match tag {
                        1 => view.instance_name = std::str::from_utf8(bytes).ok()?,
                        2 => view.build_id = std::str::from_utf8(bytes).ok()?,
                        _ => view.keywords.push(bytes),
                    }
                }
                3 => {
                    let before = buf.len();
                    let auth = view.auth_context.get_or_insert_default();
                    prost::encoding::message::merge(wire_type, auth, &mut buf, ctx.clone()).ok()?;
                    let len = auth.encoded_len();
                    view.maybe_unknown |=
                        before - buf.len() != prost::encoding::encoded_len_varint(len as u64) + len;
                }
                100..=103 => {
                    let before = buf.len();
                    Kind::merge(&mut view.kind, tag, wire_type, &mut buf, ctx.clone()).ok()?;
                    let len = view.kind.as_ref().map_or(0, Kind::encoded_len);
                    view.maybe_unknown |= before - buf.len() + prost::encoding::key_len(tag) != len;
                }
                _ => {
                    skip_field(wire_type, tag, &mut buf, ctx.clone()).ok()?;
                    view.maybe_unknown = true;
                }
            }
        }
        Some(view)
    }

    /// A view of a message prost decoded.
    pub(crate) fn of(l: &'a BuildLifecycleEventNotification) -> Self {
        LifecycleView {
            instance_name: &l.instance_name,
            build_id: &l.build_id,
            auth_context: l.auth_context.clone(),
            keywords: l.keywords.iter().map(|k| k.as_bytes()).collect(),
            kind: l.kind.clone(),
            // Not known without the bytes: the caller walks them.
            maybe_unknown: true,
        }
    }

    /// The message prost would have decoded, or `None` when a keyword is
    /// not UTF-8 (where prost fails).
    pub(crate) fn to_message(&self) -> Option<BuildLifecycleEventNotification> {
        Some(BuildLifecycleEventNotification {
            instance_name: self.instance_name.to_owned(),
            build_id: self.build_id.to_owned(),
            auth_context: self.auth_context.clone(),
            keywords: self
                .keywords
                .iter()
                .map(|k| std::str::from_utf8(k).ok().map(str::to_owned))
                .collect::<Option<_>>()?,
            kind: self.kind.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::engflow::iam::v1::User;
    use crate::pb::es::build_lifecycle_event_notification::{
        InvocationFinished, InvocationStarted,
    };

    fn sample(i: u32) -> BuildLifecycleEventNotification {
        BuildLifecycleEventNotification {
            instance_name: if i.is_multiple_of(3) {
                String::new()
            } else {
                format!("inst-{i}")
            },
            build_id: format!("ns/{i:08x}-0000-4000-8000-000000000000"),
            auth_context: i.is_multiple_of(2).then(|| AuthContext {
                user: Some(User {
                    principal: format!("user{i}@example.com"),
                    role: vec!["admin".into(), "ci".into()],
                    profile_picture_url: i.is_multiple_of(4).then(|| "https://x/y.png".into()),
                }),
            }),
            keywords: (0..i % 7)
                .map(|k| format!("user_keyword=engflow:K{k}=é{i}"))
                .chain(Some("command_name=test".into()))
                .collect(),
            kind: match i % 5 {
                0 => None,
                1 => Some(Kind::BuildStarted(Default::default())),
                2 => Some(Kind::BuildFinished(Default::default())),
                3 => Some(Kind::InvocationStarted(InvocationStarted {
                    invocation_id: format!("inv-{i}"),
                })),
                _ => Some(Kind::InvocationFinished(InvocationFinished {
                    invocation_id: format!("inv-{i}"),
                })),
            },
        }
    }

    /// Asserts the view and prost agree on `buf`: both accept it with the
    /// same fields, or prost rejects it and the view does not give it.
    fn agree(buf: &[u8]) -> bool {
        let by_prost = BuildLifecycleEventNotification::decode(buf).ok();
        let by_view = LifecycleView::decode(buf).and_then(|v| v.to_message());
        assert_eq!(by_view, by_prost, "input {buf:02x?}");
        by_prost.is_some()
    }

    #[test]
    fn decodes_what_prost_decodes() {
        for i in 0..40 {
            let m = sample(i);
            let bytes = m.encode_to_vec();
            assert!(agree(&bytes));
            let view = LifecycleView::decode(&bytes).expect("decodes");
            assert_eq!(view.keywords.len(), m.keywords.len());
            assert!(!view.maybe_unknown);
            let of = LifecycleView::of(&m);
            assert!(of.maybe_unknown, "without the bytes, the caller walks them");
            assert_eq!(
                LifecycleView {
                    maybe_unknown: false,
                    ..of
                },
                view
            );
        }
    }

    #[test]
    fn repeated_and_unknown_fields_are_merged_as_prost_merges_them() {
        // Two messages back to back: the strings and the kind of the
        // second win (a different kind replaces), keywords and the auth
        // context accumulate; unknown fields of every wire type are skipped.
        let (a, b) = (sample(8), sample(3));
        let mut bytes = a.encode_to_vec();
        bytes.extend(b.encode_to_vec());
        bytes.extend([0x28, 0x07]); // field 5, varint
        bytes.extend([0x35, 1, 2, 3, 4]); // field 6, 32-bit
        bytes.extend([0x3a, 2, b'h', b'i']); // field 7, bytes
        bytes.extend([0x43, 0x08, 0x01, 0x44]); // field 8, a group
        bytes.extend(sample(4).encode_to_vec()); // same kind again: merged
        assert!(agree(&bytes));
    }

    #[test]
    fn malformed_input_is_left_to_prost() {
        let bytes = sample(4).encode_to_vec();
        // Every truncation, and a wrong wire type for each string field.
        for end in 0..bytes.len() {
            agree(&bytes[..end]);
        }
        for wrong in [[0x08, 0x01], [0x10, 0x01], [0x20, 0x01]] {
            assert!(!agree(&wrong));
        }
        // Keywords, instance and build id that are not UTF-8.
        for field in [0x0a, 0x12, 0x22] {
            assert!(!agree(&[field, 2, 0xc3, 0x28]));
        }
        assert!(LifecycleView::decode(&[0x22, 2, 0xc3, 0x28]).is_some());
    }

    #[test]
    fn random_corruptions_are_judged_as_prost_judges_them() {
        let mut rng = fastrand::Rng::with_seed(8);
        let mut accepted = 0;
        for round in 0..20_000 {
            let mut bytes = sample(round % 40).encode_to_vec();
            for _ in 0..rng.usize(1..4) {
                let at = rng.usize(..bytes.len());
                match rng.u8(..3) {
                    0 => bytes[at] = rng.u8(..),
                    1 => bytes[at] ^= 1 << rng.u8(..8),
                    _ => {
                        bytes.remove(at);
                    }
                }
                if bytes.is_empty() {
                    break;
                }
            }
            accepted += usize::from(agree(&bytes));
        }
        // Both outcomes were exercised.
        assert!((1_000..19_000).contains(&accepted), "{accepted} accepted");
    }

    #[test]
    fn fields_prost_would_drop_are_suspected_at_both_levels() {
        for i in 0..40 {
            let m = sample(i);
            let clean = m.encode_to_vec();
            assert!(!LifecycleView::decode(&clean).unwrap().maybe_unknown, "{i}");
            // An unknown field at the top level.
            let mut top = clean.clone();
            top.extend([0xf8, 0x07, 1]);
            assert!(LifecycleView::decode(&top).unwrap().maybe_unknown, "{i}");
            // Inside the auth context (field 3): prost drops it there.
            if let Some(auth) = &m.auth_context {
                let mut inner = auth.encode_to_vec();
                inner.extend([0xf8, 0x07, 1]);
                let mut nested = BuildLifecycleEventNotification {
                    auth_context: None,
                    ..m.clone()
                }
                .encode_to_vec();
                prost::encoding::encode_key(3, WireType::LengthDelimited, &mut nested);
                prost::encoding::encode_varint(inner.len() as u64, &mut nested);
                nested.extend(inner);
                assert!(LifecycleView::decode(&nested).unwrap().maybe_unknown, "{i}");
            }
        }
    }
}
