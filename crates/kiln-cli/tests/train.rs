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
    let args = |extra: &[&str]| {
        let mut v = vec![
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.path().to_str().unwrap(),
            "--output",
            tuned.to_str().unwrap(),
            "--steps",
            "3",
            "--resolution",
            "16",
            "--batch",
            "2",
        ];
        v.extend_from_slice(extra);
        v.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        kiln(&a.iter().map(String::as_str).collect::<Vec<_>>())
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
