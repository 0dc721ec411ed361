//! Keywords: `notification_keywords` parsed (`key=value` pairs, the
//! `command_name`), rendered once per set and shared by every envelope of
//! the notification, with the sets seen lately kept rendered.

use super::*;

/// Keywords with what every envelope derives from them, computed once.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RenderedKeywords {
    /// The keywords as given.
    pub raw: Vec<String>,
    /// `command_name=…`, for the `command_name` attribute.
    pub command_name: Option<SmolStr>,
    /// That attribute as an envelope writes it (`,"command_name":"…"`),
    /// or empty.
    pub command_attribute: String,
    /// The `parsedKeywords` object (empty when there are none).
    pub json: String,
    /// The keywords as a JSON array of strings (the payload's `keywords`).
    pub array: String,
}

impl RenderedKeywords {
    /// Renders `keywords`, parsed from `raw`.
    pub fn from_parsed(raw: &[String], keywords: &Keywords) -> Self {
        let json = if keywords.is_empty() {
            String::new()
        } else {
            let mut w = JsonWriter::with_capacity(256);
            keywords.write(&mut w);
            w.finish().0
        };
        let mut w = JsonWriter::with_capacity(raw.iter().map(|k| k.len() + 3).sum::<usize>() + 2);
        w.begin_array();
        for k in raw {
            w.elem();
            w.str(k);
        }
        w.end_array();
        let mut command_attribute = String::new();
        if let Some(cmd) = keywords.command_name {
            command_attribute.push_str(",\"command_name\":");
            push_json_str(&mut command_attribute, cmd);
        }
        RenderedKeywords {
            raw: raw.to_vec(),
            command_name: keywords.command_name.map(SmolStr::from),
            command_attribute,
            json,
            array: w.finish().0,
        }
    }
}

/// Rendered keyword sets by the hash of their bytes.
pub(super) type RecentKeywords =
    std::collections::HashMap<u64, Arc<RenderedKeywords>, foldhash::fast::RandomState>;

/// A keyword set hashed by its bytes, whether `String`s or raw slices.
pub(super) struct KeywordBytes<'a, K>(pub(super) &'a [K]);

impl<K: AsRef<[u8]>> std::hash::Hash for KeywordBytes<'_, K> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_usize(self.0.len());
        for k in self.0 {
            h.write_usize(k.as_ref().len());
            h.write(k.as_ref());
        }
    }
}

/// How many keyword sets [`Normalizer`] keeps rendered; when full it
/// starts afresh (the sets in use come back at once).
pub(super) const RECENT_KEYWORDS: usize = 64;

impl Normalizer {
    /// `raw` parsed and rendered: from the recent ones when it is one of
    /// them, else rendered now and remembered.
    pub(super) fn rendered_keywords(&self, raw: &[String]) -> Arc<RenderedKeywords> {
        self.recent_or_rendered(raw).unwrap_or_else(|| {
            debug_assert!(false, "strings are UTF-8");
            Arc::new(RenderedKeywords::from_parsed(raw, &Keywords::parse(raw)))
        })
    }

    /// As [`Self::rendered_keywords`] for keywords still in their encoded
    /// form; `None` when one that is not among the recent ones is not
    /// UTF-8.
    pub(super) fn recent_or_rendered<K: AsRef<[u8]>>(
        &self,
        raw: &[K],
    ) -> Option<Arc<RenderedKeywords>> {
        let recent = || {
            self.recent_keywords
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        };
        let hash = std::hash::BuildHasher::hash_one(&self.keyword_hasher, KeywordBytes(raw));
        let same = |r: &RenderedKeywords| {
            r.raw.len() == raw.len()
                && r.raw
                    .iter()
                    .zip(raw)
                    .all(|(a, b)| a.as_bytes() == b.as_ref())
        };
        if let Some(found) = recent().get(&hash).filter(|r| same(r)) {
            return Some(found.clone());
        }
        // Checked and rendered without holding the lock.
        let raw = raw
            .iter()
            .map(|k| std::str::from_utf8(k.as_ref()).ok().map(str::to_owned))
            .collect::<Option<Vec<String>>>()?;
        let rendered = Arc::new(RenderedKeywords::from_parsed(&raw, &Keywords::parse(&raw)));
        let mut recent = recent();
        if recent.len() >= RECENT_KEYWORDS {
            recent.clear();
        }
        recent.insert(hash, rendered.clone());
        Some(rendered)
    }
}

/// The `parsedKeywords` member (rendered), if there are keywords.
pub(super) fn write_keywords(w: &mut JsonWriter, keywords: &str) {
    if !keywords.is_empty() {
        w.key("parsedKeywords");
        w.raw(keywords);
    }
}

/// Keywords such as `command_name=test` and
/// `user_keyword=engflow:CiCdPipelineName=post-merge`, structured: the
/// payload's `parsedKeywords` is `{"commandName", "other": {…},
/// "userKeywords": {…}}`, maps sorted by key, the last of a repeated key
/// winning.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Keywords<'a> {
    /// `command_name=…`.
    pub command_name: Option<&'a str>,
    /// `user_keyword=KEY=VALUE` (`VALUE` empty when there is no `=`).
    pub user: Vec<(&'a str, &'a str)>,
    /// Any other `KEY=VALUE`, or a bare word with an empty value.
    pub other: Vec<(&'a str, &'a str)>,
}

impl<'a> Keywords<'a> {
    /// Parses EngFlow's notification keywords.
    pub fn parse(keywords: &'a [String]) -> Self {
        let mut out = Keywords::default();
        for kw in keywords {
            match kw.split_once('=') {
                Some(("command_name", v)) => out.command_name = Some(v),
                Some(("user_keyword", v)) => out.user.push(v.split_once('=').unwrap_or((v, ""))),
                Some(kv) => out.other.push(kv),
                None => out.other.push((kw, "")),
            }
        }
        for list in [&mut out.user, &mut out.other] {
            // Stable, so among equal keys the last given stays last.
            list.sort_by(|a, b| a.0.cmp(b.0));
            let mut i = 0;
            while i + 1 < list.len() {
                if list[i].0 == list[i + 1].0 {
                    list.remove(i);
                } else {
                    i += 1;
                }
            }
        }
        out
    }

    /// No keywords at all.
    pub fn is_empty(&self) -> bool {
        self.command_name.is_none() && self.user.is_empty() && self.other.is_empty()
    }

    /// Writes the structured object.
    pub fn write(&self, w: &mut JsonWriter) {
        w.begin_object();
        if let Some(cmd) = self.command_name {
            w.key("commandName");
            w.str(cmd);
        }
        for (name, list) in [("other", &self.other), ("userKeywords", &self.user)] {
            if !list.is_empty() {
                w.key(name);
                w.begin_object();
                for (k, v) in list {
                    w.key_str(k);
                    w.str(v);
                }
                w.end_object();
            }
        }
        w.end_object();
    }
}
