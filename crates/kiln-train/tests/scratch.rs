//! Training from scratch ([`kiln_train::run`]): a recipe's two stages on a tiny shapes dataset,
//! stopped and resumed exactly, the text encoder learning, the VAE's error falling, and bad
//! recipes and checkpoints refused with one clear message.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use kiln_train::run::{Observer, Silent, resume, start};
use kiln_train::shapes::{ShapesSpec, generate};
use kiln_train::{Error, ImageCaptionDataset, Recipe, VaeTrainConfig, VaeTrainer};

/// The tiny test recipe (`fixtures/training/tiny-recipe.toml`) with the data folder `data` and
/// `steps` per stage.
fn recipe_text(data: &Path, steps: usize) -> String {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/training/tiny-recipe.toml");
    std::fs::read_to_string(path)
        .unwrap()
        .replace("dir = \"shapes\"", &format!("dir = \"{}\"", data.display()))
        .replace("steps = 4", &format!("steps = {steps}"))
}

fn write_recipe(dir: &Path, data: &Path, steps: usize) -> PathBuf {
    let path = dir.join("recipe.toml");
    std::fs::write(&path, recipe_text(data, steps)).unwrap();
    path
}

fn shapes(dir: &Path) -> PathBuf {
    let data = dir.join("shapes");
    generate(&ShapesSpec::new(12, 16, 0), &data).unwrap();
    data
}

fn device() -> burn::tensor::Device {
    kiln_nn::parse_device("flex").unwrap()
}

/// Stops after `at` steps of `stage`.
struct StopAt {
    stage: String,
    at: usize,
    current: String,
    step: usize,
}

impl Observer for StopAt {
    fn stage(&mut self, stage: &str, step: usize, _total: usize) {
        self.current = stage.to_string();
        self.step = step;
    }
    fn step(&mut self, _loss: f64) -> ControlFlow<()> {
        self.step += 1;
        if self.current == self.stage && self.step == self.at {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
    fn message(&mut self, _message: &str) {}
}

fn stop_at(stage: &str, at: usize) -> StopAt {
    StopAt {
        stage: stage.into(),
        at,
        current: String::new(),
        step: 0,
    }
}

/// Every file under `dir` with its bytes, by relative path.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
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

#[test]
fn stopped_and_resumed_runs_equal_a_straight_run_to_the_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = if let Ok(keep) = std::env::var("KILN_KEEP") {
        let _ = tmp.keep();
        std::fs::create_dir_all(&keep).unwrap();
        tempfile::tempdir_in(keep).unwrap().keep()
    } else {
        tmp.path().to_path_buf()
    };
    let tmp = &tmp;
    let data = shapes(tmp);
    let recipe = Recipe::from_file(&write_recipe(tmp, &data, 4)).unwrap();
    let device = device();

    let straight = tmp.join("straight");
    let model = start(&recipe, &straight, false, &device, &mut Silent).unwrap();
    assert_eq!(model, straight.join("model"));

    // stopped in each stage (once between checkpoints, once right after one), resumed each time
    let stopped = tmp.join("stopped");
    let err = start(&recipe, &stopped, false, &device, &mut stop_at("vae", 3)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Stopped {
                stage: "vae",
                step: 3
            }
        ),
        "{err}"
    );
    let err = resume(&stopped, &device, &mut stop_at("denoiser", 2)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Stopped {
                stage: "denoiser",
                step: 2
            }
        ),
        "{err}"
    );
    resume(&stopped, &device, &mut Silent).unwrap();

    let (a, b) = (
        files(&straight.join("model")),
        files(&stopped.join("model")),
    );
    assert!(
        a.iter()
            .any(|(p, _)| p.ends_with("diffusion_pytorch_model.safetensors"))
    );
    // the same losses and learning rates (the seconds differ)
    let losses = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("loss.csv"))
            .unwrap()
            .lines()
            .map(|l| l.split(',').take(4).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(losses(&straight), losses(&stopped));
    assert_eq!(a.len(), b.len());
    let differing: Vec<&String> = a
        .iter()
        .zip(&b)
        .filter(|((_, da), (_, db))| da != db)
        .map(|((p, _), _)| p)
        .collect();
    assert!(
        differing.is_empty(),
        "{differing:?} differ between the straight and the resumed run"
    );
    // the log has each step once, in order
    let log = std::fs::read_to_string(stopped.join("loss.csv")).unwrap();
    let steps: Vec<String> = log
        .lines()
        .skip(1)
        .map(|l| l.split(',').take(2).collect::<Vec<_>>().join(","))
        .collect();
    let want: Vec<String> = ["vae", "denoiser"]
        .iter()
        .flat_map(|s| (1..=4).map(move |i| format!("{i},{s}")))
        .collect();
    assert_eq!(steps, want);
    assert!(
        log.starts_with("step,stage,loss,learning_rate,seconds\n"),
        "{log}"
    );
    assert!(stopped.join("loss.png").is_file());
    assert!(stopped.join("train.toml").is_file());
    // the newest two checkpoints of each stage are kept
    let mut kept: Vec<String> = std::fs::read_dir(stopped.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        [
            "denoiser-000002",
            "denoiser-000004",
            "vae-000002",
            "vae-000004"
        ]
    );
    // model files are shared files (burn-store alone writes them 0600)
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta =
            std::fs::metadata(straight.join("model/unet/diffusion_pytorch_model.safetensors"))
                .unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    }
    // a denoiser checkpoint is a usable model folder, generation defaults included
    assert!(
        stopped
            .join("checkpoints/denoiser-000002/kiln.json")
            .is_file()
    );

    // the trained folder is a pipeline Kiln loads, with its generation defaults
    let pipe = kiln_pipeline::StableDiffusionPipeline::from_pretrained(
        &straight.join("model"),
        kiln_pipeline::LoadOptions::default(),
        &device,
    )
    .unwrap();
    assert_eq!(pipe.default_size(), (16, 16));
    assert_eq!(
        (pipe.generation.steps, pipe.generation.guidance_scale),
        (7, 3.0)
    );
}

