//! `kiln`: the command-line face of Kiln.
//!
//! Errors from the libraries arrive typed; here they become one line on stderr and a non-zero
//! exit status. Files are written to a temporary name beside the target and renamed, so a failed
//! run leaves no partial output.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::{Parser, Subcommand};
use kiln_clip::{ClipTokenizer, PromptSyntax};

mod bench;
mod generate;
mod loras;
mod png_io;
mod shapes;
mod train;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Stable Diffusion in Rust on burn")]
struct Cli {
    /// Compute device: flex, ndarray, wgpu, wgpu:cpu, wgpu:N, cuda, cuda:N (those compiled into
    /// this build; `kiln devices` lists them). Default: the first compiled of cuda, wgpu, flex.
    #[arg(long, global = true, value_name = "DEVICE")]
    device: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the token ids the text encoder receives for a prompt, as one JSON object (an SDXL
    /// folder's second tokenizer under `tokenizer_2`).
    Tokenize {
        /// Model folder (with `tokenizer/`, and `tokenizer_2/` for SDXL) or a tokenizer folder.
        #[arg(long)]
        model: PathBuf,
        /// The prompt.
        #[arg(long)]
        prompt: String,
        #[command(flatten)]
        syntax: PromptArgs,
    },
    /// Encode a prompt with the model's text encoders and write the embeddings to a
    /// safetensors file: `prompt_embeds` [1, seq, width] and `pooled_prompt_embeds`, as the
    /// model's pipeline uses them (SDXL: both encoders' penultimate states side by side and the
    /// second's projected pooled output; SD 1.x / 2.x: the last state and CLIP's pooled output).
    Encode {
        /// Model folder with `tokenizer/` and `text_encoder/` subfolders (SDXL: and
        /// `tokenizer_2/`, `text_encoder_2/`).
        #[arg(long)]
        model: PathBuf,
        /// The prompt.
        #[arg(long)]
        prompt: String,
        /// Layers to skip from the end (diffusers' `clip_skip`; A1111's "Clip skip: 2" is 1).
        #[arg(long, default_value_t = 0)]
        clip_skip: usize,
        #[command(flatten)]
        syntax: PromptArgs,
        /// Output `.safetensors` file.
        #[arg(long)]
        output: PathBuf,
        /// Replace the output file if it exists.
        #[arg(long)]
        overwrite: bool,
    },
    /// Generate images from a prompt (txt2img), an image (img2img, `--image`) or an image and a
    /// mask (inpainting, `--image --mask`) and write them as PNG files with A1111 metadata.
    Generate(Box<generate::GenerateArgs>),
    /// Convert a single-file SD 1.x/2.x checkpoint (CompVis keys) to a diffusers folder, the
    /// values copied as they are.
    Convert {
        /// The checkpoint (`.safetensors`, or a pickle `.ckpt`).
        #[arg(long)]
        model: PathBuf,
        /// The diffusers folder to write (must not exist).
        #[arg(long)]
        output: PathBuf,
        /// A diffusers folder whose configs (and tokenizer) describe the checkpoint (default:
        /// inferred from the tensor shapes).
        #[arg(long, value_name = "DIR")]
        config: Option<PathBuf>,
        /// The scheduler's prediction type: epsilon or v_prediction (SD 2.x: v_prediction by
        /// default, as the 768 models).
        #[arg(long, value_name = "TYPE")]
        prediction_type: Option<String>,
    },
    /// Fine-tune a model's UNet on a folder of captioned images.
    Train(Box<train::TrainArgs>),
    /// Write a dataset (`kiln data shapes`).
    #[command(subcommand)]
    Data(shapes::DataCommand),
    /// Score what a model draws (`kiln eval shapes`).
    #[command(subcommand)]
    Eval(shapes::EvalCommand),
    /// Time a workload (UNet, VAE, text encoder, whole generation) on a preset's shapes with
    /// random weights or on a model folder; prints one JSON object (median, FLOP/s, peak RSS).
    Bench(Box<bench::BenchArgs>),
    /// List the devices this build can run on.
    Devices,
}

/// How prompts are read (`tokenize`, `encode`, `generate`).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct PromptArgs {
    /// Read prompts literally: no A1111 emphasis (`(text)`, `[text]`, `(text:1.3)`), escapes or
    /// `BREAK`. Long prompts still keep every token.
    #[arg(long)]
    no_prompt_syntax: bool,
    /// Read prompts as diffusers does: literally, truncated to one window of 77 tokens.
    #[arg(long, conflicts_with = "no_prompt_syntax")]
    truncate_prompt: bool,
}

impl PromptArgs {
    /// The library's name for the chosen rules.
    pub fn syntax(&self) -> PromptSyntax {
        if self.truncate_prompt {
            PromptSyntax::Plain
        } else if self.no_prompt_syntax {
            PromptSyntax::Long
        } else {
            PromptSyntax::A1111
        }
    }
}

