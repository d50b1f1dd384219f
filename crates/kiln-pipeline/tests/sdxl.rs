//! SDXL end to end against diffusers' `StableDiffusionXLPipeline` and
//! `StableDiffusionXLImg2ImgPipeline` on the tiny base and refiner of `fixtures/sdxl/`
//! (`xtask/fixtures/sdxl.py`): the conditioning (`encode_prompt`'s four outputs) and whole runs
//! with the same initial latents and the same random draws replayed, with the tolerances of the
//! SD 1.x / 2.x parity tests ([`tolerance::FORWARD`], [`tolerance::IMAGE`]).

mod common;

use burn::tensor::Tensor;
use common::{Case, check_case, run_case};
use kiln_nn::reference::{Reference, max_relative_error, tolerance};
use kiln_pipeline::{
    Error, GenerateOptions, LoadOptions, MicroConditioning, Mode, StableDiffusionPipeline,
};

fn sdxl() -> std::path::PathBuf {
    common::root().join("fixtures/sdxl")
}

fn load(model: &str) -> StableDiffusionPipeline {
    StableDiffusionPipeline::from_pretrained(
        &sdxl().join(model),
        LoadOptions::default(),
        &common::device(),
    )
    .unwrap()
}

#[test]
fn folders_load_as_sdxl_base_and_refiner() {
    let base = load("base");
    assert!(base.is_sdxl());
    assert_eq!(base.text_encoders().len(), 2);
    assert!(base.force_zeros_for_empty_prompt);
    assert_eq!(base.generation.guidance_scale, 5.0);
    // the refiner's folder has text_encoder_2/ alone: it is the refiner's one encoder
    let refiner = load("refiner");
    assert!(refiner.is_sdxl());
    assert_eq!(refiner.text_encoders().len(), 1);
    assert!(refiner.text_encoder.text_projection.is_some());
    assert!(!refiner.force_zeros_for_empty_prompt);
}

/// The context and pooled embeddings of every `encode.*` case: `[negative, positive]` halves
/// against diffusers' `encode_prompt`.
#[test]
fn conditioning_matches_diffusers_encode_prompt() {
    let device = common::device();
    let reference = Reference::open(&sdxl().join("expected.safetensors")).unwrap();
    let prompt = "a photo of an astronaut riding a horse";
    for (name, model, negative, skip) in [
        ("base", "base", "blurry", 0),
        ("base_zeros", "base", "", 0),
        ("base_skip1", "base", "blurry", 1),
        ("refiner", "refiner", "blurry", 0),
        ("refiner_empty", "refiner", "", 0),
    ] {
        let pipe = load(model);
        let options = GenerateOptions::new(prompt)
            .with_negative_prompt(negative)
            .with_clip_skip(skip)
            .with_size(48, 32)
            .with_guidance_scale(5.0);
        let c = pipe.conditioning(&options).unwrap();
        let added = c.extra.added.expect("SDXL has added conditioning");
        let t = |key: &str| {
            reference
                .tensor::<3>(&format!("encode.{name}.{key}"), &device)
                .unwrap()
        };
        let p = |key: &str| {
            reference
                .tensor::<2>(&format!("encode.{name}.{key}"), &device)
                .unwrap()
        };
        let half = |x: &Tensor<3>, i: usize| x.clone().narrow(0, i, 1);
        let half2 = |x: &Tensor<2>, i: usize| x.clone().narrow(0, i, 1);
        let mut checks = vec![
            (
                "prompt_embeds",
                max_relative_error(&half(&c.context, 1), &t("prompt_embeds")),
            ),
            (
                "pooled",
                max_relative_error(&half2(&added.text_embeds, 1), &p("pooled")),
            ),
        ];
        // diffusers encodes the negative prompt from the penultimate layer whatever the clip
        // skip; Kiln skips the same layers on both sides (docs/sdxl.md)
        if skip == 0 {
            checks.push((
                "negative_prompt_embeds",
                max_relative_error(&half(&c.context, 0), &t("negative_prompt_embeds")),
            ));
            checks.push((
                "negative_pooled",
                max_relative_error(&half2(&added.text_embeds, 0), &p("negative_pooled")),
            ));
        }
        for (what, err) in checks {
            eprintln!("{name} {what}: max relative error {err:.2e}");
            assert!(err < tolerance::FORWARD, "{name} {what}: {err}");
        }
        if name == "base_zeros" {
            let zero: f32 = half(&c.context, 0).abs().max().into_scalar();
            assert_eq!(zero, 0.0, "force_zeros_for_empty_prompt");
        }
        // time ids: [h, w, 0, 0, h, w] for the base, [h, w, 0, 0, score] for the refiner
        let ids: Vec<f32> = added
            .time_ids
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap();
        let expected: Vec<f32> = if model == "base" {
            [32.0, 48.0, 0.0, 0.0, 32.0, 48.0].repeat(2)
        } else {
            vec![32.0, 48.0, 0.0, 0.0, 2.5, 32.0, 48.0, 0.0, 0.0, 6.0]
        };
        assert_eq!(ids, expected, "{name} time ids");
    }
}

