//! `cargo xtask bench-compare`: the same workloads through `kiln bench` (release build) and
//! through diffusers / PyTorch (`xtask/bench/torch_bench.py` in the venv, 2 threads), the two
//! alternating run by run so that a change in the machine's load hits both, then the table of
//! time ratios written into docs/performance.md (between its `bench-compare` markers) and a plot
//! of seconds per UNet step against resolution (`docs/images/unet-seconds-vs-resolution.png`;
//! AVX2 code's, `--hide-avx512` or a CPU without AVX-512, `...-avx2.png`).
//!
//! Every result is appended to `target/bench-compare/results.jsonl` as it comes, so a stopped
//! run keeps what it measured; `--report` redraws the table and the plot from that file alone.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use serde_json::Value;

/// One workload, as `kiln bench` and `torch_bench.py` both take it.
#[derive(Debug, Clone)]
struct Config {
    workload: &'static str,
    preset: &'static str,
    batch: usize,
    size: usize,
    steps: usize,
    dtype: &'static str,
    warmup: usize,
    runs: usize,
}

impl Config {
    fn args(&self) -> Vec<String> {
        let mut args = vec![
            self.workload.to_string(),
            "--preset".into(),
            self.preset.into(),
            "--batch".into(),
            self.batch.to_string(),
            "--height".into(),
            self.size.to_string(),
            "--width".into(),
            self.size.to_string(),
            "--dtype".into(),
            self.dtype.into(),
            "--warmup".into(),
            self.warmup.to_string(),
            "--runs".into(),
            self.runs.to_string(),
        ];
        if self.workload == "pipeline" {
            args.extend(["--steps".into(), self.steps.to_string()]);
        }
        args
    }

    fn key(&self) -> String {
        format!(
            "{} {} b{} {}px {}{}",
            self.workload,
            self.preset,
            self.batch,
            self.size,
            self.dtype,
            if self.workload == "pipeline" {
                format!(" {} steps", self.steps)
            } else {
                String::new()
            }
        )
    }
}

fn config(workload: &'static str, batch: usize, size: usize, runs: usize) -> Config {
    Config {
        workload,
        preset: "sd15",
        batch,
        size,
        steps: 20,
        dtype: "f32",
        warmup: 1,
        runs,
    }
}

/// The configurations of a set: `quick` (a few minutes), `goals` (the rows the speed goals are
/// stated for: the UNet at 256 and 512 px, a 512 px decode, a 20-step 512 px generation; about
/// 15 minutes) or `full` (the table: the UNet at 256 to 1024 px, the VAE, the text
/// encoder, a 20-step 512 px generation; about an hour on 2 cores).
fn configs(set: &str, bf16: bool) -> Result<Vec<Config>> {
    let mut all = match set {
        "quick" => vec![
            config("unet", 2, 256, 2),
            config("vae-decode", 1, 256, 2),
            config("text-encoder", 2, 512, 3),
        ],
        "full" => vec![
            config("unet", 2, 256, 3),
            config("unet", 2, 512, 2),
            config("unet", 2, 768, 1),
            config("unet", 2, 1024, 1),
            config("vae-decode", 1, 512, 1),
            config("vae-encode", 1, 512, 1),
            config("text-encoder", 2, 512, 3),
            Config {
                warmup: 0,
                ..config("pipeline", 1, 512, 1)
            },
        ],
        "goals" => vec![
            config("unet", 2, 256, 2),
            config("unet", 2, 512, 2),
            config("vae-decode", 1, 512, 1),
            Config {
                warmup: 0,
                ..config("pipeline", 1, 512, 1)
            },
        ],
        other => bail!("unknown set `{other}`: use quick, goals or full"),
    };
    if bf16 {
        for side in [256, 512] {
            all.push(Config {
                dtype: "bf16",
                ..config("unet", 2, side, 2)
            });
        }
    }
    Ok(all)
}

fn last_json(stdout: &[u8]) -> Result<Value> {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().last().context("no output")?;
    serde_json::from_str(line).with_context(|| format!("not a JSON report: {line}"))
}

fn measure(cmd: &mut Command) -> Result<Value> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    last_json(&out.stdout)
}

