//! `kiln data shapes` and `kiln eval shapes` as a user runs them; the eval on the tiny random
//! SD 1.x pipeline of `fixtures/pipeline/sd1`, which draws noise (so it scores about 0: the test
//! checks the report, not the numbers).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_train::shapes::{Combo, HELD_OUT};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
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

/// Asserts a failed run with one `error: ` line on stderr that contains `needle`.
fn fails_with(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "should fail: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: ") && err.contains(needle), "{err}");
}

#[test]
fn data_shapes_writes_captioned_pngs_and_keeps_existing_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shapes");
    let out_s = out.to_str().unwrap();
    let args = [
        "data", "shapes", "--count", "16", "--size", "32", "--seed", "0", "--output", out_s,
    ];
    let run = kiln(&args);
    assert!(run.status.success(), "{}", stderr(&run));
    let said = stderr(&run);
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(said.contains("16 images") && said.contains(out_s), "{said}");

    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let expected: Vec<String> = (0..16)
        .flat_map(|i| [format!("{i:05}.png"), format!("{i:05}.txt")])
        .collect();
    assert_eq!(names, expected);
    for i in 0..16 {
        let caption = std::fs::read_to_string(out.join(format!("{i:05}.txt"))).unwrap();
        let combo = Combo::parse_caption(&caption).unwrap();
        assert_eq!(caption, combo.caption(), "exact caption, no newline");
        assert!(!HELD_OUT.contains(&combo));
        let decoder = png::Decoder::new(std::io::BufReader::new(
            std::fs::File::open(out.join(format!("{i:05}.png"))).unwrap(),
        ));
        let info = decoder.read_info().unwrap().info().clone();
        assert_eq!((info.width, info.height), (32, 32));
    }
    // the dataset reads back
    let data = kiln_train::ImageCaptionDataset::from_dir(&out).unwrap();
    assert_eq!(data.len(), 16);

    // an existing folder is refused, untouched, without --overwrite
    let first = std::fs::read(out.join("00000.png")).unwrap();
    let mut other_seed = args.to_vec();
    other_seed[7] = "1";
    fails_with(&kiln(&other_seed), "--overwrite");
    assert_eq!(std::fs::read(out.join("00000.png")).unwrap(), first);
    let mut replace = other_seed.clone();
    replace.push("--overwrite");
    let run = kiln(&replace);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_ne!(std::fs::read(out.join("00000.png")).unwrap(), first);
    // nothing but the folder is left beside it
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);

    // bad requests: one line, non-zero exit, no folder
    let never = tmp.path().join("never");
    let never_s = never.to_str().unwrap();
    for (count, size, needle) in [
        ("0", "32", "count 0"),
        ("4", "4", "size 4"),
        ("4", "1048576", "size 1048576"),
    ] {
        let run = kiln(&[
            "data", "shapes", "--count", count, "--size", size, "--output", never_s,
        ]);
        fails_with(&run, needle);
        assert!(!never.exists());
    }
}

#[test]
fn eval_shapes_reports_fractions_for_held_out_and_trained_prompts() {
    let model = root().join("fixtures/pipeline/sd1");
    let model_s = model.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let grid = tmp.path().join("grid.png");
    let grid_s = grid.to_str().unwrap();
    let base = [
        "eval",
        "shapes",
        "--model",
        model_s,
        "--seeds",
        "1",
        "--trained",
        "1",
        "--steps",
        "2",
    ];

    // the summary: two lines, every number a fraction
    let mut args = base.to_vec();
    args.extend(["--grid", grid_s]);
    let run = kiln(&args);
    assert!(run.status.success(), "{}", stderr(&run));
    let text = String::from_utf8(run.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    for (line, name, images) in [
        (lines[0], "held-out", HELD_OUT.len()),
        (lines[1], "trained", 1),
    ] {
        assert!(line.starts_with(name), "{line}");
        for key in ["exact", "background", "colour", "shape"] {
            let value: f64 = line
                .split_whitespace()
                .skip_while(|w| *w != key)
                .nth(1)
                .unwrap_or_else(|| panic!("no {key} in {line}"))
                .parse()
                .unwrap();
            assert!((0.0..=1.0).contains(&value), "{line}");
        }
        assert!(line.contains(&format!("({images} images")), "{line}");
    }

    // the grid: one row per prompt, one column per seed
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&grid).unwrap()));
    let info = decoder.read_info().unwrap().info().clone();
    assert!(info.width >= 128 && info.height >= 13 * 128, "{info:?}");
    // an existing grid is kept unless --overwrite
    fails_with(&kiln(&args), "--overwrite");

    // JSON: the same scores, and every sample
    let mut args = base.to_vec();
    args.push("--json");
    let run = kiln(&args);
    assert!(run.status.success(), "{}", stderr(&run));
    let v: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(v["steps"], 2);
    assert_eq!(v["seeds"], 1);
    assert_eq!(v["held_out"]["combos"], HELD_OUT.len());
    assert_eq!(v["held_out"]["images"], HELD_OUT.len());
    assert_eq!(v["trained"]["images"], 1);
    for split in ["held_out", "trained"] {
        for key in ["exact", "background", "colour", "shape"] {
            let f = v[split][key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&f), "{split}.{key} = {f}");
        }
    }
    let samples = v["samples"].as_array().unwrap();
    assert_eq!(samples.len(), HELD_OUT.len() + 1);
    assert_eq!(samples[0]["prompt"], HELD_OUT[0].caption());
    assert_eq!(samples[0]["split"], "held_out");
    assert_eq!(samples[HELD_OUT.len()]["split"], "trained");
    for s in samples {
        assert!(s["exact"].is_boolean());
        for key in ["background", "colour", "shape"] {
            assert!(
                s["seen"][key].is_null() || s["seen"][key].is_string(),
                "{s}"
            );
        }
    }

    // bad options fail before the model loads, in one line
    let mut args = base.to_vec();
    args.extend(["--scheduler", "nope"]);
    fails_with(&kiln(&args), "nope");
    let mut args = base.to_vec();
    args[5] = "0";
    fails_with(&kiln(&args), "--seeds");
    let mut args = base.to_vec();
    args[7] = "157";
    fails_with(&kiln(&args), "157");
    let mut args = base.to_vec();
    args.extend(["--grid", "grid.jpg"]);
    fails_with(&kiln(&args), ".png");
}