/// The cases of `cases.json`, with each one's `timestep_spacing` override and ensemble switch.
fn cases() -> Vec<(Case, Option<String>, Option<f64>)> {
    let text = std::fs::read_to_string(sdxl().join("cases.json")).unwrap();
    let values: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    values
        .into_iter()
        .map(|v| {
            let spacing = v["timestep_spacing"].as_str().map(str::to_string);
            let switch = v["switch"].as_f64();
            (serde_json::from_value(v).unwrap(), spacing, switch)
        })
        .collect()
}

/// txt2img (the SDXL-Turbo-style trailing, unguided one- and four-step runs among them),
/// img2img, inpainting (`StableDiffusionXLInpaintPipeline` on the base's 4-channel UNet, at
/// strength 1 from given latents and at 0.7 from drawn noise, and with a 9-channel inpainting
/// UNet), the refiner's img2img, and an
/// LCM-distilled base (`time_cond_proj_dim`: guidance 8 embedded, no classifier-free guidance)
/// with LCMScheduler.
#[test]
fn pipelines_match_diffusers_within_two_levels() {
    let cases = cases();
    assert!(cases.len() >= 10);
    assert!(cases.iter().any(|(c, ..)| c.mode == "inpaint"));
    assert!(cases.iter().any(|(c, ..)| c.model == "lcm"));
    assert!(cases.iter().any(|(c, ..)| c.model == "inpaint"));
    let reference = Reference::open(&sdxl().join("expected.safetensors")).unwrap();
    let mut failures = Vec::new();
    for model in ["base", "refiner", "lcm", "inpaint"] {
        for (case, spacing, _) in cases.iter().filter(|(c, ..)| c.model == model) {
            let mut pipe = load(model);
            if let Some(spacing) = spacing {
                pipe.scheduler_config.timestep_spacing =
                    serde_json::from_value(serde_json::Value::String(spacing.clone())).unwrap();
            }
            check_case(case, &pipe, &reference, &mut failures);
        }
    }
    assert!(failures.is_empty(), "beyond tolerance: {failures:?}");
}

/// Base + refiner ensembles: the base to `denoising_end`, its latents, then the refiner from
/// `denoising_start` on them, against diffusers (Euler, Euler-a with a negative prompt, and
/// second-order Heun, whose refiner half takes one step more to keep its pairs whole).
#[test]
fn ensembles_match_diffusers() {
    let device = common::device();
    let reference = Reference::open(&sdxl().join("expected.safetensors")).unwrap();
    let (base, refiner) = (load("base"), load("refiner"));
    let ensembles: Vec<_> = cases()
        .into_iter()
        .filter(|(c, ..)| c.model == "ensemble")
        .collect();
    assert_eq!(ensembles.len(), 3);
    for (case, _, switch) in ensembles {
        let switch = switch.unwrap();
        let t = |key: &str| {
            reference
                .tensor::<4>(&format!("{}.{key}", case.name), &device)
                .unwrap()
        };
        let sampler = match case.scheduler.as_str() {
            "default" => None,
            name => Some(name.parse::<kiln_scheduler::SamplerName>().unwrap()),
        };
        let draws: Vec<_> = (0..case.noise_draws)
            .map(|i| t(&format!("noise.{i}")))
            .collect();
        let mut noise = kiln_scheduler::QueuedNoise::new(draws);
        let options = GenerateOptions::new(&case.prompt)
            .with_negative_prompt(&case.negative)
            .with_guidance_scale(case.guidance)
            .with_steps(case.steps)
            .with_size(case.width, case.height);
        let mut scheduler = base
            .scheduler(sampler, kiln_scheduler::SamplerOptions::default())
            .unwrap();
        let middle = base
            .generate_latents(
                &mut scheduler,
                &options
                    .clone()
                    .with_latents(t("latents"))
                    .with_denoising_range(Some(switch), None),
                &mut noise,
                None,
            )
            .unwrap();
        let err = max_relative_error(&middle, &t("base_latents"));
        eprintln!("{}: base latents max relative error {err:.2e}", case.name);
        assert!(err < tolerance::FORWARD, "{}: {err}", case.name);
        let mut scheduler = refiner
            .scheduler(sampler, kiln_scheduler::SamplerOptions::default())
            .unwrap();
        let out = refiner
            .generate(
                &mut scheduler,
                &options
                    .with_mode(Mode::Img2Img {
                        image: middle,
                        strength: 1.0,
                    })
                    .with_denoising_range(None, Some(switch)),
                &mut noise,
                None,
            )
            .unwrap();
        assert_eq!(noise.remaining(), 0, "{}: unused recorded noise", case.name);
        let diff: f32 = (out.images - t("image")).abs().max().into_scalar();
        eprintln!("{}: max |float diff| {diff:.2e}", case.name);
        assert!(diff <= tolerance::IMAGE, "{}: {diff}", case.name);
    }
}

