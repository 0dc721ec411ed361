//! Errors of sinks: whether retrying can help is the one thing the pipeline
//! needs to know.

/// Why a sink could not confirm an envelope.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SinkError {
    /// The destination may accept it later (broker down, timeout, full
    /// queue): the pipeline retries with backoff and never drops it.
    #[error("{0} (retryable)")]
    Retryable(String),
    /// Retrying cannot help (too large, not authorized, rejected): the
    /// envelope is reported and its notification stays unacknowledged.
    #[error("{0} (permanent)")]
    Permanent(String),
}

impl SinkError {
    /// True when sending the same envelope again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Retryable(_))
    }
}

/// A batch stopped at envelope `at`: everything before it was confirmed,
/// `at` itself was not, and of the rest only those in `confirmed` were.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("envelope {at} of the batch: {error}")]
pub struct BatchError {
    /// Index of the first envelope the destination did not confirm.
    pub at: usize,
    /// Why.
    pub error: SinkError,
    /// Indices after `at` that the destination confirmed anyway, so the
    /// pipeline does not send them again (fewer duplicates).
    pub confirmed: Vec<usize>,
}

impl BatchError {
    /// A failure at envelope `at`; nothing after it known to be confirmed.
    pub fn new(at: usize, error: SinkError) -> Self {
        BatchError {
            at,
            error,
            confirmed: Vec::new(),
        }
    }

    /// A failure of the whole batch (nothing confirmed).
    pub fn all(error: SinkError) -> Self {
        BatchError::new(0, error)
    }

    /// Records which envelopes after `at` were confirmed anyway.
    pub fn with_confirmed(mut self, confirmed: Vec<usize>) -> Self {
        self.confirmed = confirmed;
        self
    }
}

/// Why a URL could not be turned into a sink (or, through the broker
/// sources that share the parsers, into a source).
#[derive(Debug)]
#[non_exhaustive]
pub enum OpenError {
    /// The text is not a URL at all.
    Malformed {
        /// The URL, secrets redacted.
        url: String,
        /// What the parser said.
        reason: String,
    },
    /// A scheme nobody implements.
    UnknownScheme {
        /// The URL, secrets redacted.
        url: String,
        /// The scheme that was given.
        scheme: String,
    },
    /// A real sink this build was compiled without.
    FeatureDisabled {
        /// The scheme that was given.
        scheme: String,
        /// The cargo feature that provides it.
        feature: &'static str,
    },
    /// A known scheme with an option, host or path it does not accept.
    Invalid {
        /// The URL, secrets redacted.
        url: String,
        /// What is wrong and what is accepted instead.
        reason: String,
    },
    /// The destination could not be reached or set up.
    Connect {
        /// The URL, secrets redacted.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

impl OpenError {
    /// The message with the URL's role ("sink", "source", "dead-letter
    /// sink") and the forms accepted in that role, so an error names what
    /// the user passed, not which parser read it.
    pub fn render(&self, role: &str, accepted: &str) -> String {
        match self {
            OpenError::Malformed { url, reason } => {
                format!("{role} URL `{url}` is malformed: {reason}; accepted forms: {accepted}")
            }
            OpenError::UnknownScheme { url, scheme } => format!(
                "{role} URL `{url}` has unknown scheme `{scheme}`; accepted forms: {accepted}"
            ),
            OpenError::FeatureDisabled { scheme, feature } => format!(
                "{role} scheme `{scheme}://` needs cargo feature `{feature}`, which this build \
                 does not enable (rebuild with `--features {feature}`)"
            ),
            OpenError::Invalid { url, reason } => format!("{role} URL `{url}`: {reason}"),
            OpenError::Connect { url, reason } => {
                format!("{role} `{url}` could not be opened: {reason}")
            }
        }
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render("sink", crate::ACCEPTED))
    }
}

impl std::error::Error for OpenError {}
