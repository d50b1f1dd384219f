//! LoRAs against diffusers' `load_lora_weights` / `set_adapters` / `fuse_lora` on the tiny
//! pipelines (`fixtures/lora/`, `xtask/fixtures/lora.py`), both file layouts, several at once;
//! unfusing restores the weights bit for bit; bad files are refused with the file and the key.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::ModuleSnapshot;
use burn::tensor::Tensor;
use kiln_nn::reference::{Reference, tolerance};
use kiln_pipeline::{GenerateOptions, LoraOptions, StableDiffusionPipeline, images_to_rgb8};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    model: String,
    loras: Vec<(String, f32)>,
}

fn dir() -> PathBuf {
    common::root().join("fixtures/lora")
}

fn cases() -> Vec<Case> {
    serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap()
}

fn generate(pipe: &StableDiffusionPipeline, latents: Tensor<4>) -> Tensor<4> {
    let options = GenerateOptions::new("a photo of an astronaut riding a horse")
        .with_negative_prompt("blurry")
        .with_steps(4)
        .with_size(48, 32)
        .with_latents(latents);
    common::ddim(pipe, &options)
}

fn max_diff(a: &Tensor<4>, b: &Tensor<4>) -> f32 {
    (a.clone() - b.clone()).abs().max().into_scalar()
}

fn byte_diff(a: &Tensor<4>, b: &Tensor<4>) -> u8 {
    let (a, b) = (images_to_rgb8(a).unwrap(), images_to_rgb8(b).unwrap());
    a.iter()
        .zip(&b)
        .flat_map(|(x, y)| x.data.iter().zip(&y.data).map(|(p, q)| p.abs_diff(*q)))
        .max()
        .unwrap()
}

/// Every weight of a module, as bits.
fn bits<M: Module>(module: &M) -> BTreeMap<String, Vec<u8>> {
    module
        .collect(None, None, true)
        .into_iter()
        .map(|t| {
            let data = burn::store::bridge::to_data(&t).unwrap();
            (t.name.clone(), data.into_bytes().to_vec())
        })
        .collect()
}

#[test]
fn loras_match_diffusers_in_both_layouts() {
    let device = common::device();
    let reference = Reference::open(&dir().join("expected.safetensors")).unwrap();
    let mut failures = Vec::new();
    for case in cases() {
        let (_model, mut pipe) = common::load(&case.model);
        for (name, scale) in &case.loras {
            let loaded = pipe
                .load_lora(
                    &dir().join(format!("{name}.safetensors")),
                    *scale,
                    LoraOptions::default(),
                )
                .unwrap();
            assert!(loaded.unet_layers > 0 && loaded.text_encoder_layers > 0);
        }
        pipe.fuse_loras().unwrap();
        let latents = reference
            .tensor::<4>(&format!("{}.latents", case.name), &device)
            .unwrap();
        let image = generate(&pipe, latents);
        let want = reference
            .tensor::<4>(&format!("{}.image", case.name), &device)
            .unwrap();
        let none = reference
            .tensor::<4>(&format!("{}_none.image", case.model), &device)
            .unwrap();
        let (float, bytes) = (max_diff(&image, &want), byte_diff(&image, &want));
        eprintln!("{}: max |float diff| {float:.2e}, 8-bit {bytes}", case.name);
        assert!(
            max_diff(&want, &none) > 0.05,
            "{}: the LoRA changes the image",
            case.name
        );
        if float > tolerance::IMAGE || bytes > tolerance::levels(tolerance::IMAGE) {
            failures.push(format!("{}: {float:e} / {bytes}", case.name));
        }
    }
    assert!(failures.is_empty(), "beyond tolerance: {failures:?}");
}

