//! `kiln generate` as a user runs it, on the tiny pipelines of `fixtures/pipeline/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_nn::reference::tolerance;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn copy_dir(from: &Path, to: &Path) {
    kiln_nn::config::copy_dir(from, to).expect("copy fixture folder");
}

/// A complete diffusers folder for `kind` (`sd1`, `inpaint`) at `dir`: the committed components,
/// sd1's text encoder and VAE where `kind` shares them, and the classic SD1 tokenizer files.
fn assemble(kind: &str, dir: &Path) {
    let fixtures = root().join("fixtures/pipeline");
    copy_dir(&fixtures.join(kind), dir);
    for component in ["text_encoder", "vae"] {
        if !dir.join(component).exists() {
            copy_dir(&fixtures.join("sd1").join(component), &dir.join(component));
        }
    }
    let clip = root().join("fixtures/clip");
    let tok = dir.join("tokenizer");
    std::fs::create_dir_all(&tok).unwrap();
    for (from, name) in [
        ("vocab/vocab.json", "vocab.json"),
        ("vocab/merges.txt", "merges.txt"),
        (
            "tokenizer-sd1/special_tokens_map.json",
            "special_tokens_map.json",
        ),
        (
            "tokenizer-sd1/tokenizer_config.json",
            "tokenizer_config.json",
        ),
    ] {
        std::fs::copy(clip.join(from), tok.join(name)).unwrap();
    }
}

fn model(kind: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    assemble(kind, dir.path());
    dir
}

fn kiln(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run kiln")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Decodes an RGB PNG: (width, height, pixels, `parameters` text).
fn read_png(path: &Path) -> (u32, u32, Vec<u8>, String) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let text = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == "parameters")
        .map(|c| c.text.clone())
        .unwrap_or_default();
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf, text)
}

fn write_png(path: &Path, width: u32, height: u32, color: png::ColorType, data: &[u8]) {
    let file = std::fs::File::create(path).unwrap();
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    encoder.set_color(color);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(data).unwrap();
}

/// Reads `name` from the pipeline fixtures as f32 values with its shape.
fn fixture_tensor(name: &str) -> (Vec<usize>, Vec<f32>) {
    fixture_tensor_in("pipeline", name)
}

/// Reads `name` from `fixtures/<area>/expected.safetensors` as f32 values with its shape.
fn fixture_tensor_in(area: &str, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(
        root()
            .join("fixtures")
            .join(area)
            .join("expected.safetensors"),
    )
    .unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = file.tensor(name).unwrap();
    let values = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (view.shape().to_vec(), values)
}

fn write_latents(path: &Path, shape: &[usize], values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), &bytes)
            .unwrap();
    std::fs::write(
        path,
        safetensors::serialize([("latents", view)], None).unwrap(),
    )
    .unwrap();
}