/// The micro-conditioning reaches the UNet: another original size gives another image.
#[test]
fn micro_conditioning_changes_the_image() {
    let device = common::device();
    let pipe = load("base");
    let latents = Tensor::<4>::ones([1, 4, 16, 24], &device) * 0.5;
    let options = GenerateOptions::new("a cat")
        .with_size(48, 32)
        .with_steps(2)
        .with_latents(latents);
    let plain = common::ddim(&pipe, &options);
    let cropped = common::ddim(
        &pipe,
        &options.clone().with_micro_conditioning(MicroConditioning {
            original_size: Some([512, 512]),
            crops_coords_top_left: [64, 0],
            ..Default::default()
        }),
    );
    let moved: f32 = (plain - cropped).abs().max().into_scalar();
    assert!(moved > 1e-4, "{moved}");
}

#[test]
fn bad_sdxl_requests_are_typed_errors() {
    let device = common::device();
    let pipe = load("base");
    // embeddings without their pooled embedding
    let embeds = Tensor::<3>::zeros([1, 77, 16], &device);
    let options = GenerateOptions::new("").with_prompt_embeds(embeds, None);
    let err = pipe.conditioning(&options).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput(m) if m.contains("pooled")),
        "{err}"
    );
    // a guidance-distilled UNet without its guidance embedding, a plain one given one
    let lcm = load("lcm");
    let sample = Tensor::<4>::zeros([1, 4, 16, 24], &device);
    let t = Tensor::<1>::from_floats([500.0], &device);
    let context = Tensor::<3>::zeros([1, 77, 16], &device);
    let added = kiln_pipeline::AddedConditioning {
        text_embeds: Tensor::zeros([1, 6], &device),
        time_ids: Tensor::zeros([1, 6], &device),
    };
    let without = kiln_pipeline::ExtraConditioning {
        added: Some(added),
        timestep_cond: None,
    };
    let err = lcm
        .unet
        .forward_with(sample.clone(), t.clone(), context.clone(), &without)
        .unwrap_err();
    assert!(err.to_string().contains("guidance-distilled"), "{err}");
    let with = kiln_pipeline::ExtraConditioning {
        timestep_cond: Some(Tensor::zeros([1, 8], &device)),
        ..without
    };
    let err = pipe
        .unet
        .forward_with(sample, t, context, &with)
        .unwrap_err();
    assert!(err.to_string().contains("not guidance-distilled"), "{err}");

    // denoising_start outside img2img, and a range the wrong way round
    let mut scheduler = pipe
        .scheduler(None, kiln_scheduler::SamplerOptions::default())
        .unwrap();
    for (options, needle) in [
        (
            GenerateOptions::new("a cat").with_denoising_range(None, Some(0.5)),
            "img2img",
        ),
        (
            GenerateOptions::new("a cat").with_denoising_range(Some(0.3), Some(0.5)),
            "below",
        ),
        (
            GenerateOptions::new("a cat").with_denoising_range(Some(1.5), None),
            "(0, 1)",
        ),
    ] {
        let err = pipe
            .generate(
                &mut scheduler,
                &options.with_size(48, 32),
                &mut kiln_scheduler::QueuedNoise::new(Vec::new()),
                None,
            )
            .unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
    }
}

