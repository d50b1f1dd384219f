//! `kiln train` as a user runs it: a folder of captioned PNGs, the tiny SD 1.x pipeline, a
//! checkpoint folder that `kiln generate` then reads.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run kiln")
}

fn write_png(path: &Path, width: u32, height: u32, data: &[u8]) {
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut encoder = png::Encoder::new(file, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder
        .write_header()
        .unwrap()
        .write_image_data(data)
        .unwrap();
}

/// `kiln train --model MODEL --data DATA --output OUTPUT --resolution 16` with `extra`.
fn fine_tune(model: &Path, data: &Path, output: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--resolution",
        "16",
    ];
    args.extend_from_slice(extra);
    kiln(&args)
}

#[test]
fn train_writes_a_checkpoint_that_generate_loads() {
    let data = tempfile::tempdir().unwrap();
    for (i, caption) in ["a red square", "a blue circle"].iter().enumerate() {
        let pixels: Vec<u8> = (0..24 * 20 * 3)
            .map(|k| ((k * (7 + i)) % 251) as u8)
            .collect();
        write_png(&data.path().join(format!("{i}.png")), 24, 20, &pixels);
        std::fs::write(data.path().join(format!("{i}.txt")), caption).unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let tuned = out.path().join("tuned");
    let model = root().join("fixtures/pipeline/sd1");
    let run = |extra: &[&str]| {
        let args = [&["--steps", "3", "--batch", "2"], extra].concat();
        fine_tune(&model, data.path(), &tuned, &args)
    };
    let first = run(&["--save-every", "2"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        tuned
            .join("unet/diffusion_pytorch_model.safetensors")
            .is_file()
    );

    // an existing checkpoint is kept unless --overwrite
    let again = run(&[]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && err.contains("--overwrite"),
        "{err}"
    );
    assert!(run(&["--overwrite"]).status.success());

    let image = out.path().join("x.png");
    let generated = kiln(&[
        "generate",
        "--model",
        tuned.to_str().unwrap(),
        "--prompt",
        "a red square",
        "--steps",
        "2",
        "--output",
        image.to_str().unwrap(),
    ]);
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    assert!(image.is_file());

    // a folder without examples: one line, no output
    let empty = tempfile::tempdir().unwrap();
    let other = out.path().join("other");
    let bad = kiln(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        empty.path().to_str().unwrap(),
        "--output",
        other.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("no examples"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!other.exists());
}

/// Fine-tuning from a single-file checkpoint (`fixtures/single-file/sd1.safetensors` and its
/// `.ckpt` twin, the sd1 folder's weights in LDM layout, configs from a folder without weights)
/// trains the same model, to the byte, as fine-tuning the folder; the temporary conversion is
/// gone afterwards.
#[test]
fn single_file_checkpoints_fine_tune_as_their_folder() {
    let data = tempfile::tempdir().unwrap();
    let pixels: Vec<u8> = (0..16 * 16 * 3).map(|k| (k % 253) as u8).collect();
    write_png(&data.path().join("0.png"), 16, 16, &pixels);
    std::fs::write(data.path().join("0.txt"), "a red square").unwrap();
    let folder = root().join("fixtures/pipeline/sd1");
    let configs = tempfile::tempdir().unwrap();
    kiln_nn::config::copy_dir(&folder, configs.path()).unwrap();
    for component in ["unet", "vae", "text_encoder"] {
        for entry in std::fs::read_dir(configs.path().join(component)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "safetensors") {
                std::fs::remove_file(path).unwrap();
            }
        }
    }
    let out = tempfile::tempdir().unwrap();
    let train = |model: &Path, name: &str, extra: &[&str]| {
        let output = out.path().join(name);
        let args = [&["--steps", "2", "--seed", "4"], extra].concat();
        (fine_tune(model, data.path(), &output, &args), output)
    };
    let weights = |dir: &Path| -> Vec<Vec<u8>> {
        [
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
        ]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect()
    };
    let (run, from_folder) = train(&folder, "folder", &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let config_arg = ["--model-config", configs.path().to_str().unwrap()];
    for file in [
        root().join("fixtures/single-file/sd1.safetensors"),
        root().join("fixtures/pickle/sd1.ckpt"),
    ] {
        let name = file.file_name().unwrap().to_str().unwrap().to_string();
        let (run, from_file) = train(&file, &name, &config_arg);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(weights(&from_file) == weights(&from_folder), "{name}");
    }
    let left: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".kiln-base-"))
        .collect();
    assert!(left.is_empty(), "temporary folders left: {left:?}");
    // --model-config belongs to single files
    let (run, _) = train(&folder, "other", &config_arg);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && err.contains("--model-config is for"),
        "{err}"
    );
}

/// A run folder with the shapes data and the tiny test recipe beside it.
fn scratch_run() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let shapes = dir.path().join("shapes");
    let out = kiln(&[
        "data",
        "shapes",
        "--count",
        "12",
        "--size",
        "16",
        "--output",
        shapes.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::copy(
        root().join("fixtures/training/tiny-recipe.toml"),
        dir.path().join("recipe.toml"),
    )
    .unwrap();
    dir
}

fn model_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// `kill -9` while a checkpoint is being written: the newest complete checkpoint is untouched,
/// `--resume` goes on from it, and the model equals a straight run's to the byte.
#[test]
fn a_run_killed_mid_checkpoint_resumes_to_the_same_model() {
    let dir = scratch_run();
    let recipe = dir.path().join("recipe.toml");
    let args = |out: &Path| {
        [
            "train",
            "--config",
            recipe.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--vae-steps",
            "5",
            "--denoiser-steps",
            "5",
            "--save-every",
            "1",
        ]
        .map(String::from)
    };
    let straight = dir.path().join("straight");
    let out = kiln(
        &args(&straight)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let killed = dir.path().join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args(&killed))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // wait for a checkpoint of the denoiser stage to be half-written, then kill
    let checkpoints = killed.join("checkpoints");
    let started = std::time::Instant::now();
    let mut caught = false;
    while started.elapsed() < std::time::Duration::from_secs(120) {
        let writing = std::fs::read_dir(&checkpoints).ok().is_some_and(|entries| {
            entries.filter_map(|e| e.ok()).any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with(".denoiser-") && name.contains(".tmp-")
            })
        });
        if writing {
            child.kill().unwrap();
            caught = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let _ = child.wait();
    assert!(caught, "no checkpoint write was caught in progress");
    assert!(!killed.join("model").exists(), "the run did not finish");

    let out = kiln(&["train", "--resume", killed.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, b) = (
        model_files(&straight.join("model")),
        model_files(&killed.join("model")),
    );
    assert_eq!(
        a.iter().map(|(p, _)| p).collect::<Vec<_>>(),
        b.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    for ((path, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{path} differs after the kill and resume");
    }
    // nothing half-written is left behind
    let leftovers: Vec<String> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn bad_training_input_is_one_clear_line() {
    let dir = scratch_run();
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(dir.path().join("recipe.toml")).unwrap();
    std::fs::write(&bad, text.replace("seed = 3", "seed = 3\nlearning_rat = 1")).unwrap();
    let run = dir.path().join("run");
    let out = kiln(&[
        "train",
        "--config",
        bad.to_str().unwrap(),
        "--output",
        run.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("learning_rat") && err.trim().lines().count() == 1,
        "{err}"
    );
    assert!(!run.exists(), "nothing is written for a bad recipe");

    let out = kiln(&["train", "--resume", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a Kiln training run"), "{err}");
}