#[test]
fn generate_matches_diffusers_and_writes_a1111_metadata() {
    let model = model("sd1");
    let dir = tempfile::tempdir().unwrap();
    let (shape, values) = fixture_tensor("sd1_pndm.latents");
    let latents = dir.path().join("latents.safetensors");
    write_latents(&latents, &shape, &values);
    let output = dir.path().join("astronaut.png");
    let out = kiln(
        &[
            "generate",
            "--model",
            model.path().to_str().unwrap(),
            "--prompt",
            "a photo of an astronaut riding a horse",
            "--negative-prompt",
            "blurry",
            "--steps",
            "6",
            "--width",
            "48",
            "--height",
            "32",
            "--seed",
            "11",
            "--latents",
            latents.to_str().unwrap(),
            "--device",
            "flex",
            "--output",
            output.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let (w, h, pixels, text) = read_png(&output);
    assert_eq!((w, h), (48, 32));
    // diffusers' image for the same folder and latents, as 8-bit RGB (HWC)
    let (_, expected) = fixture_tensor("sd1_pndm.image");
    let plane = 32 * 48;
    let worst = (0..plane * 3)
        .map(|i| {
            let (p, c) = (i / 3, i % 3);
            let theirs = (expected[c * plane + p] * 255.0).round() as u8;
            pixels[i].abs_diff(theirs)
        })
        .max()
        .unwrap();
    // diffusers' float image rounded: within levels(IMAGE) of ours (see kiln_nn's tolerance)
    assert!(
        worst <= tolerance::levels(tolerance::IMAGE),
        "max 8-bit difference {worst}"
    );
    assert_eq!(
        text.lines().collect::<Vec<_>>()[..2],
        [
            "a photo of an astronaut riding a horse",
            "Negative prompt: blurry"
        ]
    );
    assert!(
        text.contains("Steps: 6, Sampler: PLMS, CFG scale: 7.5, Seed: 11, Size: 48x32, Model: "),
        "{text}"
    );
}

#[test]
fn batches_are_numbered_seeded_and_never_overwritten() {
    let model = model("sd1");
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("cat.png");
    let run = |out: &Path, seed: &str, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.path().to_str().unwrap(),
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--scheduler",
            "euler-a",
            "--seed",
            seed,
            "--batch",
            "2",
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        kiln(&args, &[])
    };
    let out = run(&output, "5", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let first = std::fs::read(dir.path().join("cat-0.png")).unwrap();
    let second = std::fs::read(dir.path().join("cat-1.png")).unwrap();
    assert_ne!(first, second, "two images of a batch differ");
    assert!(!output.exists());
    let (w, h, _, text) = read_png(&dir.path().join("cat-1.png"));
    assert_eq!((w, h), (32, 32), "the model's default size");
    assert!(
        text.contains("Sampler: Euler a") && text.contains("Batch pos: 1"),
        "{text}"
    );

    // the same seed gives the same image; an existing file needs --overwrite
    let again = run(&output, "5", &[]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("--overwrite"), "{}", stderr(&again));
    let again = run(&output, "5", &["--overwrite"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(std::fs::read(dir.path().join("cat-0.png")).unwrap(), first);
    let other = run(&dir.path().join("dog.png"), "6", &[]);
    assert!(other.status.success(), "{}", stderr(&other));
    assert_ne!(std::fs::read(dir.path().join("dog-0.png")).unwrap(), first);
}

#[test]
fn img2img_and_inpainting_write_images_of_the_input_size() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = (48u32, 32u32);
    let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
    let image = dir.path().join("in.png");
    write_png(&image, w, h, png::ColorType::Rgb, &rgb);
    let mask_px: Vec<u8> = (0..w * h)
        .map(|i| if (i % w) > w / 2 { 255 } else { 0 })
        .collect();
    let mask = dir.path().join("mask.png");
    write_png(&mask, w, h, png::ColorType::Grayscale, &mask_px);
    let sd1 = model("sd1");
    let inpaint = model("inpaint");
    for (name, model, extra) in [
        ("img2img", &sd1, vec!["--strength", "0.5"]),
        ("blend", &sd1, vec!["--mask", mask.to_str().unwrap()]),
        ("unet9", &inpaint, vec!["--mask", mask.to_str().unwrap()]),
    ] {
        let output = dir.path().join(format!("{name}.png"));
        let mut args = vec![
            "generate",
            "--model",
            model.path().to_str().unwrap(),
            "--prompt",
            "a dog",
            "--steps",
            "4",
            "--scheduler",
            "ddim",
            "--image",
            image.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ];
        args.extend(extra);
        let out = kiln(&args, &[]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let (ow, oh, _, text) = read_png(&output);
        assert_eq!((ow, oh), (w, h), "{name}");
        let strength = if name == "img2img" { "0.5" } else { "1" };
        assert!(
            text.contains(&format!("Denoising strength: {strength}")),
            "{name}: {text}"
        );
    }
}

#[test]
fn hub_repo_ids_load_from_the_local_cache() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--kiln--tiny-sd1");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    assemble("sd1", &repo.join("snapshots").join(commit));
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("hub.png");
    let args = [
        "generate",
        "--model",
        "kiln/tiny-sd1",
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--output",
        output.to_str().unwrap(),
    ];
    let out = kiln(&args, &[("HF_HOME", home.path())]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, _, _, text) = read_png(&output);
    assert!(text.contains("Model: kiln/tiny-sd1"), "{text}");

    let missing = kiln(
        &[
            "generate",
            "--model",
            "kiln/not-cached",
            "--prompt",
            "x",
            "--output",
            dir.path().join("m.png").to_str().unwrap(),
        ],
        &[("HF_HOME", home.path())],
    );
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("Hugging Face cache"),
        "{}",
        stderr(&missing)
    );
}

/// Runs `generate` with `extra` arguments, expects failure with one line containing `needle`
/// and no file at the output path.
fn fails_cleanly(model: &Path, extra: &[&str], needle: &str) {
    let mut args = vec!["--prompt", "x"];
    args.extend_from_slice(extra);
    refuses(model, &args, needle);
}

#[test]
fn bad_input_is_one_clear_line_and_no_file() {
    let sd1 = model("sd1");
    fails_cleanly(sd1.path(), &["--scheduler", "euler_a"], "euler-a");
    fails_cleanly(sd1.path(), &["--width", "31"], "multiples of 2");
    fails_cleanly(sd1.path(), &["--scheduler", "pndm", "--karras"], "--karras");
    fails_cleanly(sd1.path(), &["--dtype", "f64"], "f64");
    // sizes too large for memory: refused before anything is allocated, with the estimate
    fails_cleanly(
        sd1.path(),
        &["--width", "100000", "--height", "100000"],
        "GiB beyond the loaded weights",
    );
    fails_cleanly(sd1.path(), &["--max-memory", "0.000001"], "--max-memory");
    fails_cleanly(sd1.path(), &["--max-memory=-1"], "--max-memory");

    let dir = tempfile::tempdir().unwrap();
    let png_path = dir.path().join("img.png");
    write_png(&png_path, 48, 32, png::ColorType::Rgb, &[100; 48 * 32 * 3]);
    let small_mask = dir.path().join("mask.png");
    write_png(
        &small_mask,
        24,
        16,
        png::ColorType::Grayscale,
        &[255; 24 * 16],
    );
    let mask_args = [
        "--image",
        png_path.to_str().unwrap(),
        "--mask",
        small_mask.to_str().unwrap(),
    ];
    fails_cleanly(sd1.path(), &mask_args, "the same size");
    let not_png = dir.path().join("broken.png");
    std::fs::write(&not_png, b"not a png").unwrap();
    fails_cleanly(
        sd1.path(),
        &["--image", not_png.to_str().unwrap()],
        "not a readable PNG",
    );

    let wrong_name = dir.path().join("noise.safetensors");
    let bytes = vec![0u8; 4 * 8 * 8 * 4];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 4, 8, 8], &bytes)
            .unwrap();
    std::fs::write(
        &wrong_name,
        safetensors::serialize([("noise", view)], None).unwrap(),
    )
    .unwrap();
    fails_cleanly(
        sd1.path(),
        &["--latents", wrong_name.to_str().unwrap()],
        "named `latents`",
    );
    let wrong_shape = dir.path().join("latents.safetensors");
    write_latents(&wrong_shape, &[1, 4, 8, 8], &[0.0; 4 * 8 * 8]);
    fails_cleanly(
        sd1.path(),
        &["--latents", wrong_shape.to_str().unwrap()],
        "[1, 4, 16, 16]",
    );

    let empty = tempfile::tempdir().unwrap();
    fails_cleanly(empty.path(), &[], "model_index.json");
    let partial = model("sd1");
    std::fs::remove_dir_all(partial.path().join("vae")).unwrap();
    fails_cleanly(partial.path(), &[], "missing vae/");

    let mismatched = model("sd1");
    let config = mismatched.path().join("unet/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace("\"cross_attention_dim\": 8", "\"cross_attention_dim\": 16");
    std::fs::write(&config, text).unwrap();
    fails_cleanly(mismatched.path(), &[], "cross-attention width is 16");
}

