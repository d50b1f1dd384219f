//! Helpers shared by kiln-pipeline's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `fixtures/pipeline/`.
pub fn fixtures() -> PathBuf {
    root().join("fixtures/pipeline")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read fixture dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy fixture");
        }
    }
}

/// A complete diffusers folder for `kind` (`sd1`, `sd2`, `inpaint`) in a temporary directory:
/// the committed components, the ones it shares with sd1 (sd2: the VAE; inpaint: the text
/// encoder and VAE) and a classic tokenizer folder from `fixtures/clip`.
pub fn model(kind: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = fixtures().join(kind);
    copy_dir(&src, dir.path());
    for component in ["text_encoder", "vae"] {
        if !dir.path().join(component).exists() {
            copy_dir(
                &fixtures().join("sd1").join(component),
                &dir.path().join(component),
            );
        }
    }
    let flavour = if kind == "sd2" { "sd2" } else { "sd1" };
    let tok = dir.path().join("tokenizer");
    std::fs::create_dir_all(&tok).expect("tokenizer dir");
    let clip = root().join("fixtures/clip");
    for (from, name) in [
        (clip.join("vocab/vocab.json"), "vocab.json"),
        (clip.join("vocab/merges.txt"), "merges.txt"),
        (
            clip.join(format!("tokenizer-{flavour}/special_tokens_map.json")),
            "special_tokens_map.json",
        ),
        (
            clip.join(format!("tokenizer-{flavour}/tokenizer_config.json")),
            "tokenizer_config.json",
        ),
    ] {
        std::fs::copy(&from, tok.join(name)).expect("copy tokenizer file");
    }
    dir
}

/// The flex device the numeric tests run on.
pub fn device() -> burn::tensor::Device {
    kiln_nn::parse_device("flex").expect("flex is the default feature")
}