#[test]
fn unfuse_restores_the_weights_bit_for_bit_and_scales_refuse() {
    let (_model, mut pipe) = common::load("sd1");
    let (unet, text) = (bits(&pipe.unet), bits(&pipe.text_encoder));
    for name in ["sd1-peft", "sd1-kohya"] {
        pipe.load_lora(
            &dir().join(format!("{name}.safetensors")),
            0.7,
            LoraOptions::default(),
        )
        .unwrap();
    }
    pipe.fuse_loras().unwrap();
    assert!(pipe.loras_fused());
    assert_ne!(bits(&pipe.unet), unet);
    assert_ne!(bits(&pipe.text_encoder), text);
    // a new scale refuses from the original weights, not on top of the fused ones
    pipe.set_lora_scale("sd1-peft", 0.0).unwrap();
    pipe.set_lora_scale("sd1-kohya", 0.0).unwrap();
    pipe.fuse_loras().unwrap();
    pipe.unfuse_loras().unwrap();
    assert!(!pipe.loras_fused());
    assert_eq!(bits(&pipe.unet), unet, "UNet restored exactly");
    assert_eq!(
        bits(&pipe.text_encoder),
        text,
        "text encoder restored exactly"
    );
    assert!(pipe.set_lora_scale("nope", 1.0).is_err());
}

