//! Broker messages of any bytes become one envelope each whose JSON is
//! one valid JSON object on one line (what `stdout://` writes per line).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (body, key) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[i + 1..], Some(&data[..i])),
        None => (data, None),
    };
    let rec = evbridge::sources::ingest::Record {
        body,
        key,
        origin: "fuzz/0/1".into(),
        topic: "fuzz",
        timestamp: None,
        attributes: Default::default(),
    };
    let out = evbridge::sources::ingest::envelope(&rec);
    let json = out.envelope.json();
    assert!(!json.contains(&b'\n'), "a newline in the envelope");
    let v: serde_json::Value = serde_json::from_slice(json).expect("the envelope is JSON");
    assert!(v.is_object());
});
