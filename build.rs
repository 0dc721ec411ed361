//! Compiles `proto/` with protox (pure Rust, no protoc on the machine) and
//! generates the tonic clients/servers plus a descriptor set that
//! tests use as an independent JSON witness, and (`json.rs`) the direct
//! JSON encoders normalization uses, (`bep.rs`) the names of
//! Bazel's event kinds, and (`wire.rs`) the field table that finds fields
//! the schema does not know.

use std::path::{Path, PathBuf};

// Helpers in `build/`, one generator each.
#[path = "build/bep.rs"]
mod bep;
#[path = "build/json.rs"]
mod json;
#[path = "build/wire.rs"]
mod wire;

fn protos(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            protos(&path, out);
        } else if path.extension().is_some_and(|x| x == "proto") {
            out.push(path);
        }
    }
}

fn main() {
    let root = Path::new("proto");
    let mut files = Vec::new();
    protos(root, &mut files);
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build");
    println!("cargo:rerun-if-changed=build.rs");

    let fds = protox::compile(&files, [root]).unwrap_or_else(|e| panic!("proto/: {e}"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(
        out.join("descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )
    .expect("write descriptor.bin");

    let pool = prost_reflect::DescriptorPool::from_file_descriptor_set(fds.clone())
        .unwrap_or_else(|e| panic!("proto/: {e}"));
    std::fs::write(out.join("json.rs"), json::generate(&pool)).expect("write json.rs");
    std::fs::write(out.join("bep.rs"), bep::generate(&pool)).expect("write bep.rs");
    std::fs::write(out.join("wire.rs"), wire::generate(&pool)).expect("write wire.rs");

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
        .expect("generate Rust from proto/");
}
