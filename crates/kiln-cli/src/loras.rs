//! What users bring to `kiln generate`: LoRAs (`--lora FILE[:SCALE]` and the A1111 web UI's
//! `<lora:NAME:SCALE>` tags in the prompts, looked up in `--lora-dir`) and textual-inversion
//! embeddings (`--embedding FILE[:TOKEN]`).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kiln_pipeline::{LoraOptions, StableDiffusionPipeline};
use sha2::{Digest, Sha256};

/// One LoRA to apply.
#[derive(Debug, Clone)]
pub struct LoraRequest {
    /// The file.
    pub path: PathBuf,
    /// Its name (the file stem), as the web UI's tags and `Lora hashes` name it.
    pub name: String,
    /// Its strength.
    pub scale: f32,
    /// Whether a `<lora:...>` tag asked for it (else `--lora`).
    pub from_prompt: bool,
}

/// The prompts with their `<lora:...>` tags taken out, and every LoRA asked for: the `--lora`
/// arguments first, then the tags in order. Files are checked to exist.
pub fn collect(
    lora_args: &[String],
    lora_dir: Option<&Path>,
    prompts: [&str; 2],
) -> Result<([String; 2], Vec<LoraRequest>)> {
    let mut requests = Vec::new();
    for arg in lora_args {
        let (path, scale) = match arg.rsplit_once(':') {
            Some((path, scale)) if !path.is_empty() && scale.parse::<f32>().is_ok() => {
                (PathBuf::from(path), parse_scale(scale, arg)?)
            }
            _ => (PathBuf::from(arg), 1.0),
        };
        if !path.is_file() {
            bail!("--lora `{}`: no such file", path.display());
        }
        requests.push(request(path, scale, false));
    }
    let mut cleaned = [String::new(), String::new()];
    for (which, (prompt, out)) in ["prompt", "negative prompt"]
        .iter()
        .zip(prompts.iter().zip(cleaned.iter_mut()))
    {
        let (text, tags) = kiln_clip::extract_extra_networks(prompt);
        *out = text;
        for tag in tags {
            let at = tag.position;
            if tag.kind != "lora" {
                bail!(
                    "the {which} has `<{}:...>` at character {at}: only `<lora:NAME:SCALE>` tags are supported",
                    tag.kind
                );
            }
            let name = tag.args[0].trim();
            let scale = match tag.args.get(1) {
                Some(s) => parse_scale(s.trim(), &format!("<lora:{}>", tag.args.join(":")))?,
                None => 1.0,
            };
            if tag.args.len() > 2 {
                bail!(
                    "the {which}'s `<lora:{}>` at character {at} has {} fields; give one strength, `<lora:NAME:SCALE>`",
                    tag.args.join(":"),
                    tag.args.len()
                );
            }
            let Some(dir) = lora_dir else {
                bail!(
                    "the {which} asks for `<lora:{name}>` at character {at}: give the folder of LoRA files with --lora-dir DIR"
                );
            };
            let path = dir.join(format!("{name}.safetensors"));
            if !path.is_file() {
                bail!(
                    "the {which}'s `<lora:{name}>` at character {at}: no file `{}`",
                    path.display()
                );
            }
            requests.push(request(path, scale, true));
        }
    }
    Ok((cleaned, requests))
}

fn request(path: PathBuf, scale: f32, from_prompt: bool) -> LoraRequest {
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("lora")
        .to_string();
    LoraRequest {
        path,
        name,
        scale,
        from_prompt,
    }
}

fn parse_scale(text: &str, what: &str) -> Result<f32> {
    match text.parse::<f32>() {
        Ok(s) if s.is_finite() => Ok(s),
        _ => bail!("`{what}`: the strength `{text}` is not a number"),
    }
}

