//! Logging to stderr (stdout belongs to the `stdout://` sink), `info` by
//! default, `RUST_LOG` honoured.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; harmless if one is already installed.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
