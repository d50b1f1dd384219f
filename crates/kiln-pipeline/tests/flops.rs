//! The FLOP counts `kiln bench` reports (`flops()` of the UNet, `encode_flops` / `decode_flops`
//! of the VAE, `flops()` of the text encoder) equal PyTorch's `FlopCounterMode` counts of
//! diffusers' and transformers' models of the same configs (`fixtures/flops.json`, from
//! `xtask/fixtures/flops.py`), for the presets and the tiny fixtures, odd sizes included.

use std::path::{Path, PathBuf};

use kiln_clip::ClipTextModel;
use kiln_pipeline::Preset;
use kiln_unet::{UNet2DConditionModel, UNet2DConditionModelConfig};
use kiln_vae::{AutoencoderKL, AutoencoderKLConfig};
use serde::Deserialize;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[derive(Deserialize)]
struct Case {
    model: String,
    config: String,
    batch: usize,
    #[serde(default)]
    height: usize,
    #[serde(default)]
    width: usize,
    #[serde(default)]
    tokens: usize,
    flops: u64,
}

fn unet_config(name: &str) -> UNet2DConditionModelConfig {
    match name {
        "sd15" => Preset::Sd15.configs().unwrap().unet,
        "sd21" => Preset::Sd21.configs().unwrap().unet,
        "sdxl" => Preset::Sdxl.configs().unwrap().unet,
        tiny => {
            let kind = tiny.trim_start_matches("tiny-");
            UNet2DConditionModelConfig::from_file(
                &root().join(format!("fixtures/pipeline/{kind}/unet/config.json")),
            )
            .unwrap()
        }
    }
}

fn vae_config(name: &str) -> AutoencoderKLConfig {
    match name {
        "sd15" => Preset::Sd15.configs().unwrap().vae,
        _ => AutoencoderKLConfig::from_file(&root().join("fixtures/pipeline/sd1/vae/config.json"))
            .unwrap(),
    }
}

#[test]
fn flop_counts_equal_pytorchs() {
    let device = kiln_nn::parse_device("flex").unwrap();
    let text = std::fs::read_to_string(root().join("fixtures/flops.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let ours = match case.model.as_str() {
            "unet" => UNet2DConditionModel::new(&unet_config(&case.config), &device)
                .unwrap()
                .flops(case.batch, case.height, case.width, case.tokens),
            "vae-decode" => AutoencoderKL::new(&vae_config(&case.config), &device)
                .unwrap()
                .decode_flops(case.batch, case.height, case.width),
            "vae-encode" => AutoencoderKL::new(&vae_config(&case.config), &device)
                .unwrap()
                .encode_flops(case.batch, case.height, case.width),
            "text-encoder" => {
                let preset: Preset = case.config.parse().unwrap();
                ClipTextModel::new(&preset.configs().unwrap().text_encoder, &device)
                    .flops(case.batch, case.tokens)
            }
            other => panic!("unknown model {other}"),
        };
        assert_eq!(
            ours, case.flops,
            "{} {} batch {} {}x{}: Kiln counts {ours}, PyTorch {}",
            case.model, case.config, case.batch, case.height, case.width, case.flops
        );
    }
}
