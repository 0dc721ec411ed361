//! `stdout://`: one JSON object per line, for people watching events and
//! for scripts piping them onward. A write counts as confirmed once it was
//! flushed to the descriptor.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;
use url::Url;

use crate::{BatchError, Envelope, OpenError, Options, Sink, SinkError};

/// How each envelope is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One compact JSON object per line (default).
    Json,
    /// Indented JSON, for reading by eye; objects are separated by newlines.
    Pretty,
}

/// Writes envelopes to any async writer; `stdout://` uses the process's
/// standard output, tests use an in-memory buffer.
pub struct WriterSink<W> {
    out: Mutex<W>,
    format: Format,
    shown: String,
}

impl<W> fmt::Debug for WriterSink<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriterSink")
            .field("format", &self.format)
            .finish()
    }
}

impl<W: AsyncWrite + Unpin + Send> WriterSink<W> {
    /// A sink printing to `out`.
    pub fn new(out: W, format: Format) -> Self {
        WriterSink {
            out: Mutex::new(out),
            format,
            shown: "stdout://".into(),
        }
    }
}

/// Options a `stdout://` URL takes.
pub(crate) const OPTIONS: &[&str] = &["format"];

/// Parses a `stdout://` URL (option `format=json|pretty`).
pub(crate) fn open(url: &Url) -> Result<WriterSink<tokio::io::Stdout>, OpenError> {
    let mut opts = Options::new(url)?;
    if url.host_str().is_some_and(|h| !h.is_empty()) || !matches!(url.path(), "" | "/") {
        return Err(opts.invalid(
            "stdout:// takes no host or path; accepted form: stdout://[?format=json|pretty]",
        ));
    }
    let format = match opts.choice("format", &["json", "pretty"])?.as_deref() {
        Some("pretty") => Format::Pretty,
        _ => Format::Json,
    };
    let shown = opts.shown_url().to_string();
    opts.finish(OPTIONS)?;
    let mut sink = WriterSink::new(tokio::io::stdout(), format);
    sink.shown = shown;
    Ok(sink)
}

fn render(env: &Envelope, format: Format, buf: &mut Vec<u8>) {
    match format {
        Format::Json => buf.extend_from_slice(env.json()),
        Format::Pretty => {
            // Re-parse so the payload is indented too (RawValue is copied
            // verbatim by the pretty printer otherwise). JSON nested deeper
            // than serde_json's limit (128) is written compact instead.
            let pretty = serde_json::from_slice::<serde_json::Value>(env.json())
                .ok()
                .and_then(|v| serde_json::to_vec_pretty(&v).ok());
            buf.extend_from_slice(pretty.as_deref().unwrap_or(env.json()));
        }
    }
    buf.push(b'\n');
}

#[async_trait]
impl<W: AsyncWrite + Unpin + Send> Sink for WriterSink<W> {
    fn describe(&self) -> &str {
        &self.shown
    }

    async fn send(&self, batch: &[Arc<Envelope>]) -> Result<(), BatchError> {
        let mut buf = Vec::with_capacity(batch.iter().map(|e| e.json().len() + 1).sum());
        for env in batch {
            render(env, self.format, &mut buf);
        }
        let mut out = self.out.lock().await;
        let written = async {
            out.write_all(&buf).await?;
            out.flush().await
        };
        written.await.map_err(|e| {
            // A closed pipe will not reopen; anything else may be transient.
            let err = if e.kind() == std::io::ErrorKind::BrokenPipe {
                SinkError::Permanent(format!("standard output is closed: {e}"))
            } else {
                SinkError::Retryable(format!("writing to standard output: {e}"))
            };
            BatchError::all(err)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_envelope;

    #[tokio::test]
    async fn json_is_one_line_per_envelope() {
        let sink = WriterSink::new(Vec::new(), Format::Json);
        let batch = [Arc::new(test_envelope("a")), Arc::new(test_envelope("b"))];
        sink.send(&batch).await.unwrap();
        let out = String::from_utf8(sink.out.into_inner()).unwrap();
        let lines: Vec<_> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(v["id"], "b");
    }

    #[tokio::test]
    async fn pretty_indents_payload() {
        let sink = WriterSink::new(Vec::new(), Format::Pretty);
        sink.send(&[Arc::new(test_envelope("a"))]).await.unwrap();
        let out = String::from_utf8(sink.out.into_inner()).unwrap();
        assert!(
            out.contains("\n  \"payload\": {\n    \"n\": 1\n  }"),
            "{out}"
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["id"], "a");
    }

    #[tokio::test]
    async fn pretty_writes_json_nested_beyond_the_parsers_limit_compact() {
        let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
        let mut event = crate::test_envelope("deep").event().clone();
        event.payload = crate::Payload::trusted(deep.clone());
        let env = Arc::new(Envelope::new(event));
        let sink = WriterSink::new(Vec::new(), Format::Pretty);
        sink.send(std::slice::from_ref(&env)).await.unwrap();
        let out = sink.out.into_inner();
        assert_eq!(out.strip_suffix(b"\n").unwrap(), env.json());
    }
}
