//! The `evbridge` binary: parse flags, set up logging, run.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = evbridge::cli::Cli::parse();
    evbridge::logging::init();
    evbridge::cli::main(cli).await
}
