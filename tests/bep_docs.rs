//! docs/build-events.md lists every Bazel event name the schema yields,
//! with its payload's JSON key and message, and nothing else.

#[test]
fn the_table_of_names_is_the_generated_one() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/build-events.md"))
        .unwrap();
    let rows: Vec<(String, String, String)> = doc
        .lines()
        .filter(|l| l.starts_with("| `bazel_"))
        .map(|l| {
            let cells: Vec<String> = l
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_string())
                .filter(|c| !c.is_empty())
                .collect();
            (cells[0].clone(), cells[1].clone(), cells[2].clone())
        })
        .collect();
    let camel = |s: &str| {
        let mut parts = s.split('_');
        let mut out = parts.next().unwrap().to_string();
        for p in parts {
            let mut c = p.chars();
            out.extend(c.next().map(|c| c.to_ascii_uppercase()));
            out.push_str(c.as_str());
        }
        out
    };
    let want: Vec<(String, String, String)> = evbridge::normalize::bep::NAMES
        .iter()
        .map(|(n, f, t)| (n.to_string(), camel(f), t.to_string()))
        .collect();
    assert_eq!(
        rows, want,
        "docs/build-events.md's table differs from the schema's names"
    );
}
