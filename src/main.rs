//! The `evbridge` binary: parse flags (and `--config`), set up logging, run.

use std::process::ExitCode;

/// glibc's allocator spent over a third of the bridge's CPU under load
/// (every envelope allocates and frees on different worker threads);
/// mimalloc's per-thread heaps make that a few percent. Its `override`
/// feature routes the C libraries' malloc (librdkafka's copy of each record)
/// through it as well.
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
