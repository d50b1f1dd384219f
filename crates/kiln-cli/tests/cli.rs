//! The `kiln` binary as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::tensor::Tensor;
use kiln_nn::reference::{Reference, max_relative_error, tolerance};

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/clip/model-fullvocab")
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run kiln")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn tokenize_prints_the_77_ids_as_json() {
    let out = kiln(&[
        "tokenize",
        "--model",
        model().to_str().unwrap(),
        "--prompt",
        "a photo of a cat",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u64> = json["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[..7], [49406, 320, 1125, 539, 320, 2368, 49407]);
    assert!(ids[7..].iter().all(|&id| id == 49407));
    assert_eq!(json["tokens"][2], "photo</w>");
    assert_eq!(json["truncated"], false);
}

#[test]
fn tokenize_keeps_long_prompts_in_windows() {
    let prompt = "a photo of a cat, ".repeat(30);
    let out = kiln(&[
        "tokenize",
        "--model",
        model().to_str().unwrap(),
        "--prompt",
        &prompt,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["truncated"], true);
    assert_eq!(json["num_tokens"], 180);
    let windows = json["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 3);
    assert!(windows.iter().all(|w| w.as_array().unwrap().len() == 77));
}

/// `kiln encode` of `prompt` with `model` on flex, skipping `skip` layers, over `output`; the
/// embeddings it wrote.
fn encode(model: &Path, prompt: &str, skip: &str, output: &Path) -> Reference {
    let out = kiln(&[
        "encode",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--device",
        "flex",
        "--clip-skip",
        skip,
        "--output",
        output.to_str().unwrap(),
        "--overwrite",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    Reference::open(output).unwrap()
}

#[test]
fn encode_writes_transformers_equal_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("embeds.safetensors");
    let expected = Reference::open(&model().join("expected.safetensors")).unwrap();
    let prompt = "a photo of an astronaut riding a horse on mars";
    let device = kiln_nn::parse_device("flex").unwrap();
    for (skip, name) in [("0", "prompt_embeds"), ("1", "prompt_embeds_clip_skip_1")] {
        let got = encode(&model(), prompt, skip, &output);
        let a: Tensor<3> = got.tensor("prompt_embeds", &device).unwrap();
        let b: Tensor<3> = expected.tensor(name, &device).unwrap();
        assert_eq!(a.dims(), [1, 77, 8]);
        let err = max_relative_error(&a, &b);
        // a text-encoder forward pass: [`tolerance::FORWARD`] says why this bound holds anywhere
        assert!(err < tolerance::FORWARD, "{name}: max relative error {err}");
    }
    // No temporary file is left beside the output.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

/// An SDXL folder is encoded by both its text encoders and the refiner's by its one, as
/// diffusers' `encode_prompt` does (`fixtures/sdxl/expected.safetensors`, `xtask/fixtures/sdxl.py`).
#[test]
fn encode_uses_every_sdxl_text_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("embeds.safetensors");
    let sdxl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sdxl");
    let expected = Reference::open(&sdxl.join("expected.safetensors")).unwrap();
    let device = kiln_nn::parse_device("flex").unwrap();
    for (folder, skip, name) in [
        ("base", "0", "base"),
        ("base", "1", "base_skip1"),
        ("refiner", "0", "refiner"),
    ] {
        let prompt = "a photo of an astronaut riding a horse";
        let got = encode(&sdxl.join(folder), prompt, skip, &output);
        let embeds: Tensor<3> = got.tensor("prompt_embeds", &device).unwrap();
        let pooled: Tensor<2> = got.tensor("pooled_prompt_embeds", &device).unwrap();
        let want_embeds: Tensor<3> = expected
            .tensor(&format!("encode.{name}.prompt_embeds"), &device)
            .unwrap();
        let want_pooled: Tensor<2> = expected
            .tensor(&format!("encode.{name}.pooled"), &device)
            .unwrap();
        assert_eq!(embeds.dims(), want_embeds.dims(), "{name}");
        assert_eq!(pooled.dims(), want_pooled.dims(), "{name}");
        for (what, err) in [
            ("prompt_embeds", max_relative_error(&embeds, &want_embeds)),
            ("pooled", max_relative_error(&pooled, &want_pooled)),
        ] {
            // a text-encoder forward pass: [`tolerance::FORWARD`] says why this bound holds
            assert!(
                err < tolerance::FORWARD,
                "{name} {what}: max relative error {err}"
            );
        }
    }
}

#[test]
fn tokenize_shows_both_sdxl_tokenizers() {
    let sdxl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sdxl");
    let run = |folder: &str| -> serde_json::Value {
        let out = kiln(&[
            "tokenize",
            "--model",
            sdxl.join(folder).to_str().unwrap(),
            "--prompt",
            "a cat",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let base = run("base");
    let refiner = run("refiner");
    assert_eq!(base["input_ids"].as_array().unwrap().len(), 77);
    // the refiner's one tokenizer is the base's second
    assert_eq!(base["tokenizer_2"]["input_ids"], refiner["input_ids"]);
    assert!(refiner.get("tokenizer_2").is_none());
    // the same words; the second pads with `!` where the first pads with the end token
    let ids = |v: &serde_json::Value| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    let (first, second) = (
        ids(&base["input_ids"]),
        ids(&base["tokenizer_2"]["input_ids"]),
    );
    let words = base["num_tokens"].as_u64().unwrap() as usize + 2;
    assert_eq!(first[..words], second[..words]);
    assert!(
        first[words..]
            .iter()
            .zip(&second[words..])
            .all(|(a, b)| a != b)
    );
}

#[test]
fn existing_output_is_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("embeds.safetensors");
    std::fs::write(&output, b"keep me").unwrap();
    let out = kiln(&[
        "encode",
        "--model",
        model().to_str().unwrap(),
        "--prompt",
        "x",
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--overwrite"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&output).unwrap(), b"keep me");
}

#[test]
fn unknown_device_lists_the_compiled_ones() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("e.safetensors");
    let out = kiln(&[
        "encode",
        "--model",
        model().to_str().unwrap(),
        "--prompt",
        "x",
        "--device",
        "tpu:0",
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("tpu:0") && err.contains("flex"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    assert!(!output.exists());
}

#[test]
fn missing_model_folder_is_one_clear_line() {
    let out = kiln(&["tokenize", "--model", "/nonexistent/model", "--prompt", "x"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.starts_with("error: ") && err.contains("/nonexistent/model"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn devices_lists_flex() {
    let out = kiln(&["devices"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == "flex")
    );
}
