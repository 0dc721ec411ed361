//! `names=`: a sink that takes only some envelope names, such as a Kafka
//! topic of test summaries beside a topic of everything.
//!
//! An envelope the filter skips counts as delivered for that sink only:
//! the pipeline confirms it for that sink without sending it (and counts
//! it), while every other sink must still confirm it before anything is
//! acknowledged upstream.

use std::sync::Arc;

use async_trait::async_trait;

use crate::{BatchError, Envelope, OpenError, Sink, SinkError, redact};

/// The option every sink URL accepts.
pub(crate) const OPTION: &str = "names";

/// Which names a sink takes: exact names and `prefix*` patterns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameFilter {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl NameFilter {
    /// Parses `a,b,prefix*`; names use the characters of envelope names
    /// (letters, digits, `_`, `.`, `-`, `'`), a `*` may only end one.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut filter = NameFilter {
            exact: Vec::new(),
            prefixes: Vec::new(),
        };
        for part in text.split(',').map(str::trim) {
            let (stem, prefix) = match part.strip_suffix('*') {
                Some(stem) => (stem, true),
                None => (part, false),
            };
            let valid = stem
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-'".contains(c));
            if part.is_empty() || !valid || (stem.is_empty() && !prefix) {
                return Err(format!(
                    "option `names={text}`: `{part}` is not an envelope name or `prefix*` \
                     (a comma-separated list such as `names=bazel_test_summary,invocation_*`)"
                ));
            }
            if prefix {
                filter.prefixes.push(stem.to_string());
            } else {
                filter.exact.push(stem.to_string());
            }
        }
        filter.exact.sort();
        filter.exact.dedup();
        Ok(filter)
    }

    /// Whether the sink takes envelopes named `name`.
    pub fn matches(&self, name: &str) -> bool {
        self.exact
            .binary_search_by(|n| n.as_str().cmp(name))
            .is_ok()
            || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }
}

/// A sink with a name filter in front.
#[derive(Debug)]
pub(crate) struct Filtered {
    inner: Arc<dyn Sink>,
    filter: NameFilter,
    shown: String,
}

#[async_trait]
impl Sink for Filtered {
    fn describe(&self) -> &str {
        &self.shown
    }

    fn accepts(&self, envelope: &Envelope) -> bool {
        self.filter.matches(&envelope.name)
    }

    fn filters(&self) -> bool {
        true
    }

    async fn send(&self, batch: &[Arc<Envelope>]) -> Result<(), BatchError> {
        // The pipeline passes only what the filter takes; any other caller
        // gets the same meaning: skipped envelopes are confirmed.
        if batch.iter().all(|e| self.accepts(e)) {
            return self.inner.send(batch).await;
        }
        let taken: Vec<usize> = (0..batch.len())
            .filter(|&i| self.accepts(&batch[i]))
            .collect();
        let sub: Vec<Arc<Envelope>> = taken.iter().map(|&i| batch[i].clone()).collect();
        match self.inner.send(&sub).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let at = taken.get(e.at).copied().unwrap_or(batch.len());
                // Skipped ones after the failure are confirmed too.
                let mut confirmed: Vec<usize> = e
                    .confirmed
                    .iter()
                    .filter_map(|&c| taken.get(c).copied())
                    .chain((at + 1..batch.len()).filter(|&i| !self.accepts(&batch[i])))
                    .collect();
                confirmed.sort_unstable();
                Err(BatchError::new(at, e.error).with_confirmed(confirmed))
            }
        }
    }

    async fn healthcheck(&self) -> Result<(), SinkError> {
        self.inner.healthcheck().await
    }

    async fn flush(&self) -> Result<(), SinkError> {
        self.inner.flush().await
    }
}

/// Takes `names=` out of a sink URL: the URL without it, and the filter.
pub(crate) fn split(raw: &str) -> Result<(String, Option<(NameFilter, String)>), OpenError> {
    // The query starts after the userinfo, which may hold a `?`.
    let host_at = raw.find("://").map_or(0, |i| {
        let rest = &raw[i + 3..];
        i + 3 + crate::options::userinfo_end(rest).map_or(0, |at| at + 1)
    });
    let Some(q) = raw[host_at..].find('?') else {
        return Ok((raw.to_string(), None));
    };
    let (base, query) = (&raw[..host_at + q], &raw[host_at + q + 1..]);
    let mut names = None;
    let mut rest = url::form_urlencoded::Serializer::new(String::new());
    let mut kept = 0;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if k == OPTION {
            if names.replace(v.to_string()).is_some() {
                return Err(OpenError::Invalid {
                    url: redact(raw),
                    reason: format!("option `{OPTION}` is given twice"),
                });
            }
        } else {
            rest.append_pair(&k, &v);
            kept += 1;
        }
    }
    let Some(names) = names else {
        return Ok((raw.to_string(), None));
    };
    let filter = NameFilter::parse(&names).map_err(|reason| OpenError::Invalid {
        url: redact(raw),
        reason,
    })?;
    let url = if kept == 0 {
        base.to_string()
    } else {
        format!("{base}?{}", rest.finish())
    };
    Ok((url, Some((filter, names))))
}

