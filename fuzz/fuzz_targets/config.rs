//! Configuration files: any text, with any `${VAR}`, becomes flags or a
//! clear error, and the flags go through the command-line parser.
#![no_main]

use clap::{CommandFactory, FromArgMatches};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let cmd = evbridge::cli::Cli::command();
    // Values with every URL delimiter, to exercise the encoding.
    let env = |name: &str| (!name.is_empty()).then(|| format!("{name}/?#@:+&= %"));
    let Ok(flags) = evbridge::config::flags_from_toml(text, &cmd, &|_| false, &env) else {
        return;
    };
    let mut argv = vec!["evbridge".to_string()];
    argv.extend(flags);
    if let Ok(m) = cmd.try_get_matches_from(argv) {
        let _ = evbridge::cli::Cli::from_arg_matches(&m);
    }
});