/// `fixtures/sdxl/single-file/base.safetensors`: the tiny base in the layout of Stability's
/// `sd_xl_base_1.0.safetensors` (`xtask/fixtures/sdxl_single_file.py`, whose values diffusers'
/// converters read back exactly), with the folder's configs (its 8-wide text encoders have no
/// head layout to infer).
fn single_file() -> std::path::PathBuf {
    sdxl().join("single-file/base.safetensors")
}

fn configs_only() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    kiln_nn::config::copy_dir(&sdxl().join("base"), dir.path()).unwrap();
    for component in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        for entry in std::fs::read_dir(dir.path().join(component)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "safetensors") {
                std::fs::remove_file(path).unwrap();
            }
        }
    }
    dir
}

/// The recorded txt2img, img2img and Turbo-style cases from the single file, and from the
/// diffusers folder `convert_to_diffusers` writes of it.
#[test]
fn single_files_give_diffusers_images() {
    let reference = Reference::open(&sdxl().join("expected.safetensors")).unwrap();
    let config = configs_only();
    let options = kiln_pipeline::SingleFileOptions {
        config: Some(config.path().to_path_buf()),
        ..Default::default()
    };
    let mut pipe =
        StableDiffusionPipeline::from_single_file(&single_file(), &options, &common::device())
            .unwrap();
    assert!(pipe.is_sdxl() && pipe.force_zeros_for_empty_prompt);
    assert_eq!(pipe.class_name, "StableDiffusionXLPipeline");
    let out = tempfile::tempdir().unwrap();
    let folder = out.path().join("converted");
    kiln_pipeline::convert_to_diffusers(&single_file(), &options, &folder).unwrap();
    for name in ["tokenizer_2", "text_encoder_2", "model_index.json"] {
        assert!(folder.join(name).exists(), "{name}");
    }
    let mut converted = StableDiffusionPipeline::from_pretrained(
        &folder,
        LoadOptions::default(),
        &common::device(),
    )
    .unwrap();
    let folder_scheduler = pipe.scheduler_config.clone();
    let mut ran = 0;
    for (case, spacing, _) in cases().iter().filter(|(c, ..)| c.model == "base") {
        for (what, pipe) in [("single file", &mut pipe), ("converted", &mut converted)] {
            // run_case samples with the pipeline's own scheduler config
            pipe.scheduler_config = folder_scheduler.clone();
            if let Some(spacing) = spacing {
                pipe.scheduler_config.timestep_spacing =
                    serde_json::from_value(serde_json::Value::String(spacing.clone())).unwrap();
            }
            let (float_diff, byte_diff) = run_case(case, pipe, &reference);
            eprintln!("{what}, {}: max |float diff| {float_diff:.2e}", case.name);
            assert!(
                byte_diff <= tolerance::levels(tolerance::IMAGE) && float_diff <= tolerance::IMAGE,
                "{what} {}: {float_diff} / {byte_diff}",
                case.name
            );
            ran += 1;
        }
    }
    assert!(ran >= 10, "only {ran} runs");
}