/// No `--model`: the embedded default model, at its own size and with its own defaults.
#[test]
fn no_model_means_the_embedded_one() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("shape.png");
    let out = kiln(
        &[
            "generate",
            "--prompt",
            "a red circle on a blue background",
            "--seed",
            "0",
            "--output",
            output.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let (w, h, _, text) = read_png(&output);
    assert_eq!((w, h), (32, 32));
    assert!(text.contains("Model: kiln-tiny-shapes"), "{text}");
    assert!(text.contains("Steps: 25"), "{text}");
}

#[test]
fn single_file_checkpoints_generate_with_configs_from_a_folder() {
    // the folder's configs and tokenizer, none of its weights
    let config = model("sd1");
    for component in ["unet", "vae", "text_encoder"] {
        for entry in std::fs::read_dir(config.path().join(component)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "safetensors") {
                std::fs::remove_file(path).unwrap();
            }
        }
    }
    let checkpoint = root().join("fixtures/single-file/sd1.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let (shape, values) = fixture_tensor("sd1_pndm.latents");
    let latents = dir.path().join("latents.safetensors");
    write_latents(&latents, &shape, &values);
    // the recorded run from a checkpoint file, read back from the PNG
    let generate = |model: &Path, name: &str| {
        let output = dir.path().join(name);
        let out = kiln(
            &[
                "generate",
                "--model",
                model.to_str().unwrap(),
                "--config",
                config.path().to_str().unwrap(),
                "--prompt",
                "a photo of an astronaut riding a horse",
                "--negative-prompt",
                "blurry",
                "--steps",
                "6",
                "--width",
                "48",
                "--height",
                "32",
                "--latents",
                latents.to_str().unwrap(),
                "--output",
                output.to_str().unwrap(),
            ],
            &[],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        read_png(&output)
    };
    let (w, h, pixels, text) = generate(&checkpoint, "astronaut.png");
    assert_eq!((w, h), (48, 32));
    let (_, expected) = fixture_tensor("sd1_pndm.image");
    let plane = 32 * 48;
    let worst = (0..plane * 3)
        .map(|i| {
            let (p, c) = (i / 3, i % 3);
            pixels[i].abs_diff((expected[c * plane + p] * 255.0).round() as u8)
        })
        .max()
        .unwrap();
    // diffusers' float image rounded: within levels(IMAGE) of ours (see kiln_nn's tolerance)
    assert!(
        worst <= tolerance::levels(tolerance::IMAGE),
        "max 8-bit difference {worst}"
    );
    assert!(text.contains("Model: sd1"), "{text}");

    // the same checkpoint as the original `.ckpt` files hold it (fixtures/pickle/sd1.ckpt): the
    // same image, to the bit
    let ckpt = root().join("fixtures/pickle/sd1.ckpt");
    let (_, _, pickle_pixels, pickle_text) = generate(&ckpt, "pickle.png");
    assert!(pickle_pixels == pixels, "the .ckpt gives another image");
    assert!(pickle_text.contains("Model: sd1"), "{pickle_text}");

    // the same checkpoint converted to a diffusers folder
    let converted = dir.path().join("converted");
    let out = kiln(
        &[
            "convert",
            "--model",
            checkpoint.to_str().unwrap(),
            "--config",
            config.path().to_str().unwrap(),
            "--output",
            converted.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        converted
            .join("unet/diffusion_pytorch_model.safetensors")
            .is_file()
    );
    let again = kiln(
        &[
            "convert",
            "--model",
            checkpoint.to_str().unwrap(),
            "--config",
            config.path().to_str().unwrap(),
            "--output",
            converted.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!again.status.success() && stderr(&again).contains("exists"));

    let checkpoint = checkpoint.as_path();
    fails_cleanly(checkpoint, &[], "give the configs");
    fails_cleanly(
        checkpoint,
        &["--prediction-type", "x0"],
        "unknown --prediction-type",
    );
    fails_cleanly(
        config.path(),
        &["--config", "."],
        "--config is for single-file",
    );
    let pickle = dir.path().join("model.ckpt");
    std::fs::write(&pickle, b"not loaded").unwrap();
    fails_cleanly(&pickle, &[], "not a PyTorch checkpoint");
}

#[test]
fn input_images_of_other_sizes_are_resized_as_diffusers_does() {
    let dir = tempfile::tempdir().unwrap();
    let sd1 = model("sd1");
    // 51x35: rounded down to the model's multiple (2 for the tiny VAE), 50x34
    let odd = dir.path().join("odd.png");
    let rgb: Vec<u8> = (0..51 * 35 * 3).map(|i| (i * 5 % 251) as u8).collect();
    write_png(&odd, 51, 35, png::ColorType::Rgb, &rgb);
    // a JPEG, resized to an explicit --width / --height
    let jpeg = dir.path().join("photo.jpg");
    image::RgbImage::from_fn(48, 32, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 7) as u8, 90])
    })
    .save(&jpeg)
    .unwrap();
    for (input, extra, size) in [
        (&odd, vec![], (50, 34)),
        (&jpeg, vec!["--width", "32", "--height", "24"], (32, 24)),
    ] {
        let output = dir.path().join("out.png");
        let mut args = vec![
            "generate",
            "--model",
            sd1.path().to_str().unwrap(),
            "--prompt",
            "a dog",
            "--steps",
            "2",
            "--image",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--overwrite",
        ];
        args.extend(extra);
        let out = kiln(&args, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("resized the input image"),
            "{}",
            stderr(&out)
        );
        let (w, h, _, _) = read_png(&output);
        assert_eq!((w, h), size);
    }
}

