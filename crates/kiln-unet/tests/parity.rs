//! Parity of `UNet2DConditionModel` with diffusers on the tiny fixtures of
//! `xtask/fixtures/unet_vae.py`: SD 1.x style (`unet-sd1`: conv projections, one head count,
//! three blocks, two layers each) and SD 2.x style (`unet-sd2`: linear projections, per-block
//! head counts, upcast attention, 9 input channels), every parameter randomised, latents 16x24.
//!
//! Error measure: `max |kiln - diffusers| / max |diffusers|` over the whole output
//! ([`max_relative_error`]); tolerance [`TOL`] in f32.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{DType, Device, Tensor};
use kiln_nn::reference::{Reference, max_relative_error, tolerance};
use kiln_unet::{Error, UNet2DConditionModel};

/// A forward pass in f32 against the reference in f32: the bound, and why it holds on any CPU
/// or thread count, is [`tolerance::FORWARD`].
const TOL: f32 = tolerance::FORWARD;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

struct Case {
    device: Device,
    unet: UNet2DConditionModel,
    io: Reference,
}

impl Case {
    fn load(name: &str) -> Self {
        let device = Device::default();
        let dir = fixture_dir(name);
        let unet =
            UNet2DConditionModel::from_pretrained(&dir.join("unet"), DType::F32, &device).unwrap();
        let io = Reference::open(&dir.join("io.safetensors")).unwrap();
        Self { device, unet, io }
    }

    fn inputs(&self) -> (Tensor<4>, Tensor<1>, Tensor<3>) {
        (
            self.io.tensor("sample", &self.device).unwrap(),
            self.io.tensor("timestep", &self.device).unwrap(),
            self.io
                .tensor("encoder_hidden_states", &self.device)
                .unwrap(),
        )
    }

    fn check_parity(&self, name: &str) {
        let (sample, t, context) = self.inputs();
        let out = self.unet.forward(sample, t, context).unwrap();
        let expected: Tensor<4> = self.io.tensor("output", &self.device).unwrap();
        let err = max_relative_error(&out, &expected);
        eprintln!("{name}: max relative error {err:.3e}");
        assert!(err < TOL, "{name}: relative error {err} >= {TOL}");
    }
}

#[test]
fn sd1_style_matches_diffusers() {
    let case = Case::load("unet-sd1");
    // Parameter count printed by the fixture script (diffusers' `sum(p.numel())`).
    assert_eq!(case.unet.num_params(), 551_028);
    case.check_parity("unet-sd1");
}

#[test]
fn sd2_style_matches_diffusers() {
    let case = Case::load("unet-sd2");
    assert_eq!(case.unet.num_params(), 794_404);
    assert!(case.unet.config.use_linear_projection && case.unet.config.upcast_attention);
    case.check_parity("unet-sd2");
}