fn main() -> ExitCode {
    kiln_nn::alloc::reuse_freed_memory();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn device(spec: Option<&str>) -> Result<Device> {
    Ok(match spec {
        Some(spec) => kiln_nn::parse_device(spec)?,
        None => kiln_nn::default_device()?,
    })
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Tokenize {
            model,
            prompt,
            syntax,
        } => {
            // a model folder's tokenizers (an SDXL refiner has only `tokenizer_2/`), or the
            // tokenizer folder given
            let mut folders: Vec<PathBuf> = ["tokenizer", "tokenizer_2"]
                .iter()
                .map(|name| model.join(name))
                .filter(|dir| dir.is_dir())
                .collect();
            if folders.is_empty() {
                folders.push(model.clone());
            }
            let mut out = serde_json::Value::Null;
            for (i, folder) in folders.iter().enumerate() {
                let tokenizer = ClipTokenizer::from_dir(folder)?;
                let input_ids = tokenizer.encode(&prompt)?;
                let content = tokenizer.content_ids(&prompt)?;
                let room = tokenizer.max_length() - 2;
                let windows = tokenizer.tokenize_prompt(&prompt, syntax.syntax())?;
                let ids = serde_json::json!({
                    "prompt": prompt,
                    "input_ids": input_ids,
                    "tokens": tokenizer.tokens(&input_ids),
                    "num_tokens": content.len(),
                    "truncated": content.len() > room,
                    "max_length": tokenizer.max_length(),
                    "windows": windows.ids,
                    "weights": windows.weights,
                });
                if i == 0 {
                    out = ids;
                } else {
                    out["tokenizer_2"] = ids;
                }
            }
            let mut stdout = std::io::stdout().lock();
            serde_json::to_writer(&mut stdout, &out)?;
            writeln!(stdout)?;
        }
        Command::Encode {
            model,
            prompt,
            clip_skip,
            syntax,
            output,
            overwrite,
        } => {
            check_output(&output, overwrite)?;
            let device = device(cli.device.as_deref())?;
            let encoders = kiln_pipeline::TextEncoders::from_dir(&model, &device)?;
            // The pooled output is the first window's, as the A1111 UI and diffusers use it.
            let out =
                encoders.encode_prompts([&prompt, &prompt], syntax.syntax(), clip_skip, &device)?;
            let pooled = out.pooled_prompt_embeds();
            write_safetensors(
                &output,
                &[
                    ("prompt_embeds", out.hidden_states.into_data()),
                    ("pooled_prompt_embeds", pooled.into_data()),
                ],
            )?;
            eprintln!("wrote {}", output.display());
        }
        Command::Generate(args) => {
            let spec = cli.device.clone();
            generate::run(*args, || device(spec.as_deref()))?;
        }
        Command::Convert {
            model,
            output,
            config,
            prediction_type,
        } => {
            let options = kiln_pipeline::SingleFileOptions {
                config,
                prediction_type: prediction_type
                    .as_deref()
                    .map(generate::parse_prediction_type)
                    .transpose()?,
                ..Default::default()
            };
            kiln_pipeline::convert_to_diffusers(&model, &options, &output)
                .with_context(|| format!("cannot convert `{}`", model.display()))?;
            eprintln!("wrote {}", output.display());
        }
        Command::Train(args) => {
            let spec = cli.device.clone();
            train::run(*args, || device(spec.as_deref()))?;
        }
        Command::Data(command) => shapes::run_data(command)?,
        Command::Bench(args) => {
            let spec = cli.device.clone();
            bench::run(*args, || device(spec.as_deref()))?;
        }
        Command::Eval(command) => {
            let spec = cli.device.clone();
            shapes::run_eval(command, || device(spec.as_deref()))?;
        }
        Command::Devices => {
            for name in kiln_nn::available_devices() {
                println!("{name}");
            }
        }
    }
    Ok(())
}

/// Refuses to replace an existing file unless asked to.
fn check_output(path: &Path, overwrite: bool) -> Result<()> {
    if path.exists() && !overwrite {
        bail!(
            "`{}` exists; pass --overwrite to replace it",
            path.display()
        );
    }
    Ok(())
}

/// Writes f32 tensors to `path` through a temporary file in the same folder, renamed at the end.
fn write_safetensors(path: &Path, tensors: &[(&str, burn::tensor::TensorData)]) -> Result<()> {
    let mut raw = Vec::new();
    for (name, data) in tensors {
        let values: Vec<f32> = data
            .clone()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("cannot read tensor `{name}`: {e:?}"))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        raw.push((name.to_string(), data.shape().to_vec(), bytes));
    }
    let views = raw
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = safetensors::serialize(views, None)?;
    write_atomic(path, &bytes)
}

/// The folder `path` lies in: its parent, or `.` for a bare file name.
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `bytes` to a temporary file beside `path` and renames it into place.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = folder_of(path);
    let file_name = path
        .file_name()
        .with_context(|| format!("`{}` is not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.kiln-tmp", file_name.to_string_lossy()));
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        bail!("cannot write `{}`: {e}", path.display());
    }
    Ok(())
}