#[test]
fn vae_tiling_writes_the_image() {
    let sd1 = model("sd1");
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("tiled.png");
    let out = kiln(
        &[
            "generate",
            "--model",
            sd1.path().to_str().unwrap(),
            "--prompt",
            "x",
            "--steps",
            "2",
            "--width",
            "96",
            "--height",
            "64",
            "--vae-tiling",
            "--output",
            output.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&output).unwrap(),
    ));
    let info = decoder.read_info().unwrap().info().clone();
    assert_eq!((info.width, info.height), (96, 64));
}

/// The largest 8-bit difference between a PNG's pixels (HWC) and a float image (CHW) of a fixture.
fn worst_level(pixels: &[u8], expected: &[f32], plane: usize) -> u8 {
    (0..plane * 3)
        .map(|i| {
            let (p, c) = (i / 3, i % 3);
            pixels[i].abs_diff((expected[c * plane + p] * 255.0).round() as u8)
        })
        .max()
        .unwrap()
}

/// `kiln generate` with `args` after the model; fails with one line holding `needle`, no file.
fn refuses(model: &Path, args: &[&str], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.png");
    let mut all = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "2",
    ];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--output", output.to_str().unwrap()]);
    let out = kiln(&all, &[]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(
        err.starts_with("error: ") && err.contains(needle),
        "{args:?}: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "{args:?} left a file"
    );
}