/// Latent sizes that two downsamplers cannot halve evenly (18x13: 18 -> 9 -> 5, 13 -> 7 -> 4)
/// run as in diffusers, whose upsamplers then interpolate to the skip connections' sizes
/// (`xtask/fixtures/unet_vae_odd_sizes.py`).
#[test]
fn odd_latent_sizes_match_diffusers() {
    for name in ["unet-sd1", "unet-sd2"] {
        let case = Case::load(name);
        let io = Reference::open(&fixture_dir(name).join("odd.safetensors")).unwrap();
        let d = &case.device;
        let sample: Tensor<4> = io.tensor("sample", d).unwrap();
        assert_eq!(sample.dims()[2..], [18, 13]);
        let out = case
            .unet
            .forward(
                sample,
                io.tensor("timestep", d).unwrap(),
                io.tensor("encoder_hidden_states", d).unwrap(),
            )
            .unwrap();
        let expected: Tensor<4> = io.tensor("output", d).unwrap();
        let err = max_relative_error(&out, &expected);
        eprintln!("{name} at 18x13: max relative error {err:.3e}");
        assert!(err < TOL, "{name}: relative error {err} >= {TOL}");
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let case = Case::load("unet-sd1");
    let (sample, t, context) = case.inputs();
    let d = &case.device;

    let wrong_channels = Tensor::<4>::zeros([2, 9, 16, 24], d);
    assert!(matches!(
        case.unet
            .forward(wrong_channels, t.clone(), context.clone()),
        Err(Error::InputShape { name: "sample", .. })
    ));

    let empty = Tensor::<4>::zeros([2, 4, 0, 24], d);
    assert!(matches!(
        case.unet.forward(empty, t.clone(), context.clone()),
        Err(Error::SpatialSize {
            height: 0,
            width: 24
        })
    ));

    let wrong_width = Tensor::<3>::zeros([2, 7, 32], d);
    assert!(matches!(
        case.unet.forward(sample.clone(), t.clone(), wrong_width),
        Err(Error::InputShape {
            name: "encoder_hidden_states",
            ..
        })
    ));

    let wrong_timesteps = Tensor::<1>::zeros([3], d);
    assert!(matches!(
        case.unet.forward(sample, wrong_timesteps, context),
        Err(Error::InputShape {
            name: "timesteps",
            ..
        })
    ));
}

#[test]
fn one_timestep_is_broadcast_over_the_batch() {
    let case = Case::load("unet-sd1");
    let (sample, _, context) = case.inputs();
    let d = &case.device;
    let one = Tensor::<1>::from_floats([500.0], d);
    let both = Tensor::<1>::from_floats([500.0, 500.0], d);
    let a = case
        .unet
        .forward(sample.clone(), one, context.clone())
        .unwrap();
    let b = case.unet.forward(sample, both, context).unwrap();
    assert_eq!(max_relative_error(&a, &b), 0.0);
}

#[test]
fn unsupported_and_inconsistent_configs_are_rejected() {
    let text = std::fs::read_to_string(fixture_dir("unet-sd2").join("unet/config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let parse = |json: &serde_json::Value| -> kiln_unet::Result<()> {
        let config: kiln_unet::UNet2DConditionModelConfig =
            serde_json::from_value(json.clone()).unwrap();
        config.validate()
    };
    parse(&json).unwrap();

    json["attention_head_dim"] = serde_json::json!([2, 4, 8]);
    assert!(
        matches!(parse(&json), Err(Error::InvalidConfig(m)) if m.contains("attention_head_dim"))
    );

    json["attention_head_dim"] = serde_json::json!([3, 4]);
    assert!(matches!(parse(&json), Err(Error::InvalidConfig(m)) if m.contains("heads")));

    json["attention_head_dim"] = serde_json::json!([2, 4]);
    json["addition_embed_type"] = serde_json::json!("text_time");
    assert!(
        matches!(parse(&json), Err(Error::InvalidConfig(m)) if m.contains("addition_embed_type"))
    );

    // An unknown block type fails when the config is read.
    json["addition_embed_type"] = serde_json::Value::Null;
    json["down_block_types"] = serde_json::json!(["CrossAttnDownBlock2D", "AttnDownBlock2D"]);
    assert!(serde_json::from_value::<kiln_unet::UNet2DConditionModelConfig>(json).is_err());
}

/// Weights converted to f16 as they load, activations in f16, attention upcast to f32 (SD 2.x
/// style): the output stays close to the f32 reference (f16 rounding only).
#[test]
fn f16_run_is_close_to_f32() {
    let device = Device::default();
    let dir = fixture_dir("unet-sd2");
    let unet =
        UNet2DConditionModel::from_pretrained(&dir.join("unet"), DType::F16, &device).unwrap();
    let io = Reference::open(&dir.join("io.safetensors")).unwrap();
    let sample: Tensor<4> = io.tensor("sample", &device).unwrap();
    let t: Tensor<1> = io.tensor("timestep", &device).unwrap();
    let context: Tensor<3> = io.tensor("encoder_hidden_states", &device).unwrap();
    let out = unet
        .forward(sample.cast(DType::F16), t, context.cast(DType::F16))
        .unwrap();
    assert_eq!(out.dtype(), DType::F16);
    let expected: Tensor<4> = io.tensor("output", &device).unwrap();
    let err = max_relative_error(&out.cast(DType::F32), &expected);
    eprintln!("unet-sd2 in f16: max relative error {err:.3e}");
    // Measured: 2.1e-3 on flex, 7.8e-3 on wgpu/lavapipe.
    assert!(err < 2e-2, "f16: relative error {err}");
}

/// SDXL's UNets (`xtask/fixtures/sdxl.py`): the base's `text_time` embedding over a pooled text
/// embedding and six time ids, the refiner's over five (aesthetic score), no attention in the
/// first block and two transformer layers in the second, against diffusers with
/// `added_cond_kwargs`.
#[test]
fn sdxl_unets_match_diffusers() {
    let device = Device::default();
    let dir = fixture_dir("sdxl");
    let io = Reference::open(&dir.join("expected.safetensors")).unwrap();
    for (name, folder) in [("unet", "base"), ("refiner_unet", "refiner")] {
        let unet = UNet2DConditionModel::from_pretrained(
            &dir.join(folder).join("unet"),
            DType::F32,
            &device,
        )
        .unwrap();
        assert!(unet.add_embedding.is_some());
        let t = |key: &str| format!("{name}.{key}");
        let added = kiln_unet::AddedConditioning {
            text_embeds: io.tensor(&t("text_embeds"), &device).unwrap(),
            time_ids: io.tensor(&t("time_ids"), &device).unwrap(),
        };
        let out = unet
            .forward_with(
                io.tensor(&t("sample"), &device).unwrap(),
                io.tensor(&t("timestep"), &device).unwrap(),
                io.tensor(&t("context"), &device).unwrap(),
                &kiln_unet::ExtraConditioning {
                    added: Some(added.clone()),
                    ..Default::default()
                },
            )
            .unwrap();
        let expected: Tensor<4> = io.tensor(&t("output"), &device).unwrap();
        let err = max_relative_error(&out, &expected);
        eprintln!("sdxl {name}: max relative error {err:.3e}");
        assert!(err < TOL, "sdxl {name}: relative error {err} >= {TOL}");

        // without the added conditioning, or with time ids of the wrong count: typed errors
        let sample: Tensor<4> = io.tensor(&t("sample"), &device).unwrap();
        let timestep: Tensor<1> = io.tensor(&t("timestep"), &device).unwrap();
        let context: Tensor<3> = io.tensor(&t("context"), &device).unwrap();
        let err = unet
            .forward(sample.clone(), timestep.clone(), context.clone())
            .unwrap_err();
        assert!(err.to_string().contains("forward_with"), "{err}");
        let n = added.time_ids.dims()[1];
        let short = kiln_unet::AddedConditioning {
            time_ids: added.time_ids.clone().slice([0..2, 0..n - 1]),
            ..added.clone()
        };
        let err = unet
            .forward_with(
                sample,
                timestep,
                context,
                &kiln_unet::ExtraConditioning {
                    added: Some(short),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InputShape {
                    name: "time_ids",
                    ..
                }
            ),
            "{err}"
        );
    }
}