/// A refiner as the base of a txt2img run, and an SDXL file missing an encoder: one clear
/// message each.
#[test]
fn refiners_and_incomplete_files_are_refused() {
    let device = common::device();
    let refiner = load("refiner");
    assert!(refiner.is_sdxl_refiner() && !load("base").is_sdxl_refiner());
    let mut scheduler = refiner
        .scheduler(None, kiln_scheduler::SamplerOptions::default())
        .unwrap();
    let err = refiner
        .generate(
            &mut scheduler,
            &GenerateOptions::new("a cat").with_size(48, 32),
            &mut kiln_scheduler::QueuedNoise::new(Vec::new()),
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("refiner"), "{err}");

    // the base file without its OpenCLIP encoder
    let file = kiln_nn::weights::WeightsFile::open(&single_file()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("partial.safetensors");
    let kept: Vec<(String, Vec<u8>, Vec<usize>)> = file
        .tensors()
        .filter(|(name, _)| !name.starts_with("conditioner.embedders.1."))
        .map(|(name, info)| {
            let t = file.tensor(name).unwrap();
            (
                name.to_string(),
                t.read().unwrap().into_bytes().to_vec(),
                info.shape.clone(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = kept
        .iter()
        .map(|(name, bytes, shape)| {
            let dtype = if name.ends_with("position_ids") {
                safetensors::Dtype::I64
            } else {
                safetensors::Dtype::F16
            };
            (
                name.clone(),
                safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let err = StableDiffusionPipeline::from_single_file(
        &path,
        &kiln_pipeline::SingleFileOptions::default(),
        &device,
    )
    .unwrap_err();
    assert!(err.to_string().contains("bigG"), "{err}");
}

/// SDXL LoRAs (`fixtures/sdxl/lora/`, `xtask/fixtures/sdxl_lora.py`): diffusers / PEFT keys with
/// `text_encoder_2.`, and kohya's with the UNet in the original (SGM) layout and
/// `lora_te1_` / `lora_te2_`, one at a time and together, against diffusers' `fuse_lora`;
/// unfusing gives the folder's weights back.
#[test]
fn sdxl_loras_match_diffusers_in_both_layouts() {
    #[derive(serde::Deserialize)]
    struct LoraCase {
        name: String,
        loras: Vec<(String, f32)>,
    }
    let device = common::device();
    let dir = sdxl().join("lora");
    let reference = Reference::open(&dir.join("expected.safetensors")).unwrap();
    let cases: Vec<LoraCase> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert_eq!(cases.len(), 3);
    let latents = reference.tensor::<4>("latents", &device).unwrap();
    let options = GenerateOptions::new("a photo of an astronaut riding a horse")
        .with_negative_prompt("blurry")
        .with_size(48, 32)
        .with_steps(4)
        .with_guidance_scale(5.0)
        .with_latents(latents);
    let run = |pipe: &StableDiffusionPipeline| {
        let mut scheduler = pipe
            .scheduler(None, kiln_scheduler::SamplerOptions::default())
            .unwrap();
        pipe.generate(
            &mut scheduler,
            &options,
            &mut kiln_scheduler::QueuedNoise::new(Vec::new()),
            None,
        )
        .unwrap()
        .images
    };
    let none = reference.tensor::<4>("none.image", &device).unwrap();
    let mut pipe = load("base");
    let before: f32 = (run(&pipe) - none.clone()).abs().max().into_scalar();
    assert!(before <= tolerance::IMAGE, "without LoRA: {before}");
    for case in cases {
        pipe.clear_loras().unwrap();
        for (name, scale) in &case.loras {
            let loaded = pipe
                .load_lora(
                    &dir.join(format!("{name}.safetensors")),
                    *scale,
                    kiln_pipeline::LoraOptions::default(),
                )
                .unwrap();
            assert!(
                loaded.unet_layers > 0
                    && loaded.text_encoder_layers > 0
                    && loaded.text_encoder_2_layers > 0,
                "{name}: {} / {} / {}",
                loaded.unet_layers,
                loaded.text_encoder_layers,
                loaded.text_encoder_2_layers
            );
        }
        pipe.fuse_loras().unwrap();
        let want = reference
            .tensor::<4>(&format!("{}.image", case.name), &device)
            .unwrap();
        let diff: f32 = (run(&pipe) - want.clone()).abs().max().into_scalar();
        let moved: f32 = (want - none.clone()).abs().max().into_scalar();
        eprintln!(
            "{}: max |float diff| {diff:.2e} (the LoRA moves it {moved:.2})",
            case.name
        );
        assert!(moved > 0.05, "{}: the LoRA changes the image", case.name);
        assert!(diff <= tolerance::IMAGE, "{}: {diff}", case.name);
    }

    // LCM-LoRA as diffusers documents it: the LoRA fused, the LCM scheduler, 4 steps at
    // guidance 1.5 on the undistilled base, LCM's own noise draws replayed
    pipe.clear_loras().unwrap();
    pipe.load_lora(
        &dir.join("sdxl-peft.safetensors"),
        1.0,
        kiln_pipeline::LoraOptions::default(),
    )
    .unwrap();
    pipe.fuse_loras().unwrap();
    let draws: Vec<Tensor<4>> = (0..3)
        .map(|i| {
            reference
                .tensor::<4>(&format!("lcm_lora.noise.{i}"), &device)
                .unwrap()
        })
        .collect();
    let mut noise = kiln_scheduler::QueuedNoise::new(draws);
    let mut lcm = pipe
        .scheduler(
            Some(kiln_scheduler::SamplerName::Lcm),
            kiln_scheduler::SamplerOptions::default(),
        )
        .unwrap();
    let image = pipe
        .generate(
            &mut lcm,
            &options.clone().with_guidance_scale(1.5),
            &mut noise,
            None,
        )
        .unwrap()
        .images;
    assert_eq!(noise.remaining(), 0);
    let diff: f32 = (image - reference.tensor::<4>("lcm_lora.image", &device).unwrap())
        .abs()
        .max()
        .into_scalar();
    eprintln!("lcm_lora: max |float diff| {diff:.2e}");
    assert!(diff <= tolerance::IMAGE, "lcm_lora: {diff}");

    pipe.clear_loras().unwrap();
    let after: f32 = (run(&pipe) - none).abs().max().into_scalar();
    assert!(after <= tolerance::IMAGE, "after unfusing: {after}");

    // a base's LoRA on the refiner (other UNet, one encoder): refused, the file named
    let mut refiner = load("refiner");
    let err = refiner
        .load_lora(
            &dir.join("sdxl-peft.safetensors"),
            1.0,
            kiln_pipeline::LoraOptions::default(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("sdxl-peft.safetensors"), "{err}");
    assert!(refiner.loras().is_empty());
}

/// `lora_te2_` layers on the SDXL refiner go into its one encoder (SDXL's second, held in the
/// first slot): the second-encoder layers of the kohya fixture, alone in a file, move the
/// refiner's encoder by what they move the base's second encoder (a LoRA adds `scale * up @
/// down`, whatever the weights it is added to; the base's is checked against diffusers above),
/// and unfusing restores it. The first encoder's layers are refused on the refiner, naming the
/// key.
#[test]
fn refiner_takes_second_encoder_loras() {
    let kohya = std::fs::read(sdxl().join("lora/sdxl-kohya.safetensors")).unwrap();
    let kohya = safetensors::SafeTensors::deserialize(&kohya).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let only = |prefix: &str| {
        let path = tmp.path().join(format!("{prefix}.safetensors"));
        let views: Vec<_> = kohya
            .tensors()
            .into_iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .collect();
        assert!(!views.is_empty(), "{prefix}");
        safetensors::serialize_to_file(views, None, &path).unwrap();
        path
    };
    let (te1, te2) = (only("lora_te1_"), only("lora_te2_"));
    let q_proj = |encoder: &kiln_clip::ClipTextModel| {
        encoder.encoder.layers[0].self_attn.q_proj.weight.val()
    };
    let delta = |pipe: &mut StableDiffusionPipeline, second: bool| {
        let weight = |pipe: &StableDiffusionPipeline| match second {
            true => q_proj(pipe.text_encoder_2.as_ref().unwrap()),
            false => q_proj(&pipe.text_encoder),
        };
        let before = weight(pipe);
        let loaded = pipe
            .load_lora(&te2, 0.7, kiln_pipeline::LoraOptions::default())
            .unwrap();
        assert_eq!(
            (loaded.unet_layers, loaded.text_encoder_layers),
            (0, 0),
            "{second}"
        );
        assert!(loaded.text_encoder_2_layers > 0, "{second}");
        pipe.fuse_loras().unwrap();
        let after = weight(pipe);
        pipe.unfuse_loras().unwrap();
        let restored = weight(pipe);
        assert_eq!(
            restored.to_data().as_bytes(),
            before.to_data().as_bytes(),
            "unfused"
        );
        after - before
    };
    let on_base = delta(&mut load("base"), true);
    let mut refiner = load("refiner");
    let on_refiner = delta(&mut refiner, false);
    let moved: f32 = on_base.clone().abs().max().into_scalar();
    assert!(moved > 1e-3, "the LoRA moves it: {moved}");
    let error = max_relative_error(&on_refiner, &on_base);
    assert!(error < 1e-4, "{error:e}");

    refiner.clear_loras().unwrap();
    let err = refiner
        .load_lora(&te1, 1.0, kiln_pipeline::LoraOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lora_te1_") && err.contains("first text encoder"),
        "{err}"
    );
    assert!(refiner.loras().is_empty());
}

/// An SDXL embedding (`clip_l` and `clip_g`, `fixtures/sdxl/textual-inversion/`) into both text
/// encoders, against diffusers loading each half into its encoder; an SD embedding refused on
/// SDXL and an SDXL one on an SD model.
#[test]
fn sdxl_textual_inversion_matches_diffusers() {
    let device = common::device();
    let dir = sdxl().join("textual-inversion");
    let reference = Reference::open(&dir.join("expected.safetensors")).unwrap();
    let mut pipe = load("base");
    let token = pipe
        .load_textual_inversion(&dir.join("sdxl-style.safetensors"), None)
        .unwrap();
    assert_eq!(token, "sdxl-style");
    let options = GenerateOptions::new("a photo of sdxl-style riding a horse")
        .with_negative_prompt("blurry")
        .with_size(48, 32)
        .with_steps(4)
        .with_guidance_scale(5.0)
        .with_latents(reference.tensor::<4>("latents", &device).unwrap());
    let mut scheduler = pipe
        .scheduler(None, kiln_scheduler::SamplerOptions::default())
        .unwrap();
    let image = pipe
        .generate(
            &mut scheduler,
            &options,
            &mut kiln_scheduler::QueuedNoise::new(Vec::new()),
            None,
        )
        .unwrap()
        .images;
    let want = reference.tensor::<4>("image", &device).unwrap();
    let none = reference.tensor::<4>("none.image", &device).unwrap();
    let diff: f32 = (image - want.clone()).abs().max().into_scalar();
    let moved: f32 = (want - none).abs().max().into_scalar();
    eprintln!("sdxl-style: max |float diff| {diff:.2e} (the embedding moves it {moved:.2})");
    assert!(moved > 0.05 && diff <= tolerance::IMAGE, "{diff} / {moved}");

    // an SD 1.x embedding (one tensor) on SDXL; the SDXL one on an SD 1.x model
    let single = common::root().join("fixtures/textual-inversion/learned_embeds.safetensors");
    let err = load("base")
        .load_textual_inversion(&single, Some("other"))
        .unwrap_err();
    assert!(err.to_string().contains("one set of vectors"), "{err}");
    let model = common::model("sd1");
    let mut sd1 =
        StableDiffusionPipeline::from_pretrained(model.path(), LoadOptions::default(), &device)
            .unwrap();
    let err = sd1
        .load_textual_inversion(&dir.join("sdxl-style.safetensors"), None)
        .unwrap_err();
    assert!(err.to_string().contains("not SDXL"), "{err}");
}

/// Components that do not fit are refused before any weight is read: text encoders whose widths
/// do not add up to the UNet's cross-attention width, a last encoder without a projection.
#[test]
fn mismatched_sdxl_components_are_refused() {
    let device = common::device();
    for (edit, needle) in [
        (r#""hidden_size": 8"#.replace("8", "12"), "add up to"),
        (
            r#""architectures": ["CLIPTextModel"]"#.to_string(),
            "text_projection",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        kiln_nn::config::copy_dir(&sdxl().join("base"), dir.path()).unwrap();
        let config = dir.path().join("text_encoder_2/config.json");
        let mut value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        let patch: serde_json::Value = serde_json::from_str(&format!("{{{edit}}}")).unwrap();
        for (k, v) in patch.as_object().unwrap() {
            value[k] = v.clone();
        }
        std::fs::write(&config, value.to_string()).unwrap();
        let err =
            StableDiffusionPipeline::from_pretrained(dir.path(), LoadOptions::default(), &device)
                .unwrap_err();
        assert!(err.to_string().contains(needle), "{edit}: {err}");
    }
}

/// In f16, an SDXL VAE with `force_upcast` (the original one overflows in f16) runs in f32 while
/// the UNet runs in f16, as diffusers' SDXL pipelines upcast it.
#[test]
fn f16_runs_upcast_the_sdxl_vae() {
    use burn::tensor::DType;
    let pipe = StableDiffusionPipeline::from_pretrained(
        &sdxl().join("base"),
        LoadOptions {
            dtype: kiln_nn::FloatKind::F16,
        },
        &common::device(),
    )
    .unwrap();
    assert!(pipe.vae.config.force_upcast);
    assert_eq!(pipe.vae.decoder.conv_in.weight.val().dtype(), DType::F32);
    assert_eq!(pipe.unet.conv_in.weight.val().dtype(), DType::F16);
    assert_eq!(pipe.dtype(), DType::F16);
}
