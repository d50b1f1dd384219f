//! `cargo xtask`: developer tasks that need Python (the reference implementations).
//!
//! `cargo xtask fixtures` makes a git-ignored virtualenv at `.venv`, installs the pinned reference
//! libraries from `xtask/requirements.txt`, and runs every script in `xtask/fixtures/` (in name
//! order) to write the seeded fixtures under `fixtures/`. Tests read only those committed files.
//!
//! `cargo xtask emulate-cpu` runs the test suite on an emulated CPU model (qemu's user-mode
//! emulator), so an AVX-512 machine can check what an AVX2-only one computes
//! (docs/determinism.md); `cargo xtask hide-isa` runs any command at native speed with AVX-512
//! hidden from feature detection, where the CPU offers CPUID faulting.

use std::path::{Path, PathBuf};
use std::process::Command;

mod bench_compare;
mod hide_isa;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Kiln developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Create the Python venv (if needed) and regenerate the reference fixtures under `fixtures/`.
    Fixtures {
        /// Run only the fixture scripts whose file name contains this text (e.g. `clip`).
        #[arg(long)]
        only: Option<String>,
    },
    /// Create or update the Python venv with the pinned reference libraries.
    Venv,
    /// Run a Python script from `xtask/` in the venv, passing the remaining arguments
    /// (for example `cargo xtask py full_size.py --check`).
    Py {
        /// The script, relative to `xtask/`.
        script: String,
        /// Arguments for the script.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Time the same workloads through `kiln bench` (release) and diffusers / PyTorch (the venv,
    /// 2 threads), alternating, and write the ratio table into docs/performance.md and the UNet
    /// plot into docs/images/ (results kept in target/bench-compare/results.jsonl).
    BenchCompare {
        /// `quick` (minutes), `goals` (the UNet at 256 and 512 px, a 512 px decode, a 20-step
        /// generation; about 15 minutes) or `full` (the UNet at 256 to 1024 px, VAE, text
        /// encoder, a 20-step generation; about an hour on 2 cores).
        #[arg(long, default_value = "quick")]
        set: String,
        /// Rounds of each configuration (each side once per round).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Also time the UNet in bf16 (256 and 512 px).
        #[arg(long)]
        bf16: bool,
        /// Only redraw the table and the plot from the saved results.
        #[arg(long)]
        report: bool,
        /// Hide AVX-512, AVX-VNNI and AMX from both sides (as `hide-isa` does): the table of an
        /// AVX2-only CPU's code on this machine, written under its own heading.
        #[arg(long)]
        hide_avx512: bool,
    },
    /// Run a command with AVX-512 (every subset), AVX-VNNI and AMX hidden from run-time feature
    /// detection, at native speed (CPUID faulting, where /proc/cpuinfo lists `cpuid_fault`), e.g.
    /// `cargo xtask hide-isa -- cargo test -p kiln-nn --release` runs the AVX2 kernel clones.
    HideIsa {
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Run `cargo test --no-fail-fast` (on the workspace, or on the `-p` packages given) with
    /// every test binary under qemu's user-mode
    /// emulation of another CPU model (Debian package `qemu-user`), e.g. `EPYC-Milan` (Zen 3:
    /// AVX2 and FMA, no AVX-512) on an AVX-512 machine. Binaries the tests start themselves (the
    /// `kiln` CLI) still run natively.
    EmulateCpu {
        /// A qemu CPU model (`qemu-x86_64 -cpu help` lists them).
        #[arg(long, default_value = "EPYC-Milan")]
        cpu: String,
        /// More arguments for `cargo test` (for example `-p kiln-train`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Makes `.venv` and installs the pinned requirements; returns the venv's python.
fn venv(root: &Path) -> Result<PathBuf> {
    let venv = root.join(".venv");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "-r"])
        .arg(root.join("xtask/requirements.txt")))?;
    Ok(python)
}

pub(crate) fn python_env(cmd: &mut Command, root: &Path) {
    cmd.current_dir(root)
        .env("PYTHONHASHSEED", "0")
        .env("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        .env("HF_HUB_OFFLINE", "1")
        .env("TOKENIZERS_PARALLELISM", "false");
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = root();
    match cli.command {
        Task::Venv => {
            venv(&root)?;
        }
        Task::Fixtures { only } => {
            let python = venv(&root)?;
            let mut scripts: Vec<PathBuf> = std::fs::read_dir(root.join("xtask/fixtures"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "py"))
                .filter(|p| {
                    !p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('_'))
                })
                .filter(|p| {
                    only.as_ref().is_none_or(|o| {
                        p.file_name()
                            .is_some_and(|n| n.to_string_lossy().contains(o.as_str()))
                    })
                })
                .collect();
            scripts.sort();
            if scripts.is_empty() {
                bail!("no fixture script matches");
            }
            for script in scripts {
                eprintln!("xtask: running {}", script.display());
                let mut cmd = Command::new(&python);
                cmd.arg(&script);
                python_env(&mut cmd, &root);
                run(&mut cmd)?;
            }
        }
        Task::Py { script, args } => {
            let python = venv(&root)?;
            let mut cmd = Command::new(&python);
            cmd.arg(root.join("xtask").join(script)).args(args);
            python_env(&mut cmd, &root);
            run(&mut cmd)?;
        }
        Task::BenchCompare {
            set,
            rounds,
            bf16,
            report,
            hide_avx512,
        } => {
            if report {
                bench_compare::report(
                    &root,
                    &root.join("target/bench-compare/results.jsonl"),
                    None,
                )?;
            } else {
                let python = venv(&root)?;
                let hidden = hide_avx512.then(|| hide_isa::library(&root)).transpose()?;
                bench_compare::run(&root, &python, &set, rounds.max(1), bf16, hidden.as_deref())?;
            }
        }
        Task::HideIsa { command } => {
            let library = hide_isa::library(&root)?;
            let mut cmd = Command::new(&command[0]);
            cmd.args(&command[1..]);
            hide_isa::apply(&mut cmd, &library);
            run(&mut cmd)?;
        }
        Task::EmulateCpu { cpu, args } => {
            let probe = Command::new("qemu-x86_64").args(["-cpu", "help"]).output();
            match probe {
                Ok(out) if String::from_utf8_lossy(&out.stdout).contains(&cpu) => {}
                Ok(_) => bail!(
                    "qemu-x86_64 knows no CPU model `{cpu}`: `qemu-x86_64 -cpu help` lists them"
                ),
                Err(_) => bail!("qemu-x86_64 is not installed: `apt-get install qemu-user`"),
            }
            // cargo starts every test binary through the target's runner
            run(
                Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                    .current_dir(&root)
                    .env(
                        "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER",
                        format!("qemu-x86_64 -cpu {cpu}"),
                    )
                    .args(["test", "--no-fail-fast"])
                    .args(
                        (!args.iter().any(|a| a == "-p" || a.starts_with("--package")))
                            .then_some("--workspace"),
                    )
                    .args(args),
            )?;
        }
    }
    Ok(())
}
