//! PNG reading (img2img / inpainting inputs) and writing with an A1111 `parameters` text chunk.

use std::path::Path;

use anyhow::{Context, Result, bail};
use kiln_pipeline::RgbImage;

/// Encodes an RGB image as PNG bytes with a tEXt chunk `parameters` holding `parameters`.
pub fn encode_png(image: &RgbImage, parameters: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    {
        let width = u32::try_from(image.width).context("image too wide")?;
        let height = u32::try_from(image.height).context("image too tall")?;
        let mut encoder = png::Encoder::new(&mut bytes, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder
            .add_text_chunk("parameters".to_string(), parameters.to_string())
            .context("cannot add the PNG text chunk")?;
        let mut writer = encoder
            .write_header()
            .context("cannot write the PNG header")?;
        writer
            .write_image_data(&image.data)
            .context("cannot encode the PNG")?;
        writer.finish().context("cannot finish the PNG")?;
    }
    Ok(bytes)
}

/// A decoded PNG, 8 bits per channel, as RGB (gray and alpha expanded or dropped).
pub fn read_png(path: &Path) -> Result<RgbImage> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open image `{}`", path.display()))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder
        .read_info()
        .with_context(|| format!("`{}` is not a readable PNG image", path.display()))?;
    let size = reader
        .output_buffer_size()
        .with_context(|| format!("`{}` is too large", path.display()))?;
    let mut buf = vec![0; size];
    let info = reader
        .next_frame(&mut buf)
        .with_context(|| format!("`{}` is not a readable PNG image", path.display()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let px = &buf[..info.buffer_size()];
    let data: Vec<u8> = match info.color_type {
        png::ColorType::Rgb => px.to_vec(),
        png::ColorType::Rgba => px.chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        png::ColorType::Grayscale => px.iter().flat_map(|&g| [g, g, g]).collect(),
        png::ColorType::GrayscaleAlpha => px.chunks(2).flat_map(|p| [p[0], p[0], p[0]]).collect(),
        png::ColorType::Indexed => bail!("`{}`: indexed PNG was not expanded", path.display()),
    };
    Ok(RgbImage {
        width: w,
        height: h,
        data,
    })
}

/// PIL's `convert("L")` luminance (ITU-R 601-2, integer arithmetic as PIL does it), in [0, 1].
pub fn luminance(image: &RgbImage) -> Vec<f32> {
    image
        .data
        .chunks(3)
        .map(|p| {
            let l = (u32::from(p[0]) * 19595
                + u32::from(p[1]) * 38470
                + u32::from(p[2]) * 7471
                + 0x8000)
                >> 16;
            l as f32 / 255.0
        })
        .collect()
}

/// Reads an input image: PNG (decoded as [`read_png`] does) or JPEG, as 8-bit RGB.
pub fn read_image(path: &Path) -> Result<RgbImage> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if !matches!(ext.as_deref(), Some("jpg" | "jpeg")) {
        return read_png(path);
    }
    let decoded = image::open(path)
        .with_context(|| format!("`{}` is not a readable JPEG image", path.display()))?
        .to_rgb8();
    Ok(RgbImage {
        width: decoded.width() as usize,
        height: decoded.height() as usize,
        data: decoded.into_raw(),
    })
}

/// `image` resized to `width` x `height` with a Lanczos-3 filter (diffusers' image processor
/// resizes with PIL's Lanczos).
pub fn resize(image: &RgbImage, width: usize, height: usize) -> Result<RgbImage> {
    let buffer =
        image::RgbImage::from_raw(image.width as u32, image.height as u32, image.data.clone())
            .context("image buffer does not match its size")?;
    let resized = image::imageops::resize(
        &buffer,
        width as u32,
        height as u32,
        image::imageops::FilterType::Lanczos3,
    );
    Ok(RgbImage {
        width,
        height,
        data: resized.into_raw(),
    })
}