/// `inner` behind `filter`, described as its URL plus the option.
pub(crate) fn wrap(inner: Arc<dyn Sink>, filter: NameFilter, names: &str) -> Arc<dyn Sink> {
    let base = inner.describe();
    let joiner = if base.contains('?') { '&' } else { '?' };
    let shown = format!("{base}{joiner}{OPTION}={names}");
    Arc::new(Filtered {
        inner,
        filter,
        shown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_envelope;
    use std::sync::Mutex;

    #[test]
    fn names_and_prefixes() {
        let f = NameFilter::parse("bazel_test_summary, invocation_*,bazel_test_summary").unwrap();
        assert!(f.matches("bazel_test_summary"));
        assert!(f.matches("invocation_finished"));
        assert!(!f.matches("bazel_test_result"));
        assert!(!f.matches("invocation"));
        assert!(NameFilter::parse("*").unwrap().matches("anything"));
        for bad in ["", "a,,b", "a b", "a*b", "**", "a/b"] {
            let e = NameFilter::parse(bad).unwrap_err();
            assert!(e.contains("names="), "{bad}: {e}");
        }
    }

    #[test]
    fn the_option_is_taken_out_of_the_url() {
        let (url, f) = split("kafka://b:1/t?names=a,b*&acks=all").unwrap();
        assert_eq!(url, "kafka://b:1/t?acks=all");
        let (f, shown) = f.unwrap();
        assert!(f.matches("a") && f.matches("bee") && !f.matches("c"));
        assert_eq!(shown, "a,b*");
        assert_eq!(split("stdout://?names=x").unwrap().0, "stdout://");
        // A `?` in a password is not the query.
        let (url, f) = split("kafka://u:hun?ter2@b:9092/t?acks=all&names=a").unwrap();
        assert_eq!(url, "kafka://u:hun?ter2@b:9092/t?acks=all");
        assert!(f.is_some());
        let (url, f) = split("amqp://u:hun?ter2@h:5672/v?names=a").unwrap();
        assert_eq!(url, "amqp://u:hun?ter2@h:5672/v");
        assert!(f.is_some());
        assert!(split("stdout://?format=json").unwrap().1.is_none());
        let e = split("amqp://u:hunter2@h/?names=a&names=b")
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice") && !e.contains("hunter2"), "{e}");
        let e = split("amqp://u:hunter2@h/?names=a%20b")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`a b`") && !e.contains("hunter2"), "{e}");
    }

    /// Confirms what it is given and records the ids; fails at `fail_at`.
    #[derive(Debug, Default)]
    struct Recorder {
        got: Mutex<Vec<String>>,
        fail_at: Option<usize>,
    }

    #[async_trait]
    impl Sink for Recorder {
        fn describe(&self) -> &str {
            "recorder://"
        }
        async fn send(&self, batch: &[Arc<Envelope>]) -> Result<(), BatchError> {
            let upto = self.fail_at.unwrap_or(batch.len()).min(batch.len());
            let mut got = self.got.lock().unwrap();
            got.extend(batch[..upto].iter().map(|e| e.id.to_string()));
            match self.fail_at {
                Some(at) if at < batch.len() => {
                    Err(BatchError::new(at, SinkError::Retryable("down".into())))
                }
                _ => Ok(()),
            }
        }
    }

    fn named(id: &str, name: &str) -> Arc<Envelope> {
        let mut event = test_envelope(id).event().clone();
        event.name = name.into();
        Arc::new(Envelope::new(event))
    }

    #[tokio::test]
    async fn skipped_envelopes_count_as_confirmed_and_failures_map_back() {
        let batch = [
            named("1", "keep"),
            named("2", "skip"),
            named("3", "keep"),
            named("4", "skip"),
            named("5", "keep"),
        ];
        let inner = Arc::new(Recorder::default());
        let sink = wrap(inner.clone(), NameFilter::parse("keep").unwrap(), "keep");
        assert_eq!(sink.describe(), "recorder://?names=keep");
        assert!(sink.filters() && sink.accepts(&batch[0]) && !sink.accepts(&batch[1]));
        sink.send(&batch).await.unwrap();
        assert_eq!(*inner.got.lock().unwrap(), ["1", "3", "5"]);

        // The inner sink fails at its second envelope (batch index 2):
        // before it all is confirmed, after it only the skipped one.
        let inner = Arc::new(Recorder {
            fail_at: Some(1),
            ..Default::default()
        });
        let sink = wrap(inner.clone(), NameFilter::parse("keep").unwrap(), "keep");
        let e = sink.send(&batch).await.unwrap_err();
        assert_eq!((e.at, e.confirmed), (2, vec![3]));
        assert_eq!(*inner.got.lock().unwrap(), ["1"]);
    }
}
