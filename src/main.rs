//! The `evbridge` binary: parse flags (and `--config`), set up logging, run.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match evbridge::cli::parse_args(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(f) => return f.exit_code(),
    };
    evbridge::logging::init(cli.log_format());
    evbridge::cli::main(cli).await
}
