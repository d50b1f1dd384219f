//! `cargo xtask hide-isa`: runs a command with AVX-512, AVX-VNNI and AMX hidden from run-time
//! feature detection, at native speed, so that an AVX-512 machine runs (and times) the code an
//! AVX2-only CPU such as Zen 3 runs: Kiln's kernel clones, gemm's microkernels, PyTorch's
//! oneDNN and MKL kernels alike.
//!
//! `xtask/isa/hide_isa.c`, compiled here into `target/hide-isa/libhide_isa.so` and loaded with
//! `LD_PRELOAD`, turns on CPUID faulting (Linux `arch_prctl(ARCH_SET_CPUID)`, where the CPU or
//! hypervisor lists `cpuid_fault` in /proc/cpuinfo) and answers each `cpuid` with those
//! extensions' bits cleared; `GLIBC_TUNABLES` does the same for glibc's own string functions,
//! which it picks before any library is loaded. It is a proxy: the instruction set of an AVX2
//! CPU on this CPU's cores, caches and memory, not a Zen 3's timing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// glibc's names for the extensions hidden from its string-function selection.
const GLIBC_HIDDEN: &str = "glibc.cpu.hwcaps=-AVX512F,-AVX512DQ,-AVX512CD,-AVX512BW,-AVX512VL,\
                            -AVX512_VNNI,-AVX512_BF16,-AVX512_FP16,-AVX_VNNI";

/// Builds the preload library if needed and returns its path.
pub fn library(root: &Path) -> Result<PathBuf> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "cpuid_fault"))
    {
        bail!(
            "this CPU (or its hypervisor) offers no CPUID faulting (`cpuid_fault` is not among \
             the flags in /proc/cpuinfo), so extensions cannot be hidden at native speed: use \
             `cargo xtask emulate-cpu` (qemu) instead"
        );
    }
    let source = root.join("xtask/isa/hide_isa.c");
    let dir = root.join("target/hide-isa");
    let lib = dir.join("libhide_isa.so");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&lib).is_none() || modified(&lib) < modified(&source) {
        std::fs::create_dir_all(&dir)?;
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        crate::run(
            Command::new(&cc)
                .args(["-O2", "-shared", "-fPIC", "-Wall", "-Werror", "-o"])
                .arg(&lib)
                .arg(&source),
        )
        .with_context(|| format!("cannot compile {} with `{cc}`", source.display()))?;
    }
    Ok(lib)
}

/// Sets the environment that hides the extensions from `cmd` and every process it starts.
pub fn apply(cmd: &mut Command, library: &Path) {
    cmd.env("LD_PRELOAD", library)
        .env("HIDE_ISA", "avx512")
        .env("GLIBC_TUNABLES", GLIBC_HIDDEN);
}
