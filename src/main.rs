//! The `evbridge` binary: parse flags (and `--config`), set up logging, run.

use std::process::ExitCode;

/// glibc's allocator was the largest part of the bridge's CPU under load
/// (envelopes allocated and freed on different threads; BENCHMARKS.md);
/// mimalloc's per-thread heaps fix that. Its `override` feature routes the
/// C libraries' malloc (librdkafka's copy of each record) through it too.
/// A feature (`mimalloc`, on by default), so a program embedding the
/// library keeps its own allocator with `default-features = false`.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match evbridge::cli::parse_args(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(f) => return f.exit_code(),
    };
    evbridge::ops::logging::init(cli.log_format());
    evbridge::cli::main(cli).await
}
