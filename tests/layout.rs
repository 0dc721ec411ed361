//! The house rules of the tree (issue 20), checked so they stay true: a
//! short README, no source file over ~500 lines outside its tests, and
//! modules that import each other one way only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Most lines a file may have before its `#[cfg(test)]` module.
const MAX_LINES: usize = 500;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A file's text before its unit-test module.
fn without_tests(text: &str) -> &str {
    match text.find("\n#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    }
}

#[test]
fn the_readme_is_at_most_200_lines() {
    let text = std::fs::read_to_string(root().join("README.md")).unwrap();
    let n = text.lines().count();
    assert!(
        n <= 200,
        "README.md has {n} lines; the reference goes to docs/"
    );
}

#[test]
fn no_source_file_is_over_500_lines_outside_its_tests() {
    let mut files = Vec::new();
    for dir in ["src", "sinks/src", "build"] {
        rust_files(&root().join(dir), &mut files);
    }
    files.push(root().join("build.rs"));
    let mut long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            let n = without_tests(&text).lines().count();
            let name = f.strip_prefix(root()).unwrap().display().to_string();
            (n > MAX_LINES).then(|| format!("{name}: {n}"))
        })
        .collect();
    long.sort();
    assert!(long.is_empty(), "files over {MAX_LINES} lines: {long:?}");
}

/// The crate's top-level module a file belongs to (`src/sources/kafka.rs`
/// → `sources`), `None` for the crate root.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    match first.strip_suffix(".rs") {
        Some("lib" | "main") => None,
        Some(m) => Some(m.to_string()),
        None => Some(first),
    }
}

#[test]
fn the_crates_modules_import_each_other_one_way_only() {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(from) = top_module(&src, f) else {
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        let code = without_tests(&text);
        let deps = graph.entry(from.clone()).or_default();
        for (at, _) in code.match_indices("crate::") {
            let name: String = code[at + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != from {
                deps.insert(name);
            }
        }
    }
    // Depth-first search for a cycle, reporting its path.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, &graph, &mut Vec::new(), &mut done) {
            panic!(
                "modules import each other in a circle: {}",
                cycle.join(" → ")
            );
        }
    }
    // The direction the layout promises.
    let imports = |a: &str, b: &str| graph.get(a).is_some_and(|d| d.contains(b));
    for (low, high) in [
        ("pipeline", "sources"),
        ("pipeline", "ops"),
        ("sources", "ops"),
        ("normalize", "sources"),
        ("sources", "bridge"),
        ("sim", "sources"),
    ] {
        assert!(!imports(low, high), "`{low}` must not import `{high}`");
    }
}