/// Loads every requested LoRA into `pipe` and fuses them. A file asked for twice (by `--lora`
/// and a tag) is used once, with the strengths added, as the web UI adds them. They are loaded
/// in name order, so that the same LoRAs give the same weights to the bit whichever order the
/// flags and tags name them in.
pub fn apply(
    pipe: &mut StableDiffusionPipeline,
    requests: &[LoraRequest],
    allow_unknown_keys: bool,
) -> Result<()> {
    if requests.is_empty() {
        return Ok(());
    }
    let options = LoraOptions { allow_unknown_keys };
    let mut order: Vec<&LoraRequest> = requests.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    order.dedup_by(|a, b| a.name == b.name);
    for request in order {
        let scale: f32 = requests
            .iter()
            .filter(|r| r.name == request.name)
            .map(|r| r.scale)
            .sum();
        // the library's errors name the file and the key
        let loaded = pipe.load_lora(&request.path, scale, options)?;
        if !loaded.skipped().is_empty() {
            eprintln!(
                "LoRA `{}`: skipped {} unknown key(s): {}",
                request.name,
                loaded.skipped().len(),
                loaded.skipped().join(", ")
            );
        }
        let second = match loaded.text_encoder_2_layers {
            0 => String::new(),
            n => format!(" and {n} of the second text encoder"),
        };
        eprintln!(
            "LoRA `{}` at {scale}: {} UNet and {} text-encoder layers{second}",
            request.name, loaded.unet_layers, loaded.text_encoder_layers
        );
    }
    pipe.fuse_loras()?;
    Ok(())
}

/// The web UI's short hash of a LoRA: the first 12 hex digits of the SHA-256 of a safetensors
/// file's data after its header (the "addnet" hash, which `Lora hashes` lists), or of a pickle
/// file's whole bytes (as the web UI hashes those).
pub fn short_hash(path: &Path) -> Result<String> {
    let safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    sha256_hex(path, safetensors, 12)
}

/// The first `digits` hex digits of the SHA-256 of the file at `path`: of its bytes after the
/// safetensors header where `skip_header`, else of all of them (the web UI's hashes of LoRAs,
/// embeddings and VAEs).
pub fn sha256_hex(path: &Path, skip_header: bool, digits: usize) -> Result<String> {
    let read = || format!("cannot read `{}`", path.display());
    let mut file = std::fs::File::open(path).with_context(read)?;
    if skip_header {
        let mut len = [0u8; 8];
        file.read_exact(&mut len).with_context(read)?;
        file.seek(SeekFrom::Start(8 + u64::from_le_bytes(len)))
            .with_context(read)?;
    }
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(read)?;
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(hex[..digits.min(hex.len())].to_string())
}

/// `Lora hashes` for the PNG parameters: `name: hash, ...` in loading order, each LoRA once.
pub fn hashes(requests: &[LoraRequest]) -> Result<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        if requests[..i].iter().any(|q| q.name == r.name) {
            continue;
        }
        out.push(format!("{}: {}", r.name, short_hash(&r.path)?));
    }
    Ok(out.join(", "))
}

/// Loads every `--embedding FILE[:TOKEN]` into `pipe`: (token, file) in order.
pub fn load_embeddings(
    pipe: &mut StableDiffusionPipeline,
    args: &[String],
) -> Result<Vec<(String, PathBuf)>> {
    let mut loaded = Vec::new();
    for arg in args {
        // FILE:TOKEN when FILE exists (a path may hold colons)
        let (path, token) = match arg.rsplit_once(':') {
            Some((path, token)) if Path::new(path).is_file() => (PathBuf::from(path), Some(token)),
            _ => (PathBuf::from(arg), None),
        };
        if !path.is_file() {
            bail!("--embedding `{}`: no such file", path.display());
        }
        let token = pipe.load_textual_inversion(&path, token)?;
        eprintln!("embedding `{}`: token `{token}`", path.display());
        loaded.push((token, path));
    }
    Ok(loaded)
}

/// `TI hashes` for the PNG parameters: `token: hash` with the web UI's short hash of an
/// embedding (the first 12 hex digits of the whole file's SHA-256).
pub fn embedding_hashes(embeddings: &[(String, PathBuf)]) -> Result<String> {
    let mut out = Vec::new();
    for (token, path) in embeddings {
        let hash = sha256_hex(path, false, 12)?;
        out.push(format!("{}: {hash}", token.replace([':', ','], "")));
    }
    Ok(out.join(", "))
}