#[test]
fn the_text_encoder_learns_and_the_vae_error_falls() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path());
    let recipe = Recipe::from_file(&write_recipe(tmp.path(), &data, 2)).unwrap();
    let device = device();

    // the VAE stage alone: its reconstruction error falls
    let vae = kiln_vae::AutoencoderKL::init(&recipe.vae, 0, &device).unwrap();
    let dataset = ImageCaptionDataset::from_dir(&data).unwrap();
    let mut trainer = VaeTrainer::new(
        vae,
        recipe.models["vae"].clone(),
        dataset,
        VaeTrainConfig {
            resolution: 16,
            batch_size: 4,
            learning_rate: 3e-3,
            ..VaeTrainConfig::default()
        },
        &device,
    )
    .unwrap();
    let before = trainer.eval_reconstruction(8).unwrap();
    for _ in 0..60 {
        trainer.step().unwrap();
    }
    let after = trainer.eval_reconstruction(8).unwrap();
    eprintln!("reconstruction error {before} -> {after}");
    assert!(
        after < 0.6 * before,
        "reconstruction error {before} -> {after}"
    );

    // the whole run: the text encoder's weights moved from their initial values
    let out = tmp.path().join("run");
    let model = start(&recipe, &out, false, &device, &mut Silent).unwrap();
    let initial = kiln_clip::ClipTextModel::init(&recipe.text_encoder, recipe.seed + 2, &device);
    let trained = kiln_clip::ClipTextModel::from_dir(model.join("text_encoder"), &device).unwrap();
    let w = |m: &kiln_clip::ClipTextModel| {
        m.encoder.layers[0]
            .self_attn
            .q_proj
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap()
    };
    let moved = w(&initial)
        .iter()
        .zip(w(&trained))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-5, "the text encoder did not change ({moved})");
}

#[test]
fn bad_recipes_and_runs_are_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path());
    let base = recipe_text(&data, 2);
    let check = |text: String, needle: &str| {
        let path = tmp.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let err = Recipe::from_file(&path).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
        assert!(err.contains("bad.toml"), "names the file: {err}");
    };
    check(base.replace("seed = 3", "seed = 3\nsede = 4"), "sede");
    check(
        base.replace(
            "layers_per_block = 1\nlatent",
            "layers_per_block = 1\nlayer_per_block = 2\nlatent",
        ),
        "layer_per_block",
    );
    check(
        base.replace("cross_attention_dim = 16", "cross_attention_dim = 24"),
        "cross_attention_dim",
    );
    check(
        base.replace(
            "block_out_channels = [8, 16]",
            "block_out_channels = [8, 18]",
        ),
        "norm_num_groups",
    );
    check(
        base.replace("learning_rate = 1e-3", "learning_rate = 0.0"),
        "learning rate",
    );
    check(
        base.replace("resolution = 16", "resolution = 10"),
        "resolution",
    );

    // an existing output folder is kept
    let recipe = Recipe::from_file(&write_recipe(tmp.path(), &data, 2)).unwrap();
    let out = tmp.path().join("exists");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let err = start(&recipe, &out, false, &device(), &mut Silent).unwrap_err();
    assert!(matches!(err, Error::OutputExists { .. }), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    let err = resume(&out, &device(), &mut Silent).unwrap_err();
    assert!(err.to_string().contains("not a Kiln training run"), "{err}");

    // a checkpoint of another model shape is refused, naming the mismatch
    let run = tmp.path().join("run");
    let _ = start(&recipe, &run, false, &device(), &mut stop_at("vae", 2));
    let edited = std::fs::read_to_string(run.join("train.toml"))
        .unwrap()
        .replace(
            "block_out_channels = [8, 16]",
            "block_out_channels = [8, 24]",
        );
    std::fs::write(run.join("train.toml"), edited).unwrap();
    let err = resume(&run, &device(), &mut Silent)
        .unwrap_err()
        .to_string();
    assert!(err.contains("another model"), "{err}");
}

