//! `kiln bench` as a user runs it: progress on stderr, one JSON object as the last line of
//! stdout, with the FLOP count of the workload (checked against PyTorch's in
//! `kiln-pipeline --test flops`) and the times it measured.

use std::path::Path;
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("run kiln")
}

fn report(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().expect("a line of output");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"))
}

#[test]
fn every_workload_reports_one_json_line() {
    let cases: [(&str, &[&str]); 5] = [
        ("unet", &[]),
        ("vae-decode", &["--batch", "2"]),
        ("vae-encode", &["--height", "64", "--width", "32"]),
        ("text-encoder", &[]),
        ("pipeline", &["--steps", "2"]),
    ];
    for (workload, extra) in cases {
        let mut args = vec![
            "bench", workload, "--preset", "tiny", "--runs", "3", "--warmup", "1",
        ];
        args.extend_from_slice(extra);
        let out = kiln(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{workload}: {stderr}");
        assert!(
            stderr.contains("run 3/3"),
            "{workload}: progress on stderr: {stderr}"
        );
        let json = report(&out);
        assert_eq!(json["workload"], workload);
        assert_eq!(json["runs"], 3);
        assert_eq!(json["times_s"].as_array().unwrap().len(), 3);
        let (min, median, max) = (
            json["min_s"].as_f64().unwrap(),
            json["median_s"].as_f64().unwrap(),
            json["max_s"].as_f64().unwrap(),
        );
        assert!(0.0 < min && min <= median && median <= max, "{json}");
        let flops = json["flops"].as_u64().unwrap();
        assert!(flops > 0, "{json}");
        let rate = json["gflops_per_s"].as_f64().unwrap();
        assert!(
            (rate - flops as f64 / median / 1e9).abs() <= 1e-9 * rate,
            "{json}"
        );
        if cfg!(target_os = "linux") {
            assert!(json["peak_rss_bytes"].as_u64().unwrap() > 1 << 20, "{json}");
        }
        if workload == "vae-encode" {
            assert_eq!(
                (json["height"].as_u64(), json["width"].as_u64()),
                (Some(64), Some(32))
            );
        }
    }
}

/// The UNet's count at batch 2 is twice batch 1's (every counted op is per sample), and the
/// pipeline's is its parts: 2 text encodings, `steps` guided UNet passes and one decode.
#[test]
fn flop_counts_add_up() {
    let flops = |args: &[&str]| {
        let mut all = vec!["bench", "--preset", "tiny", "--runs", "1", "--warmup", "0"];
        all.extend_from_slice(args);
        let out = kiln(&all);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        report(&out)["flops"].as_u64().unwrap()
    };
    let unet1 = flops(&["unet", "--batch", "1"]);
    let unet2 = flops(&["unet", "--batch", "2"]);
    assert_eq!(unet2, 2 * unet1);
    let text = flops(&["text-encoder"]);
    let decode = flops(&["vae-decode"]);
    let pipeline = flops(&["pipeline", "--steps", "3"]);
    assert_eq!(pipeline, 2 * text + 3 * unet2 + decode);
}

#[test]
fn bad_options_are_one_clear_error() {
    for (args, expected) in [
        (
            &["bench", "unet", "--preset", "sd99"][..],
            "unknown preset `sd99`",
        ),
        (
            &["bench", "unet", "--preset", "tiny", "--height", "30"],
            "multiples of the VAE's factor 4 (got 30x32)",
        ),
        (
            &["bench", "unet", "--preset", "tiny", "--runs", "0"],
            "--runs must be at least 1",
        ),
        (
            &["bench", "unet", "--model", "/no/such/folder"],
            "/no/such/folder",
        ),
    ] {
        let out = kiln(args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: no report on failure");
    }
}

#[test]
fn a_model_folder_is_timed_with_its_own_weights() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/pipeline/sd1");
    let out = kiln(&[
        "bench",
        "unet",
        "--model",
        dir.to_str().unwrap(),
        "--runs",
        "1",
        "--height",
        "32",
        "--width",
        "48",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = report(&out);
    assert_eq!(json["model"], dir.to_str().unwrap());
    assert_eq!(
        (json["height"].as_u64(), json["width"].as_u64()),
        (Some(32), Some(48))
    );
}

/// `--profile`: the time by kind of op on stderr and in the JSON, whose recorded FLOPs are the
/// workload's whole count (every counted op is recorded once), and whose times with the rest
/// (`other_s`) add up to the timed runs.
#[test]
fn profile_accounts_for_every_counted_flop_and_the_runs_time() {
    for (workload, kinds) in [
        (
            "unet",
            &["linear", "conv", "attention", "norm", "activation"][..],
        ),
        ("vae-decode", &["conv", "norm"][..]),
        ("text-encoder", &["linear", "attention", "activation"][..]),
        (
            "pipeline",
            &["linear", "conv", "attention", "norm", "activation"][..],
        ),
    ] {
        let out = kiln(&[
            "bench",
            workload,
            "--preset",
            "tiny",
            "--runs",
            "2",
            "--warmup",
            "0",
            "--steps",
            "2",
            "--profile",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{workload}: {stderr}");
        assert!(stderr.contains("profile, per run"), "{workload}: {stderr}");
        let json = report(&out);
        let profile = &json["profile"];
        let listed: Vec<&str> = profile["kinds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kind"].as_str().unwrap())
            .collect();
        assert_eq!(listed, kinds, "{workload}: {profile}");
        let sum = |field: &str, of: &str| -> f64 {
            profile[of]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k[field].as_f64().unwrap())
                .sum()
        };
        // over two runs, each op counted twice
        let flops = json["flops"].as_f64().unwrap();
        assert_eq!(sum("flops", "kinds"), 2.0 * flops, "{workload}: {profile}");
        assert_eq!(sum("flops", "ops"), 2.0 * flops, "{workload}: {profile}");
        let runs: f64 = json["times_s"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_f64().unwrap())
            .sum();
        let other = profile["other_s"].as_f64().unwrap();
        assert!(other >= 0.0, "{workload}: {profile}");
        assert!(
            (sum("seconds", "kinds") + other - runs).abs() <= 1e-6 * runs,
            "{workload}: {profile} against {runs} s"
        );
    }
    // without the flag, no profile
    let out = kiln(&[
        "bench", "unet", "--preset", "tiny", "--runs", "1", "--warmup", "0",
    ]);
    assert!(report(&out).get("profile").is_none());
}
