//! Sink and source URLs as a user may type them: redaction, sizes and
//! every parser behind `--sink`, `--dead-letter` and `--source` must
//! answer with a value or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = evbridge::sinks::redact(text);
    let _ = evbridge::sinks::parse_size(text);
    let _ = evbridge::sinks::userinfo_end(text);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let _ = evbridge::sinks::open(text).await;
        let _ = evbridge::sources::open_inbound(text).await;
    });
});
