//! Helpers shared by kiln-clip's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `fixtures/clip/` at the workspace root.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/clip")
}

/// A complete classic tokenizer folder (`vocab.json`, `merges.txt` and the two JSON files of
/// `fixtures/clip/tokenizer-<flavour>`) assembled in a temporary directory.
pub fn classic_tokenizer(flavour: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = fixtures();
    for (from, name) in [
        (root.join("vocab/vocab.json"), "vocab.json"),
        (root.join("vocab/merges.txt"), "merges.txt"),
        (
            root.join(format!("tokenizer-{flavour}/special_tokens_map.json")),
            "special_tokens_map.json",
        ),
        (
            root.join(format!("tokenizer-{flavour}/tokenizer_config.json")),
            "tokenizer_config.json",
        ),
    ] {
        std::fs::copy(&from, dir.path().join(name)).expect("copy fixture");
    }
    dir
}

/// The flex device the numeric tests run on.
pub fn device() -> burn::tensor::Device {
    kiln_nn::parse_device("flex").expect("flex is the default feature")
}
