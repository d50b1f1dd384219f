//! Image-caption datasets and the preprocessing of diffusers' text-to-image fine-tuning script:
//! resize the shorter side to the resolution (bilinear), crop to a square (centre or random),
//! optionally flip horizontally, scale to [-1, 1].

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use image::imageops::FilterType;
use serde::Deserialize;

use crate::{Error, Result};

/// Image file extensions a dataset folder may hold.
const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// One training example: an image file and its caption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The image file.
    pub image: PathBuf,
    /// The caption.
    pub caption: String,
}

/// A folder of captioned images, in one of two layouts:
///
/// - `metadata.jsonl`, one `{"file_name": ..., "text": ...}` object per line (the Hugging Face
///   `imagefolder` layout diffusers' script reads);
/// - image files (`.png`, `.jpg`, `.jpeg`) each with a same-named `.txt` caption (the kohya /
///   A1111 layout); an image without one has the empty caption.
#[derive(Debug, Clone)]
pub struct ImageCaptionDataset {
    /// The folder.
    pub root: PathBuf,
    /// The examples, in file-name order (or `metadata.jsonl` order).
    pub examples: Vec<Example>,
}

#[derive(Deserialize)]
struct MetadataLine {
    file_name: String,
    #[serde(alias = "caption")]
    text: String,
}

impl ImageCaptionDataset {
    /// Reads the folder's listing (and captions); images are decoded only when used.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let fail = |message: String| Error::Dataset {
            path: dir.to_path_buf(),
            message,
        };
        if !dir.is_dir() {
            return Err(fail("not a folder".into()));
        }
        let io = |path: &Path, source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let metadata = dir.join("metadata.jsonl");
        let mut examples = Vec::new();
        if metadata.is_file() {
            let text = std::fs::read_to_string(&metadata).map_err(|e| io(&metadata, e))?;
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let entry: MetadataLine =
                    serde_json::from_str(line).map_err(|e| Error::Dataset {
                        path: metadata.clone(),
                        message: format!(
                            "line {}: {e} (each line needs \"file_name\" and \"text\")",
                            n + 1
                        ),
                    })?;
                let image = dir.join(&entry.file_name);
                if !image.is_file() {
                    return Err(Error::Dataset {
                        path: metadata.clone(),
                        message: format!("line {}: `{}` does not exist", n + 1, entry.file_name),
                    });
                }
                examples.push(Example {
                    image,
                    caption: entry.text,
                });
            }
        } else {
            let mut images: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| io(dir, e))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                    })
                })
                .collect();
            images.sort();
            // a caption whose image is missing is a mistake worth stopping for
            let mut orphans: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| io(dir, e))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "txt"))
                .filter(|p| {
                    !IMAGE_EXTENSIONS.iter().any(|ext| {
                        p.with_extension(ext).is_file()
                            || p.with_extension(ext.to_ascii_uppercase()).is_file()
                    })
                })
                .collect();
            orphans.sort();
            if let Some(first) = orphans.first() {
                return Err(fail(format!(
                    "the caption `{}` has no image beside it ({} such caption(s)); add the image or remove the caption",
                    first.display(),
                    orphans.len()
                )));
            }
            for image in images {
                let caption_file = image.with_extension("txt");
                let caption = if caption_file.is_file() {
                    std::fs::read_to_string(&caption_file)
                        .map_err(|e| io(&caption_file, e))?
                        .trim()
                        .to_string()
                } else {
                    String::new()
                };
                examples.push(Example { image, caption });
            }
        }
        if examples.is_empty() {
            return Err(fail(
                "no examples: add images (.png, .jpg) with same-named .txt captions, or a metadata.jsonl"
                    .into(),
            ));
        }
        Ok(Self {
            root: dir.to_path_buf(),
            examples,
        })
    }

    /// Decodes every image once and leaves out those that cannot be read, returning each with
    /// the decoder's reason, so a run reports a corrupt file once and goes on without it.
    pub fn drop_unreadable(&mut self) -> Vec<(PathBuf, String)> {
        let mut skipped = Vec::new();
        self.examples
            .retain(|example| match image::open(&example.image) {
                Ok(_) => true,
                Err(e) => {
                    skipped.push((example.image.clone(), e.to_string()));
                    false
                }
            });
        skipped
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are none (never true for a dataset read by [`from_dir`](Self::from_dir)).
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
}

/// How an image becomes a training input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocess {
    /// Side of the square crop, in pixels (a multiple of the VAE scale factor).
    pub resolution: usize,
    /// Crop the centre; otherwise a random square (positions from `crop`).
    pub center_crop: bool,
}

/// Decodes `path`, resizes its shorter side to `pre.resolution`, crops a square (centred, or at
/// fractions `crop` of the free range when `pre.center_crop` is false), flips it when `flip`,
/// and returns `[1, 3, resolution, resolution]` in [-1, 1].
pub fn load_image(
    path: &Path,
    pre: &Preprocess,
    crop: (f64, f64),
    flip: bool,
    device: &Device,
) -> Result<Tensor<4>> {
    let image = image::open(path)
        .map_err(|e| Error::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?
        .to_rgb8();
    let (w, h) = image.dimensions();
    let r = pre.resolution as u32;
    // shorter side to the resolution, the other rounded as torchvision's Resize does
    let (nw, nh) = if w <= h {
        (r, ((h as f64 * r as f64 / w as f64) as u32).max(r))
    } else {
        (((w as f64 * r as f64 / h as f64) as u32).max(r), r)
    };
    let resized = image::imageops::resize(&image, nw, nh, FilterType::Triangle);
    let (fx, fy) = if pre.center_crop { (0.5, 0.5) } else { crop };
    let x0 = ((nw - r) as f64 * fx).round() as u32;
    let y0 = ((nh - r) as f64 * fy).round() as u32;
    let mut values = vec![0f32; 3 * (r * r) as usize];
    let plane = (r * r) as usize;
    for y in 0..r {
        for x in 0..r {
            let sx = if flip { r - 1 - x } else { x };
            let px = resized.get_pixel(x0 + sx, y0 + y);
            let i = (y * r + x) as usize;
            for c in 0..3 {
                values[c * plane + i] = f32::from(px[c]) / 127.5 - 1.0;
            }
        }
    }
    Ok(Tensor::from_data(
        TensorData::new(values, [1, 3, r as usize, r as usize]),
        device,
    ))
}