/// Runs the set, appending every result to `results`; then writes the report. With `hidden`
/// (the `hide-isa` library), both sides run with AVX-512 hidden from them.
pub fn run(
    root: &Path,
    python: &Path,
    set: &str,
    rounds: usize,
    bf16: bool,
    hidden: Option<&Path>,
) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::run(Command::new(&cargo).current_dir(root).args([
        "build",
        "--release",
        "-p",
        "kiln-cli",
    ]))?;
    let kiln = root.join("target/release/kiln");
    let out_dir = root.join("target/bench-compare");
    std::fs::create_dir_all(&out_dir)?;
    let results = out_dir.join("results.jsonl");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&results)?;
    let session = now();
    for config in configs(set, bf16)? {
        for round in 0..rounds {
            // alternate which side runs first, so drift in the machine's load evens out
            let sides = if round % 2 == 0 {
                ["kiln", "pytorch"]
            } else {
                ["pytorch", "kiln"]
            };
            for side in sides {
                eprintln!("bench-compare: {} round {} {side}", config.key(), round + 1);
                let mut cmd = if side == "kiln" {
                    let mut cmd = Command::new(&kiln);
                    cmd.arg("bench")
                        .args(config.args())
                        .env("RAYON_NUM_THREADS", "2");
                    cmd
                } else {
                    let mut cmd = Command::new(python);
                    cmd.arg(root.join("xtask/bench/torch_bench.py"))
                        .args(config.args())
                        .args(["--threads", "2"]);
                    crate::python_env(&mut cmd, root);
                    cmd
                };
                if let Some(library) = hidden {
                    crate::hide_isa::apply(&mut cmd, library);
                }
                let mut report = measure(&mut cmd)?;
                if hidden.is_some() {
                    report["hidden_isa"] = "avx512".into();
                }
                report["side"] = side.into();
                report["round"] = round.into();
                report["key"] = config.key().into();
                report["session"] = session.clone().into();
                writeln!(file, "{report}")?;
                file.flush()?;
                eprintln!(
                    "bench-compare:   median {:.3} s",
                    report["median_s"].as_f64().unwrap_or(f64::NAN)
                );
            }
        }
    }
    report(root, &results, Some(&session))
}

fn now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn cpu() -> String {
    let name = cpu_name();
    let mut simd = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            simd.push("AVX-512");
        } else if std::is_x86_feature_detected!("avx2") {
            simd.push("AVX2 (no AVX-512)");
        }
        if std::is_x86_feature_detected!("avx512bf16") {
            simd.push("AVX512-BF16");
        }
        // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        if leaf7.edx & (1 << 22) != 0 && leaf7.edx & (1 << 24) != 0 {
            simd.push("AMX-BF16");
        }
    }
    format!("{name} ({})", simd.join(", "))
}