/// The embedded model's recipe (`configs/tiny-shapes.toml`) parses and trains: one step of each
/// stage on a few generated images of its size (CI's smoke run of the real config).
#[test]
fn the_shipped_recipe_trains() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let shipped = root.join("configs/tiny-shapes.toml");
    let recipe = Recipe::from_file(&shipped).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("shapes");
    generate(&ShapesSpec::new(16, recipe.resolution, 0), &data).unwrap();
    let text = std::fs::read_to_string(&shipped).unwrap();
    let copy = tmp.path().join("tiny-shapes.toml");
    std::fs::write(
        &copy,
        text.replace("dir = \"../data/shapes\"", "dir = \"shapes\""),
    )
    .unwrap();
    let recipe = Recipe::from_file(&copy).unwrap().with_steps(1, 1, 1);
    let model = start(
        &recipe,
        &tmp.path().join("run"),
        false,
        &device(),
        &mut Silent,
    )
    .unwrap();
    let pipe = kiln_pipeline::StableDiffusionPipeline::from_pretrained(
        &model,
        kiln_pipeline::LoadOptions::default(),
        &device(),
    )
    .unwrap();
    assert_eq!(pipe.default_size(), (recipe.resolution, recipe.resolution));
}

/// A corrupt image is reported once and left out; a caption without its image is one clear
/// error; a loss that stops being a number ends the run with a message and keeps the last good
/// checkpoint, from which the run resumes.
#[test]
fn bad_data_and_diverging_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path());
    std::fs::write(data.join("zz-broken.png"), b"not a png").unwrap();
    std::fs::write(
        data.join("zz-broken.txt"),
        "a red circle on a blue background",
    )
    .unwrap();
    let mut dataset = ImageCaptionDataset::from_dir(&data).unwrap();
    let n = dataset.len();
    let skipped = dataset.drop_unreadable();
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0].0.ends_with("zz-broken.png"));
    assert_eq!(dataset.len(), n - 1);

    // the run reports it and trains on the rest
    struct Messages(Vec<String>);
    impl Observer for Messages {
        fn stage(&mut self, _: &str, _: usize, _: usize) {}
        fn step(&mut self, _: f64) -> ControlFlow<()> {
            ControlFlow::Continue(())
        }
        fn message(&mut self, m: &str) {
            self.0.push(m.to_string());
        }
    }
    let recipe = Recipe::from_file(&write_recipe(tmp.path(), &data, 1)).unwrap();
    let mut seen = Messages(Vec::new());
    start(&recipe, &tmp.path().join("ok"), false, &device(), &mut seen).unwrap();
    assert_eq!(
        seen.0
            .iter()
            .filter(|m| m.contains("zz-broken.png"))
            .count(),
        1,
        "{:?}",
        seen.0
    );

    // a caption whose image is missing
    std::fs::remove_file(data.join("zz-broken.png")).unwrap();
    let err = ImageCaptionDataset::from_dir(&data)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("zz-broken.txt") && err.contains("no image"),
        "{err}"
    );
    std::fs::remove_file(data.join("zz-broken.txt")).unwrap();

    // an absurd learning rate makes the VAE's loss infinite: the run stops, the checkpoint
    // before it stays
    let text = recipe_text(&data, 4).replace("learning_rate = 2e-3", "learning_rate = 1e30");
    let path = tmp.path().join("diverging.toml");
    std::fs::write(&path, text.replace("every = 2", "every = 1")).unwrap();
    let recipe = Recipe::from_file(&path).unwrap();
    let run = tmp.path().join("diverging");
    let err = start(&recipe, &run, false, &device(), &mut Silent).unwrap_err();
    assert!(err.to_string().contains("lower the learning rate"), "{err}");
    let Error::NonFiniteLoss { step, .. } = err else {
        panic!("{err}")
    };
    assert!(step >= 2, "the first step's loss is finite");
    let last_good = run.join(format!("checkpoints/vae-{:06}", step - 1));
    assert!(last_good.join("training_state/state.json").is_file());
}
