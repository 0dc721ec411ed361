//! The reference in `docs/` against the code: every sink and source
//! option the parsers accept, every flag clap knows and every metric the
//! bridge records has its row, and no row names one that does not exist.

use std::collections::BTreeSet;

use clap::CommandFactory;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The section of `doc` under the `## ` heading that starts with `title`.
fn section<'a>(doc: &'a str, title: &str) -> &'a str {
    let start = doc
        .find(&format!("\n## {title}"))
        .unwrap_or_else(|| panic!("no section `## {title}`"));
    let rest = &doc[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
    &rest[..end]
}

/// First-column keys of the table rows in `text`: `| `key` |` → key.
fn row_keys(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`'))
        .map(|(k, _)| k.to_string())
        .collect()
}

/// How an option is spelled in the docs (`rdkafka.<librdkafka property>`
/// is the family `rdkafka.PROP`).
fn doc_spelling(option: &str) -> String {
    match option.split_once('.') {
        Some((family, _)) => format!("{family}.PROP"),
        None => option.to_string(),
    }
}

fn assert_same(what: &str, code: BTreeSet<String>, docs: BTreeSet<String>) {
    let missing: Vec<_> = code.difference(&docs).collect();
    let stale: Vec<_> = docs.difference(&code).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "{what}: in the code but not the docs: {missing:?}; in the docs but not the code: {stale:?}"
    );
}

#[test]
fn every_sink_option_has_a_row_in_docs_sinks() {
    let doc = read("docs/sinks.md");
    for (scheme, title) in [
        ("stdout", "stdout"),
        ("blackhole", "blackhole"),
        #[cfg(feature = "kafka")]
        ("kafka", "Kafka"),
        #[cfg(feature = "amqp")]
        ("amqp", "AMQP"),
        #[cfg(feature = "grpc")]
        ("grpc", "gRPC"),
    ] {
        let options = evbridge::sinks::options(scheme).expect("a sink scheme");
        let code = options.iter().map(|o| doc_spelling(o)).collect();
        assert_same(
            &format!("{scheme}:// sink"),
            code,
            row_keys(section(&doc, title)),
        );
    }
}

#[test]
fn every_source_option_has_a_row_in_docs_sources() {
    let doc = read("docs/sources.md");
    for (scheme, title) in [
        #[cfg(feature = "kafka")]
        ("kafka", "Kafka"),
        #[cfg(feature = "amqp")]
        ("amqp", "RabbitMQ"),
    ] {
        let options = evbridge::sources::options(scheme).expect("a broker scheme");
        let code = options.iter().map(|o| doc_spelling(o)).collect();
        assert_same(
            &format!("{scheme}:// source"),
            code,
            row_keys(section(&doc, title)),
        );
    }
}

#[test]
fn every_metric_has_a_row_in_docs_operations() {
    let doc = read("docs/operations.md");
    let code = evbridge::metric_names::ALL
        .iter()
        .map(|m| m.to_string())
        .collect();
    let docs = row_keys(section(&doc, "Metrics"))
        .into_iter()
        .filter(|k| k.starts_with("evbridge_"))
        .collect();
    assert_same("metrics", code, docs);
}

#[test]
fn every_flag_has_a_row_in_docs_operations() {
    let doc = read("docs/operations.md");
    let mut code = BTreeSet::new();
    let cmd = evbridge::cli::Cli::command();
    let commands = std::iter::once(&cmd).chain(cmd.get_subcommands());
    for c in commands {
        for arg in c.get_arguments() {
            if let Some(long) = arg.get_long()
                && !matches!(long, "help" | "version")
            {
                code.insert(format!("--{long}"));
            }
        }
    }
    let docs = row_keys(section(&doc, "Flags"))
        .into_iter()
        .filter(|k| k.starts_with("--"))
        .collect();
    assert_same("flags", code, docs);
}