/// A row of the table: one configuration's paired medians.
struct Row {
    key: String,
    workload: String,
    size: u64,
    kiln: Vec<f64>,
    torch: Vec<f64>,
    kiln_rss: u64,
    torch_rss: u64,
    kiln_gflops: f64,
    torch_gflops: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Writes the table into docs/performance.md and the plot, from `results` (the given session's
/// lines, or the newest session's).
pub fn report(root: &Path, results: &Path, session: Option<&str>) -> Result<()> {
    let text = std::fs::read_to_string(results)
        .with_context(|| format!("cannot read {}", results.display()))?;
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    let session = match session {
        Some(s) => s.to_string(),
        None => lines
            .last()
            .and_then(|l| l["session"].as_str())
            .context("no results")?
            .to_string(),
    };
    let session_lines: Vec<&Value> = lines
        .iter()
        .filter(|l| l["session"] == session.as_str())
        .collect();
    let mut rows: Vec<Row> = Vec::new();
    for line in &session_lines {
        let key = line["key"].as_str().unwrap_or_default().to_string();
        let index = match rows.iter().position(|r| r.key == key) {
            Some(i) => i,
            None => {
                rows.push(Row {
                    key: key.clone(),
                    workload: line["workload"].as_str().unwrap_or_default().into(),
                    size: line["height"].as_u64().unwrap_or(0),
                    kiln: vec![],
                    torch: vec![],
                    kiln_rss: 0,
                    torch_rss: 0,
                    kiln_gflops: 0.0,
                    torch_gflops: 0.0,
                });
                rows.len() - 1
            }
        };
        let row = &mut rows[index];
        let t = line["median_s"].as_f64().unwrap_or(f64::NAN);
        let rss = line["peak_rss_bytes"].as_u64().unwrap_or(0);
        let rate = line["gflops_per_s"].as_f64().unwrap_or(f64::NAN);
        if line["side"] == "kiln" {
            row.kiln.push(t);
            row.kiln_rss = row.kiln_rss.max(rss);
            row.kiln_gflops = row.kiln_gflops.max(rate);
        } else {
            row.torch.push(t);
            row.torch_rss = row.torch_rss.max(rss);
            row.torch_gflops = row.torch_gflops.max(rate);
        }
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut table = String::new();
    let rounds = session_lines
        .iter()
        .filter_map(|l| l["round"].as_u64())
        .max()
        .map_or(0, |r| r + 1);
    let hidden = session_lines.iter().any(|l| l["hidden_isa"].is_string());
    // Kiln's side lists the vector extensions it detected: an x86 CPU without AVX-512 (Zen 3)
    // runs the same AVX2 code that `--hide-avx512` shows, so its table goes beside that one.
    let avx2_only = !hidden
        && session_lines.iter().any(|l| {
            l["simd"]
                .as_array()
                .is_some_and(|s| s.iter().any(|v| v == "avx2") && !s.iter().any(|v| v == "avx512f"))
        });
    let machine = if hidden {
        let torch_seen = session_lines
            .iter()
            .find_map(|l| l["cpu_capability"].as_str())
            .unwrap_or("?")
            .to_string();
        let seen = session_lines
            .iter()
            .find_map(|l| l["simd"].as_array())
            .map(|s| {
                s.iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        format!(
            "{} with AVX-512, AVX-VNNI and AMX hidden from both sides (`--hide-avx512`; Kiln \
             detected {seen}, PyTorch's ATen {torch_seen})",
            cpu_name()
        )
    } else {
        cpu()
    };
    let order = if rounds > 1 {
        format!("{rounds} rounds, the side that runs first swapping each round")
    } else {
        "one round, Kiln first".to_string()
    };
    writeln!(
        table,
        "Measured {session} on {machine} with 2 threads each, PyTorch {}, `cargo xtask \
         bench-compare` ({order}; medians of each side's runs, the ratio of the medians):\n",
        lines
            .iter()
            .find_map(|l| l["torch"].as_str())
            .unwrap_or("?")
    )?;
    writeln!(
        table,
        "| workload (SD 1.5 shapes, random weights) | Kiln | PyTorch | Kiln / PyTorch time | Kiln GFLOP/s | PyTorch GFLOP/s | peak RSS Kiln / PyTorch |"
    )?;
    writeln!(table, "|---|---|---|---|---|---|---|")?;
    for r in &rows {
        let (k, t) = (median(&r.kiln), median(&r.torch));
        writeln!(
            table,
            "| {} | {k:.2} s | {t:.2} s | **{:.2}** | {:.0} | {:.0} | {:.2} / {:.2} GiB |",
            r.key,
            k / t,
            r.kiln_gflops,
            r.torch_gflops,
            gib(r.kiln_rss),
            gib(r.torch_rss),
        )?;
    }
    print!("{table}");
    let docs = root.join("docs/performance.md");
    let doc = std::fs::read_to_string(&docs)?;
    // AVX2 code's table and plot (a hidden run or a CPU without AVX-512) beside the main ones
    let avx2_table = hidden || avx2_only;
    let (start, end, heading) = if avx2_table {
        (
            "<!-- bench-compare avx2 -->",
            "<!-- /bench-compare avx2 -->",
            "### AVX2 code: an AVX2-only CPU, or AVX-512 hidden",
        )
    } else {
        (
            "<!-- bench-compare -->",
            "<!-- /bench-compare -->",
            "## Side by side with PyTorch",
        )
    };
    let new_doc = match (doc.find(start), doc.find(end)) {
        (Some(a), Some(b)) if a < b => format!("{}{start}\n{table}{}", &doc[..a], &doc[b..]),
        _ => format!("{doc}\n{heading}\n\n{start}\n{table}{end}\n"),
    };
    std::fs::write(&docs, new_doc)?;
    let png = if avx2_table {
        "unet-seconds-vs-resolution-avx2.png"
    } else {
        "unet-seconds-vs-resolution.png"
    };
    let code = match (hidden, avx2_only) {
        (true, _) => ", AVX-512 hidden",
        (false, true) => ", AVX2",
        _ => "",
    };
    let unet: Vec<&Row> = rows
        .iter()
        .filter(|r| r.workload == "unet" && r.key.contains("f32"))
        .collect();
    if unet.len() >= 2 {
        plot(
            &root.join("docs/images").join(png),
            &unet,
            &format!("{session}, {}{code}", cpu_name()),
        )?;
    }
    Ok(())
}

const FONT: &[u8] = include_bytes!("../../crates/kiln-train/assets/DejaVuSans-Subset.ttf");

fn plot(png: &Path, rows: &[&Row], run: &str) -> Result<()> {
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let (width, height) = (900u32, 560u32);
    let mut pixels = vec![255u8; (width * height * 3) as usize];
    {
        let area = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        area.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let max_t = rows
            .iter()
            .flat_map(|r| [median(&r.kiln), median(&r.torch)])
            .fold(0.0f64, f64::max);
        let max_px = rows.iter().map(|r| r.size).max().unwrap_or(1024) as f64;
        // the run and the machine on a line of their own: a CPU's name can be as wide as the
        // plot at the title's size
        let area = area
            .margin(10, 0, 0, 0)
            .titled(
                "SD 1.5 UNet step (batch 2, f32, 2 threads)",
                ("sans-serif", 20),
            )
            .and_then(|area| area.titled(run, ("sans-serif", 14)))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut chart = ChartBuilder::on(&area)
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..max_px * 1.08, 0f64..max_t * 1.12)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("image side (px)")
            .y_desc("seconds per UNet forward")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (name, color, pick) in [
            ("Kiln (flex)", RGBColor(200, 70, 30), 0usize),
            ("PyTorch", RGBColor(40, 90, 180), 1),
        ] {
            let points: Vec<(f64, f64)> = rows
                .iter()
                .map(|r| {
                    let t = if pick == 0 {
                        median(&r.kiln)
                    } else {
                        median(&r.torch)
                    };
                    (r.size as f64, t)
                })
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 5, color.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        area.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let tmp: PathBuf = png.with_extension("png.tmp");
    {
        let file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        let mut encoder = ::png::Encoder::new(file, width, height);
        encoder.set_color(::png::ColorType::Rgb);
        encoder.set_depth(::png::BitDepth::Eight);
        encoder.write_header()?.write_image_data(&pixels)?;
    }
    std::fs::rename(&tmp, png)?;
    Ok(())
}