/// The older diffusers layouts (`.lora.down.weight`, attention processors' `to_q_lora`, the
/// text encoder's `text_model.` prefix) hold the same factors as the PEFT file and give the same
/// weights.
#[test]
fn older_diffusers_layouts_load_as_peft() {
    let peft = kiln_nn::reference::read_tensors(&dir().join("sd1-peft.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let old = tmp.path().join("old.safetensors");
    let renamed: Vec<(String, burn::tensor::TensorData)> = peft
        .into_iter()
        .map(|(k, v)| {
            // older files also keep transformers' `text_model.` prefix
            let k = k
                .replace(".lora_A.weight", ".lora.down.weight")
                .replace(".lora_B.weight", ".lora.up.weight")
                .replace("text_encoder.encoder.", "text_encoder.text_model.encoder.");
            // attention processors: `attn1.to_q.lora.down` -> `attn1.processor.to_q_lora.down`
            let k = match k.split_once(".attn1.to_q.lora.") {
                Some((a, b)) => format!("{a}.attn1.processor.to_q_lora.{b}"),
                None => k,
            };
            (k, v)
        })
        .collect();
    write(&old, &renamed);
    let fused = |path: &Path| {
        let (_model, mut pipe) = common::load("sd1");
        pipe.load_lora(path, 1.0, LoraOptions::default()).unwrap();
        pipe.fuse_loras().unwrap();
        (bits(&pipe.unet), bits(&pipe.text_encoder))
    };
    assert_eq!(fused(&old), fused(&dir().join("sd1-peft.safetensors")));
}

fn write(path: &Path, tensors: &[(String, burn::tensor::TensorData)]) {
    use safetensors::tensor::{Dtype, TensorView};
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, d)| {
            let dtype = match d.dtype() {
                burn::tensor::DType::F16 => Dtype::F16,
                _ => Dtype::F32,
            };
            (
                k.clone(),
                TensorView::new(dtype, d.shape().to_vec(), d.as_bytes()).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn bad_loras_name_the_file_and_the_key() {
    let (_model, mut pipe) = common::load("sd1");
    let unet = bits(&pipe.unet);
    let tensors = kiln_nn::reference::read_tensors(&dir().join("sd1-kohya.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // factors of another width (a LoRA for another architecture)
    let mut wide: Vec<(String, burn::tensor::TensorData)> = tensors.clone().into_iter().collect();
    let (key, data) = wide
        .iter_mut()
        .find(|(k, _)| k.ends_with("attn2_to_k.lora_down.weight"))
        .unwrap();
    *data = burn::tensor::TensorData::new(vec![0f32; 4 * 5], [4, 5]);
    let stem = key.trim_end_matches(".lora_down.weight").to_string();
    let wide_file = tmp.path().join("wide.safetensors");
    write(&wide_file, &wide);
    let err = pipe
        .load_lora(&wide_file, 1.0, LoraOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("wide.safetensors") && err.contains(&stem) && err.contains("do not fit"),
        "{err}"
    );
    // an unknown key: refused, or skipped and listed when allowed
    let mut extra: Vec<(String, burn::tensor::TensorData)> = tensors.clone().into_iter().collect();
    extra.push((
        "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a".into(),
        burn::tensor::TensorData::new(vec![0f32; 4], [2, 2]),
    ));
    let unknown = tmp.path().join("unknown.safetensors");
    write(&unknown, &extra);
    let err = pipe
        .load_lora(&unknown, 1.0, LoraOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown.safetensors") && err.contains("hada_w1_a"),
        "{err}"
    );
    let loaded = pipe
        .load_lora(
            &unknown,
            1.0,
            LoraOptions {
                allow_unknown_keys: true,
            },
        )
        .unwrap();
    assert_eq!(
        loaded.skipped(),
        ["lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a"]
    );
    pipe.clear_loras().unwrap();

    // a key that matches no module
    let mut renamed: Vec<(String, burn::tensor::TensorData)> =
        tensors.clone().into_iter().collect();
    for (k, _) in renamed.iter_mut() {
        *k = k.replace(
            "down_blocks_0_attentions_0_proj_in",
            "down_blocks_7_attentions_0_proj_in",
        );
    }
    let nomatch = tmp.path().join("nomatch.safetensors");
    write(&nomatch, &renamed);
    let err = pipe
        .load_lora(&nomatch, 1.0, LoraOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("down_blocks_7") && err.contains("matches no layer"),
        "{err}"
    );

    // a NaN: refused when fusing, and nothing changes
    let mut nan: Vec<(String, burn::tensor::TensorData)> = tensors.into_iter().collect();
    let (key, data) = nan
        .iter_mut()
        .find(|(k, _)| k.ends_with("attn2_to_k.lora_up.weight"))
        .unwrap();
    let mut values = data.clone().convert::<f32>().try_into_vec::<f32>().unwrap();
    values[3] = f32::NAN;
    *data = burn::tensor::TensorData::new(values, data.shape().clone());
    let key = key.clone();
    let nan_file = tmp.path().join("nan.safetensors");
    write(&nan_file, &nan);
    pipe.load_lora(&nan_file, 1.0, LoraOptions::default())
        .unwrap();
    let err = pipe.fuse_loras().unwrap_err().to_string();
    let stem = key.trim_end_matches(".lora_up.weight");
    assert!(
        err.contains("nan.safetensors") && err.contains(stem) && err.contains("NaN"),
        "{err}"
    );
    assert!(!pipe.loras_fused());
    assert_eq!(
        bits(&pipe.unet),
        unet,
        "a failed fuse leaves the weights alone"
    );

    // a pickle file that is not a checkpoint
    let pickle = tmp.path().join("lora.pt");
    std::fs::write(&pickle, b"not really").unwrap();
    let err = pipe
        .load_lora(&pickle, 1.0, LoraOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lora.pt") && err.contains("not a PyTorch checkpoint"),
        "{err}"
    );
}

/// diffusers' `pytorch_lora_weights.bin` layout (`fixtures/pickle/sd1-peft.bin`, the PEFT
/// fixture pickled) fuses to the same weights as the safetensors file.
#[test]
fn pickle_loras_fuse_as_their_safetensors_twins() {
    let fused = |path: &Path| {
        let (_model, mut pipe) = common::load("sd1");
        pipe.load_lora(path, 0.8, LoraOptions::default()).unwrap();
        pipe.fuse_loras().unwrap();
        (bits(&pipe.unet), bits(&pipe.text_encoder))
    };
    let pickle = common::root().join("fixtures/pickle/sd1-peft.bin");
    assert_eq!(fused(&pickle), fused(&dir().join("sd1-peft.safetensors")));
}