#[test]
fn loras_from_flags_and_prompt_tags_match_diffusers() {
    let model = model("sd1");
    let dir = tempfile::tempdir().unwrap();
    let (shape, values) = fixture_tensor_in("lora", "sd1_both.latents");
    let latents = dir.path().join("latents.safetensors");
    write_latents(&latents, &shape, &values);
    let loras = root().join("fixtures/lora");
    let (_, expected) = fixture_tensor_in("lora", "sd1_both.image");
    let run = |name: &str, prompt: &str, extra: &[&str]| {
        let output = dir.path().join(name);
        let mut args = vec![
            "generate",
            "--model",
            model.path().to_str().unwrap(),
            "--prompt",
            prompt,
            "--negative-prompt",
            "blurry",
            "--scheduler",
            "ddim",
            "--steps",
            "4",
            "--width",
            "48",
            "--height",
            "32",
            "--latents",
            latents.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = kiln(&args, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        read_png(&output)
    };
    let peft = loras.join("sd1-peft.safetensors");
    let peft_arg = format!("{}:0.6", peft.display());
    let prompt = "a photo of an astronaut riding a horse";
    let (_, _, flags, text) = run(
        "flags.png",
        &format!("{prompt} <lora:sd1-kohya:0.9>"),
        &["--lora", &peft_arg, "--lora-dir", loras.to_str().unwrap()],
    );
    let worst = worst_level(&flags, &expected, 32 * 48);
    assert!(
        worst <= tolerance::levels(tolerance::IMAGE),
        "max 8-bit difference {worst}"
    );
    // the written prompt holds both LoRAs as tags, and the hashes are listed
    let first = text.lines().next().unwrap();
    assert!(
        first.contains("<lora:sd1-kohya:0.9>") && first.contains("<lora:sd1-peft:0.6>"),
        "{text}"
    );
    assert!(
        text.contains("Lora hashes: \"sd1-peft: ") && text.contains(", sd1-kohya: "),
        "{text}"
    );
    // ... so that the written prompt alone, with --lora-dir, gives the same image
    let (_, _, tags, _) = run("tags.png", first, &["--lora-dir", loras.to_str().unwrap()]);
    assert!(tags == flags, "the written prompt gives another image");
}

#[test]
fn prompt_syntax_lora_and_embedding_mistakes_are_one_clear_line() {
    let sd1 = model("sd1");
    let loras = root().join("fixtures/lora");
    let lora_dir = loras.to_str().unwrap();
    for (args, needle) in [
        (vec!["--prompt", "a (cat"], "character 3"),
        (vec!["--prompt", "a cat)"], "closes nothing"),
        (vec!["--prompt", "a (cat:1,2)"], "not a number"),
        (
            vec!["--prompt", "a <lora:nope:1>", "--lora-dir", lora_dir],
            "nope.safetensors",
        ),
        (vec!["--prompt", "a <lora:sd1-peft:1>"], "--lora-dir"),
        (
            vec![
                "--prompt",
                "a <lora:sd1-peft:strong>",
                "--lora-dir",
                lora_dir,
            ],
            "not a number",
        ),
        (
            vec!["--prompt", "a <hypernet:foo:1>"],
            "only `<lora:NAME:SCALE>`",
        ),
        (
            vec!["--prompt", "x", "--lora", "/nonexistent/x.safetensors"],
            "no such file",
        ),
        (
            vec!["--prompt", "x", "--embedding", "/nonexistent/e.safetensors"],
            "no such file",
        ),
    ] {
        refuses(sd1.path(), &args, needle);
    }
}

#[test]
fn embeddings_and_long_weighted_prompts_generate() {
    let model = model("sd1");
    let dir = tempfile::tempdir().unwrap();
    let (shape, values) = fixture_tensor_in("textual-inversion", "latents");
    let latents = dir.path().join("latents.safetensors");
    write_latents(&latents, &shape, &values);
    let ti = root().join("fixtures/textual-inversion");
    let output = dir.path().join("ti.png");
    let cat = ti.join("learned_embeds.safetensors");
    let style = ti.join("style2.safetensors");
    let out = kiln(
        &[
            "generate",
            "--model",
            model.path().to_str().unwrap(),
            "--prompt",
            "a photo of a <cat-toy> on a table, style2 style",
            "--negative-prompt",
            "style2, blurry",
            "--embedding",
            cat.to_str().unwrap(),
            "--embedding",
            style.to_str().unwrap(),
            "--scheduler",
            "ddim",
            "--steps",
            "4",
            "--width",
            "48",
            "--height",
            "32",
            "--latents",
            latents.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, _, pixels, text) = read_png(&output);
    let (_, expected) = fixture_tensor_in("textual-inversion", "sd1.image");
    let worst = worst_level(&pixels, &expected, 32 * 48);
    assert!(
        worst <= tolerance::levels(tolerance::IMAGE),
        "max 8-bit difference {worst}"
    );
    assert!(
        text.contains("TI hashes: \"<cat-toy>: ") && text.contains(", style2: "),
        "{text}"
    );
}

/// SDXL from its folder: the base alone, the base with `--refiner` (the A1111 metadata names the
/// refiner and the switch), and what cannot run refused in one line with no file.
#[test]
fn sdxl_base_and_refiner_from_folders() {
    let sdxl = root().join("fixtures/sdxl");
    let (base, refiner) = (sdxl.join("base"), sdxl.join("refiner"));
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let output = dir.path().join(name);
        let mut args = vec![
            "generate",
            "--model",
            base.to_str().unwrap(),
            "--prompt",
            "a photo of an astronaut riding a horse",
            "--steps",
            "5",
            "--seed",
            "3",
            "--width",
            "48",
            "--height",
            "32",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--output", output.to_str().unwrap()]);
        let out = kiln(&args, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        read_png(&output)
    };
    let (w, h, alone, text) = run("base.png", &[]);
    assert_eq!((w, h), (48, 32));
    assert!(text.contains("CFG scale: 5,"), "{text}");
    let (_, _, refined, text) = run(
        "refined.png",
        &[
            "--refiner",
            refiner.to_str().unwrap(),
            "--refiner-switch",
            "0.6",
        ],
    );
    assert!(
        text.contains("Refiner: refiner, Refiner switch at: 0.6"),
        "{text}"
    );
    assert_ne!(alone, refined, "the refiner changed nothing");

    refuses(&refiner, &["--prompt", "x"], "SDXL refiner");
    refuses(
        model("sd1").path(),
        &["--prompt", "x", "--refiner", refiner.to_str().unwrap()],
        "not SDXL",
    );
    refuses(
        &base,
        &[
            "--prompt",
            "x",
            "--refiner",
            refiner.to_str().unwrap(),
            "--refiner-switch",
            "1.5",
        ],
        "between 0 and 1",
    );
    // the tiny VAE halves: an odd width is not a multiple of its scale factor
    refuses(&base, &["--prompt", "x", "--width", "45"], "multiple");
}

/// `--vae`: a folder, a single file (hashed into the parameters as A1111 does) and a repo id in
/// the local cache replace the model's VAE; the sd1 model's own VAE, taken from its single-file
/// checkpoint, gives the model's image again; a file with no VAE is one clear line.
#[test]
fn vae_swaps_take_folders_files_and_repo_ids() {
    use sha2::{Digest, Sha256};
    let model = model("sd1");
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let other = root().join("fixtures/vae/vae");
    let repo = home.path().join("hub/models--kiln--tiny-vae");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    copy_dir(&other, &repo.join("snapshots").join(commit));
    let checkpoint = root().join("fixtures/single-file/sd1.safetensors");
    let run = |name: &str, vae: Option<&str>| {
        let output = dir.path().join(name);
        let mut args = vec![
            "generate",
            "--model",
            model.path().to_str().unwrap(),
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--seed",
            "3",
            "--width",
            "32",
            "--height",
            "32",
            "--output",
            output.to_str().unwrap(),
        ];
        if let Some(vae) = vae {
            args.extend_from_slice(&["--vae", vae]);
        }
        let out = kiln(&args, &[("HF_HOME", home.path())]);
        assert!(out.status.success(), "{vae:?}: {}", stderr(&out));
        read_png(&output)
    };
    let (_, _, own, text) = run("own.png", None);
    assert!(!text.contains("VAE"), "{text}");
    let (_, _, folder, text) = run("folder.png", Some(other.to_str().unwrap()));
    assert_ne!(folder, own);
    assert!(
        text.contains(", VAE: vae,") && !text.contains("VAE hash"),
        "{text}"
    );
    let (_, _, cached, text) = run("cached.png", Some("kiln/tiny-vae"));
    assert_eq!(cached, folder);
    assert!(text.contains(", VAE: kiln/tiny-vae,"), "{text}");
    let (_, _, file, text) = run("file.png", Some(checkpoint.to_str().unwrap()));
    assert_eq!(file, own, "the model's own VAE from its checkpoint");
    let digest = Sha256::digest(std::fs::read(&checkpoint).unwrap());
    let hash: String = digest[..5].iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        text.contains(&format!(", VAE hash: {hash}, VAE: sd1.safetensors,")),
        "{text}"
    );

    let unet = model
        .path()
        .join("unet/diffusion_pytorch_model.fp16.safetensors");
    refuses(
        model.path(),
        &["--prompt", "x", "--vae", unet.to_str().unwrap()],
        "holds no autoencoder",
    );
    refuses(
        model.path(),
        &["--prompt", "x", "--vae", "no/such-vae"],
        "Hugging Face cache",
    );
}

/// `--hires-scale`: the image at the larger size, the web UI's parameters written (the first
/// pass's size, the scale, steps, upscaler and denoising strength), the same seed giving the same
/// image; misuse is one clear line.
#[test]
fn hires_fix_draws_larger_and_writes_its_parameters() {
    let model = model("sd1");
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let output = dir.path().join(name);
        let mut args = vec![
            "generate",
            "--model",
            model.path().to_str().unwrap(),
            "--prompt",
            "a cat",
            "--steps",
            "3",
            "--seed",
            "5",
            "--width",
            "24",
            "--height",
            "16",
            "--output",
            output.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = kiln(&args, &[]);
        assert!(out.status.success(), "{extra:?}: {}", stderr(&out));
        read_png(&output)
    };
    let hires = [
        "--hires-scale",
        "2",
        "--hires-steps",
        "4",
        "--hires-denoise",
        "0.5",
        "--hires-upscaler",
        "latent-bicubic",
    ];
    let (w, h, pixels, text) = run("hires.png", &hires);
    assert_eq!((w, h), (48, 32));
    assert!(
        text.contains("Size: 24x16")
            && text.contains("Denoising strength: 0.5")
            && text.contains("Hires upscale: 2, Hires steps: 4, Hires upscaler: Latent (bicubic)"),
        "{text}"
    );
    let (_, _, again, _) = run("again.png", &hires);
    assert!(again == pixels, "the same seed gives the same image");
    let (w, h, _, text) = run("default.png", &["--hires-scale", "1.5"]);
    assert_eq!((w, h), (36, 24));
    assert!(
        text.contains("Denoising strength: 0.7, Hires upscale: 1.5, Hires upscaler: Latent,"),
        "{text}"
    );

    let image = dir.path().join("in.png");
    write_png(&image, 24, 16, png::ColorType::Rgb, &[128; 24 * 16 * 3]);
    for (extra, needle) in [
        (vec!["--hires-scale", "0.5"], "at least 1"),
        (vec!["--hires-scale", "2", "--hires-denoise", "0"], "(0, 1]"),
        (
            vec!["--hires-scale", "2", "--hires-upscaler", "lanczos"],
            "latent-bicubic",
        ),
        (
            vec!["--hires-scale", "2", "--image", image.to_str().unwrap()],
            "for txt2img",
        ),
    ] {
        let mut args = vec!["--prompt", "x", "--width", "24", "--height", "16"];
        args.extend_from_slice(&extra);
        refuses(model.path(), &args, needle);
    }
}
