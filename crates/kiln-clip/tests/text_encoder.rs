//! Text-encoder parity with transformers' CLIPTextModel on tiny random-weight models.

mod common;

use burn::tensor::{Int, Tensor};
use common::{device, fixtures};
use kiln_clip::ClipTextModel;
use kiln_nn::reference::{Reference, max_relative_error, tolerance};

/// A forward pass in f32 against the reference in f32: the bound, and why it holds on any CPU
/// or thread count, is [`tolerance::FORWARD`].
const TOLERANCE: f32 = tolerance::FORWARD;

fn check(model: &ClipTextModel, expected: &Reference) {
    let device = device();
    let ids: Tensor<2> = expected.tensor("input_ids", &device).unwrap();
    let ids: Tensor<2, Int> = ids.int();
    for (clip_skip, name) in [(0, "last_hidden_state"), (1, "clip_skip_1")] {
        let out = model.forward(ids.clone(), clip_skip).unwrap();
        let want: Tensor<3> = expected.tensor(name, &device).unwrap();
        let err = max_relative_error(&out.hidden_state, &want);
        eprintln!("{name}: max relative error {err:.2e}");
        assert!(err < TOLERANCE, "{name}: max relative error {err}");
        if clip_skip == 0 {
            let pooled: Tensor<2> = expected.tensor("pooler_output", &device).unwrap();
            let err = max_relative_error(&out.pooled, &pooled);
            assert!(err < TOLERANCE, "pooler_output: max relative error {err}");
        }
    }
}

#[test]
fn sd1_style_quick_gelu_matches_transformers() {
    let dir = fixtures().join("te-sd1");
    let model = ClipTextModel::from_dir(&dir, &device()).unwrap();
    check(
        &model,
        &Reference::open(&dir.join("expected.safetensors")).unwrap(),
    );
}

#[test]
fn sd2_style_gelu_matches_transformers() {
    let dir = fixtures().join("te-sd2");
    let model = ClipTextModel::from_dir(&dir, &device()).unwrap();
    check(
        &model,
        &Reference::open(&dir.join("expected.safetensors")).unwrap(),
    );
}

#[test]
fn fp16_file_with_text_model_prefix_loads() {
    let dir = fixtures().join("te-sd1");
    let config = kiln_clip::ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
    let model = ClipTextModel::new(&config, &device())
        .load(&dir.join("model.fp16.safetensors"))
        .unwrap();
    check(
        &model,
        &Reference::open(&dir.join("expected.fp16.safetensors")).unwrap(),
    );
}

#[test]
fn bf16_file_loads() {
    let dir = fixtures().join("te-sd2");
    let config = kiln_clip::ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
    let model = ClipTextModel::new(&config, &device())
        .load(&dir.join("model.bf16.safetensors"))
        .unwrap();
    check(
        &model,
        &Reference::open(&dir.join("expected.bf16.safetensors")).unwrap(),
    );
}

#[test]
fn a_wrong_weight_changes_the_output() {
    // The fp16 weights must not pass the f32 reference: the parity check can fail.
    let dir = fixtures().join("te-sd2");
    let config = kiln_clip::ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
    let model = ClipTextModel::new(&config, &device())
        .load(&dir.join("model.bf16.safetensors"))
        .unwrap();
    let expected = Reference::open(&dir.join("expected.safetensors")).unwrap();
    let ids: Tensor<2> = expected.tensor("input_ids", &device()).unwrap();
    let out = model.forward(ids.int(), 0).unwrap();
    let want: Tensor<3> = expected.tensor("last_hidden_state", &device()).unwrap();
    assert!(max_relative_error(&out.hidden_state, &want) > TOLERANCE);
}

#[test]
fn windows_are_encoded_separately_and_concatenated() {
    let dir = fixtures().join("te-sd1");
    let device = device();
    let model = ClipTextModel::from_dir(&dir, &device).unwrap();
    let a: Vec<u32> = (0..77).map(|i| (i * 7 % 990) as u32).collect();
    let b: Vec<u32> = (0..77).map(|i| (i * 13 % 990) as u32).collect();
    let windows = kiln_clip::PromptWindows {
        ids: vec![a.clone(), b.clone()],
        weights: vec![vec![1.0; 77]; 2],
        num_tokens: 150,
    };
    let both = model.encode_windows(&windows, 0, &device).unwrap();
    let first_out = model
        .encode_ids(std::slice::from_ref(&a), 0, &device)
        .unwrap();
    assert!(max_relative_error(&both.pooled, &first_out.pooled) < 1e-6);
    let both = both.hidden_state;
    assert_eq!(both.dims(), [1, 154, 32]);
    let first = model.encode_ids(&[a], 0, &device).unwrap().hidden_state;
    let second = model.encode_ids(&[b], 0, &device).unwrap().hidden_state;
    let joined = Tensor::cat(vec![first, second], 1);
    assert!(max_relative_error(&both, &joined) < 1e-6);
}

/// SDXL's text encoders (`xtask/fixtures/sdxl.py`): the penultimate hidden states without the
/// final layer norm ([`HiddenLayer::Raw`]) of both, and the second one's `text_projection` of
/// the pooled output, against the halves of diffusers' `StableDiffusionXLPipeline.encode_prompt`.
#[test]
fn sdxl_encoders_match_diffusers_encode_prompt() {
    use kiln_clip::{ClipTokenizer, HiddenLayer};
    let device = device();
    let dir = fixtures().join("../sdxl/base");
    let expected = Reference::open(&dir.join("../expected.safetensors")).unwrap();
    let prompt = "a photo of an astronaut riding a horse";
    for (case, skip) in [("base", 0), ("base_skip1", 1)] {
        let embeds: Tensor<3> = expected
            .tensor(&format!("encode.{case}.prompt_embeds"), &device)
            .unwrap();
        for (i, sub) in ["", "_2"].iter().enumerate() {
            let tokenizer = ClipTokenizer::from_dir(dir.join(format!("tokenizer{sub}"))).unwrap();
            let model =
                ClipTextModel::from_dir(dir.join(format!("text_encoder{sub}")), &device).unwrap();
            assert_eq!(model.text_projection.is_some(), i == 1);
            let ids = tokenizer.encode(prompt).unwrap();
            let out = model
                .encode_ids(&[ids], HiddenLayer::Raw(skip + 1), &device)
                .unwrap();
            let width = model.config().hidden_size;
            let want = embeds
                .clone()
                .slice([0..1, 0..77, i * width..(i + 1) * width]);
            let err = max_relative_error(&out.hidden_state, &want);
            eprintln!("{case} encoder {i}: max relative error {err:.2e}");
            assert!(err < TOLERANCE, "{case} encoder {i}: {err}");
            if i == 1 {
                let pooled: Tensor<2> = expected
                    .tensor(&format!("encode.{case}.pooled"), &device)
                    .unwrap();
                let err = max_relative_error(&out.text_embeds.unwrap(), &pooled);
                assert!(err < TOLERANCE, "{case} text_embeds: {err}");
            } else {
                assert!(out.text_embeds.is_none());
            }
        }
    }
}
