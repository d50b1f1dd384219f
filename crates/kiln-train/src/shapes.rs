//! A procedural dataset of flat-coloured shapes, for training a tiny Stable Diffusion from
//! scratch, and a classifier that reads back from pixels what a model drew for its captions.
//!
//! Every image is a flat background of one [`Colour`] with one flat [`Shape`] of another colour
//! on it, captioned `"a {colour} {shape} on a {background} background"` ([`Combo::caption`]).
//! The [`HELD_OUT`] combinations are never written into training data: a model that draws them
//! from their captions has composed attributes it only saw apart (compositional generalisation).
//! [`eval_cases`] and [`EvalScore`] are the library side of `kiln eval shapes`.
//!
//! ```no_run
//! # fn main() -> kiln_train::Result<()> {
//! use kiln_train::shapes::{self, ShapesSpec};
//!
//! shapes::generate(&ShapesSpec::new(1000, 64, 0), "shapes-64".as_ref())?;
//! let sample = ShapesSpec::new(1, 64, 7).samples()?.next().expect("one sample");
//! assert!(shapes::classify(&sample.image)?.matches(&sample.combo));
//! # Ok(()) }
//! ```

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use image::ImageEncoder;
use kiln_pipeline::RgbImage;
use kiln_scheduler::SeededNoise;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The palette: eight flat sRGB colours, any two at least 90 apart (Euclidean, 8-bit RGB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    /// (220, 30, 30)
    Red,
    /// (30, 170, 40)
    Green,
    /// (30, 60, 220)
    Blue,
    /// (240, 220, 30)
    Yellow,
    /// (140, 40, 170)
    Purple,
    /// (245, 130, 20)
    Orange,
    /// (245, 245, 245)
    White,
    /// (15, 15, 15)
    Black,
}

impl Colour {
    /// Every colour, in palette order.
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
        Colour::White,
        Colour::Black,
    ];

    /// The flat sRGB value drawn for this colour.
    pub const fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Green => [30, 170, 40],
            Colour::Blue => [30, 60, 220],
            Colour::Yellow => [240, 220, 30],
            Colour::Purple => [140, 40, 170],
            Colour::Orange => [245, 130, 20],
            Colour::White => [245, 245, 245],
            Colour::Black => [15, 15, 15],
        }
    }

    /// The lower-case name used in captions.
    pub const fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
            Colour::White => "white",
            Colour::Black => "black",
        }
    }
}

impl fmt::Display for Colour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Colour {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Colour::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                Error::Parse(format!(
                    "unknown colour `{s}`: expected one of {}",
                    Colour::ALL.map(Colour::name).join(", ")
                ))
            })
    }
}

/// The shapes drawn: each fills a square box of side 35% to 75% of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// A disc whose diameter is the box side.
    Circle,
    /// The axis-aligned box itself.
    Square,
    /// An isosceles triangle pointing up: apex at the top middle, base the box's bottom edge.
    Triangle,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    /// The lower-case name used in captions.
    pub const fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Shape {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Shape::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                Error::Parse(format!(
                    "unknown shape `{s}`: expected one of {}",
                    Shape::ALL.map(Shape::name).join(", ")
                ))
            })
    }
}

/// One combination of the dataset: a `colour` `shape` on a `background` of another colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Combo {
    /// The shape's colour.
    pub colour: Colour,
    /// The shape.
    pub shape: Shape,
    /// The background's colour (never the shape's).
    pub background: Colour,
}

impl Combo {
    /// A combo; `colour` and `background` must differ for it to be one of the dataset's.
    pub const fn new(colour: Colour, shape: Shape, background: Colour) -> Self {
        Self {
            colour,
            shape,
            background,
        }
    }

    /// Every valid combo (8 * 7 * 3 = 168), colour-major.
    pub fn all() -> Vec<Combo> {
        let mut out = Vec::with_capacity(168);
        for colour in Colour::ALL {
            for shape in Shape::ALL {
                for background in Colour::ALL {
                    if background != colour {
                        out.push(Combo::new(colour, shape, background));
                    }
                }
            }
        }
        out
    }

    /// The combos training data is drawn from: [`Combo::all`] less [`HELD_OUT`] (156).
    pub fn trained() -> Vec<Combo> {
        Combo::all()
            .into_iter()
            .filter(|c| !c.is_held_out())
            .collect()
    }

    /// Whether this combo is one of [`HELD_OUT`].
    pub fn is_held_out(&self) -> bool {
        HELD_OUT.contains(self)
    }

    /// `"a {colour} {shape} on a {background} background"`.
    pub fn caption(&self) -> String {
        format!(
            "a {} {} on a {} background",
            self.colour, self.shape, self.background
        )
    }

    /// Reads a caption written by [`Combo::caption`] (surrounding whitespace ignored).
    pub fn parse_caption(text: &str) -> Result<Self> {
        let bad = || {
            Error::Parse(format!(
                "`{text}` is not a shapes caption (`a COLOUR SHAPE on a COLOUR background`)"
            ))
        };
        let words: Vec<&str> = text.split_whitespace().collect();
        let ["a", colour, shape, "on", "a", background, "background"] = words.as_slice() else {
            return Err(bad());
        };
        let combo = Combo::new(colour.parse()?, shape.parse()?, background.parse()?);
        if combo.colour == combo.background {
            return Err(Error::Parse(format!(
                "`{text}`: the shape and the background have the same colour"
            )));
        }
        Ok(combo)
    }
}

impl fmt::Display for Combo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.caption())
    }
}

/// The combinations never written into training data, for measuring compositional
/// generalisation: every colour is the shape's colour at least once and the background at least
/// once, each shape appears four times, and every pair of attributes of each (colour + shape,
/// colour + background, shape + background) still appears in the training combos, so each
/// held-out prompt is a new composition of parts the model has seen.
pub const HELD_OUT: &[Combo] = {
    use Colour::*;
    use Shape::*;
    &[
        Combo::new(Red, Circle, Blue),
        Combo::new(Green, Square, Purple),
        Combo::new(Blue, Triangle, Yellow),
        Combo::new(Yellow, Circle, Black),
        Combo::new(Purple, Square, White),
        Combo::new(Orange, Triangle, Green),
        Combo::new(White, Circle, Red),
        Combo::new(Black, Square, Orange),
        Combo::new(Orange, Circle, Purple),
        Combo::new(White, Triangle, Blue),
        Combo::new(Black, Triangle, Yellow),
        Combo::new(Yellow, Square, Green),
    ]
};

/// The smallest image side [`generate`] draws.
pub const MIN_SIZE: usize = 8;
/// The largest image side [`generate`] draws.
pub const MAX_SIZE: usize = 4096;
/// The most images one [`generate`] call writes.
pub const MAX_COUNT: usize = 1_000_000;

/// What to generate: `count` images of `size` x `size` pixels, every draw from `seed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapesSpec {
    /// Number of images, 1 to [`MAX_COUNT`].
    pub count: usize,
    /// Image side in pixels, [`MIN_SIZE`] to [`MAX_SIZE`].
    pub size: usize,
    /// The seed of every random draw: the same seed gives the same bytes on every machine.
    pub seed: u64,
    /// Replace an existing output folder instead of refusing it.
    pub overwrite: bool,
}

impl ShapesSpec {
    /// `count` images of `size` px from `seed`, never replacing an existing folder.
    pub fn new(count: usize, size: usize, seed: u64) -> Self {
        Self {
            count,
            size,
            seed,
            overwrite: false,
        }
    }

    /// Sets whether an existing output folder is replaced.
    pub fn with_overwrite(mut self, overwrite: bool) -> Self {
        self.overwrite = overwrite;
        self
    }

    /// Checks the ranges of `count` and `size`.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_COUNT).contains(&self.count) {
            return Err(Error::InvalidSpec(format!(
                "count {} must be 1 to {MAX_COUNT}",
                self.count
            )));
        }
        if !(MIN_SIZE..=MAX_SIZE).contains(&self.size) {
            return Err(Error::InvalidSpec(format!(
                "size {} px must be {MIN_SIZE} to {MAX_SIZE}",
                self.size
            )));
        }
        Ok(())
    }

    /// The images in order, drawn lazily (one in memory at a time).
    pub fn samples(&self) -> Result<Samples> {
        self.validate()?;
        Ok(Samples {
            rng: SeededNoise::new(self.seed),
            trained: Combo::trained(),
            size: self.size,
            left: self.count,
        })
    }
}

/// Where a shape lies: its square box, `extent` px on a side, top-left at (`x`, `y`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Left column of the box.
    pub x: usize,
    /// Top row of the box.
    pub y: usize,
    /// Side of the box (a circle's diameter, a triangle's base and height).
    pub extent: usize,
}

/// One generated image and what it shows.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The combo drawn.
    pub combo: Combo,
    /// Where the shape is.
    pub placement: Placement,
    /// The pixels.
    pub image: RgbImage,
}

/// The images of a [`ShapesSpec`], from [`ShapesSpec::samples`].
#[derive(Debug, Clone)]
pub struct Samples {
    rng: SeededNoise,
    trained: Vec<Combo>,
    size: usize,
    left: usize,
}

impl Iterator for Samples {
    type Item = Sample;

    fn next(&mut self) -> Option<Sample> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // the draws, in this order: combo, extent, column, row
        let combo = self.trained[self.rng.next_index(self.trained.len())];
        let lo = (self.size * 35).div_ceil(100);
        let hi = self.size * 75 / 100;
        let extent = lo + self.rng.next_index(hi - lo + 1);
        let x = self.rng.next_index(self.size - extent + 1);
        let y = self.rng.next_index(self.size - extent + 1);
        let placement = Placement { x, y, extent };
        Some(Sample {
            combo,
            placement,
            image: draw(&combo, &placement, self.size),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Samples {}

/// Draws `combo` at `placement` on a `size` x `size` image, flat colours, no anti-aliasing.
///
/// A pixel belongs to the shape when its centre does. The tests are exact integer arithmetic on
/// doubled coordinates (pixel centres at odd values), so every machine draws the same bytes; a
/// drawing crate (imageproc) would bring nalgebra and a font stack for three inequalities.
///
/// `size` must be 1 to [`MAX_SIZE`] and the box must lie inside the image.
pub fn render(combo: &Combo, placement: &Placement, size: usize) -> Result<RgbImage> {
    let Placement { x, y, extent } = *placement;
    let inside = |start: usize| start.checked_add(extent).is_some_and(|end| end <= size);
    if !(1..=MAX_SIZE).contains(&size) || !inside(x) || !inside(y) {
        return Err(Error::InvalidSpec(format!(
            "a {extent} px box at ({x}, {y}) in a {size} px image (sides 1 to {MAX_SIZE}, the box inside)"
        )));
    }
    Ok(draw(combo, placement, size))
}

/// [`render`] for a checked placement.
fn draw(combo: &Combo, placement: &Placement, size: usize) -> RgbImage {
    let bg = combo.background.rgb();
    let fg = combo.colour.rgb();
    let mut data: Vec<u8> = std::iter::repeat_n(bg, size * size).flatten().collect();
    let Placement {
        x: x0,
        y: y0,
        extent: e,
    } = *placement;
    let (cx, cy, e2) = ((2 * x0 + e) as i64, (2 * y0 + e) as i64, e as i64);
    for y in y0..y0 + e {
        for x in x0..x0 + e {
            let (px, py) = (2 * x as i64 + 1, 2 * y as i64 + 1);
            let inside = match combo.shape {
                Shape::Square => true,
                Shape::Circle => (px - cx).pow(2) + (py - cy).pow(2) <= e2 * e2,
                // half-width grows from 0 at the apex (y0) to e/2 at the base (y0 + e)
                Shape::Triangle => 2 * (px - cx).abs() <= py - 2 * y0 as i64,
            };
            if inside {
                let i = 3 * (y * size + x);
                data[i..i + 3].copy_from_slice(&fg);
            }
        }
    }
    RgbImage {
        width: size,
        height: size,
        data,
    }
}

/// Writes `spec.count` images to the folder `out`: `00000.png` with its caption in `00000.txt`
/// (no trailing newline), numbered from 0 with at least five digits, the layout
/// [`ImageCaptionDataset::from_dir`](crate::ImageCaptionDataset::from_dir) reads. The folder is
/// built under a temporary name beside `out` and renamed into place; an existing `out` is an
/// error unless `spec.overwrite`.
pub fn generate(spec: &ShapesSpec, out: &Path) -> Result<()> {
    let samples = spec.samples()?;
    if out.exists() && !out.is_dir() {
        return Err(Error::InvalidSpec(format!(
            "`{}` exists and is not a folder",
            out.display()
        )));
    }
    if out.exists() && !spec.overwrite {
        return Err(Error::OutputExists {
            path: out.to_path_buf(),
        });
    }
    let digits = (spec.count - 1).to_string().len().max(5);
    let _span = tracing::info_span!("shapes", count = spec.count, size = spec.size).entered();
    kiln_nn::config::write_dir_atomically(out, spec.overwrite, |dir| {
        for (i, sample) in samples.enumerate() {
            let stem = format!("{i:0digits$}");
            let png = dir.join(format!("{stem}.png"));
            let bytes = encode_png(&sample.image).map_err(|message| Error::Save {
                path: png.clone(),
                message,
            })?;
            std::fs::write(&png, bytes).map_err(|source| Error::Io {
                path: png.clone(),
                source,
            })?;
            let txt = dir.join(format!("{stem}.txt"));
            std::fs::write(&txt, sample.combo.caption())
                .map_err(|source| Error::Io { path: txt, source })?;
        }
        Ok(())
    })
}

fn encode_png(image: &RgbImage) -> std::result::Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    let (w, h) = (image.width as u32, image.height as u32);
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(&image.data, w, h, image::ExtendedColorType::Rgb8)
        .map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// What [`classify`] reads from an image; `None` where it cannot tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Classification {
    /// The colour of most of the border.
    pub background: Option<Colour>,
    /// The colour of the largest connected region not of the background's colour (of its core).
    pub colour: Option<Colour>,
    /// That region's shape.
    pub shape: Option<Shape>,
}

impl Classification {
    /// Whether all three parts were read and equal `combo`'s.
    pub fn matches(&self, combo: &Combo) -> bool {
        self.background == Some(combo.background)
            && self.colour == Some(combo.colour)
            && self.shape == Some(combo.shape)
    }
}

/// A pixel farther than this from every palette colour (Euclidean, 8-bit RGB) is unknown: it
/// counts neither as background nor as shape. Half the closest pair (yellow, orange) is 45; 80
/// keeps nearly every pixel under Gaussian noise of sigma 20 while mid greys stay unknown.
const MAX_DISTANCE: u32 = 80;
/// The label of an unknown pixel (palette colours are 0..8).
const UNKNOWN: u8 = Colour::ALL.len() as u8;

/// Images larger than this on a side are box-averaged down to at most this before
/// classification: the shapes stay tens of pixels wide and the fitting stays cheap.
const CLASSIFY_SIDE: usize = 96;

/// Reads the background colour, the shape's colour and the shape from pixels alone, robust to
/// noise, blur and the imperfect images a small diffusion model draws:
///
/// 1. each pixel is labelled with its nearest palette colour, or unknown when it is far from all
///    (farther than 80 in 8-bit RGB); a pixel with at most one like neighbour then takes its 3x3
///    neighbourhood's majority label, which removes stray pixels (images over 96 px a side are
///    box-averaged down first);
/// 2. background: the label of most border pixels (at least 40% of them);
/// 3. the object: the largest 4-connected region of known labels other than the background, at
///    least 1% of the image; its colour is the majority label of its core (the pixels at least
///    half as deep inside it as the deepest), since blur mixes an edge with the background into
///    a third colour (red on yellow into orange) but not the middle;
/// 4. the shape: the region, each row filled from its leftmost to its rightmost pixel (the
///    shapes are convex; holes do not count), is fitted with an ideal circle, square and
///    upward triangle (size from the area, position from the centroid, then refined one pixel
///    at a time); the best intersection-over-union wins if it is at least 0.7, else `None`.
///
/// An image whose buffer does not hold `width * height` RGB pixels is an error.
pub fn classify(image: &RgbImage) -> Result<Classification> {
    let (w, h) = (image.width, image.height);
    let pixels = w
        .checked_mul(h)
        .filter(|n| n.checked_mul(3) == Some(image.data.len()));
    if pixels.is_none() {
        return Err(Error::InvalidInput(format!(
            "a {w}x{h} RGB image needs {w} * {h} * 3 bytes, got {}",
            image.data.len()
        )));
    }
    let image = shrink(image, CLASSIFY_SIDE);
    let (w, h) = (image.width, image.height);
    let n = w * h;
    let mut out = Classification::default();
    if n == 0 {
        return Ok(out);
    }
    let labels = majority_filter(&nearest_labels(&image.data), w, h);

    // 2. background: the border's majority
    let mut counts = [0usize; Colour::ALL.len() + 1];
    let mut border = 0;
    for y in 0..h {
        for x in 0..w {
            if x == 0 || y == 0 || x + 1 == w || y + 1 == h {
                counts[labels[y * w + x] as usize] += 1;
                border += 1;
            }
        }
    }
    let Some((bg, bg_count)) = majority(&counts[..Colour::ALL.len()]) else {
        return Ok(out);
    };
    if bg_count * 5 < border * 2 {
        return Ok(out);
    }
    out.background = Some(Colour::ALL[bg]);

    // 3. the object: the largest region of other known colours
    let is_object = |l: u8| l != UNKNOWN && l as usize != bg;
    let region = largest_region(&labels, w, h, is_object);
    if region.len() < 4 || region.len() * 100 < n {
        return Ok(out);
    }
    let mut mask = vec![false; n];
    for &i in &region {
        mask[i] = true;
    }
    let depth = depths(&region, &mask, w, h);
    let deepest = depth.iter().copied().max().unwrap_or(0);
    let mut counts = [0usize; Colour::ALL.len()];
    for (&i, &d) in region.iter().zip(&depth) {
        if 2 * d >= deepest {
            counts[labels[i] as usize] += 1;
        }
    }
    out.colour = majority(&counts).map(|(c, _)| Colour::ALL[c]);
    out.shape = shape_of(&region, w, h);
    Ok(out)
}

/// `image` box-averaged by the smallest integer factor that brings both sides to at most `side`
/// (trailing rows and columns that do not fill a box are dropped); `image` itself if it fits.
fn shrink(image: &RgbImage, side: usize) -> std::borrow::Cow<'_, RgbImage> {
    let k = image.width.max(image.height).div_ceil(side).max(1);
    if k == 1 {
        return std::borrow::Cow::Borrowed(image);
    }
    let (w, h) = (image.width / k, image.height / k);
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let mut sum = 0u64;
                for yy in y * k..(y + 1) * k {
                    for xx in x * k..(x + 1) * k {
                        sum += u64::from(image.data[3 * (yy * image.width + xx) + c]);
                    }
                }
                let area = (k * k) as u64;
                data.push(((sum + area / 2) / area) as u8);
            }
        }
    }
    std::borrow::Cow::Owned(RgbImage {
        width: w,
        height: h,
        data,
    })
}

/// For each pixel of `region` (in order), its chessboard distance to the nearest pixel outside
/// `mask` (the image's edge counting as outside): 1 on the region's boundary.
fn depths(region: &[usize], mask: &[bool], w: usize, h: usize) -> Vec<u32> {
    let mut depth = vec![0u32; mask.len()];
    let mut frontier = Vec::new();
    let neighbours = |i: usize| {
        let (x, y) = (i % w, i / w);
        let mut out = [None; 8];
        let mut k = 0;
        for ny in y.saturating_sub(1)..(y + 2).min(h) {
            for nx in x.saturating_sub(1)..(x + 2).min(w) {
                if (nx, ny) != (x, y) {
                    out[k] = Some(ny * w + nx);
                    k += 1;
                }
            }
        }
        (out, k == 8)
    };
    for &i in region {
        let (near, complete) = neighbours(i);
        if !complete || near.iter().flatten().any(|&j| !mask[j]) {
            depth[i] = 1;
            frontier.push(i);
        }
    }
    let mut level = 1;
    while !frontier.is_empty() {
        level += 1;
        let mut next = Vec::new();
        for i in frontier {
            for j in neighbours(i).0.into_iter().flatten() {
                if mask[j] && depth[j] == 0 {
                    depth[j] = level;
                    next.push(j);
                }
            }
        }
        frontier = next;
    }
    region.iter().map(|&i| depth[i]).collect()
}

/// The nearest palette index of every pixel, or [`UNKNOWN`].
fn nearest_labels(data: &[u8]) -> Vec<u8> {
    data.chunks_exact(3)
        .map(|p| {
            let (mut best, mut best_d) = (UNKNOWN, u32::MAX);
            for (i, c) in Colour::ALL.iter().enumerate() {
                let d: u32 = c
                    .rgb()
                    .iter()
                    .zip(p)
                    .map(|(&a, &b)| (i32::from(a) - i32::from(b)).pow(2) as u32)
                    .sum();
                if d < best_d {
                    (best, best_d) = (i as u8, d);
                }
            }
            if best_d <= MAX_DISTANCE * MAX_DISTANCE {
                best
            } else {
                UNKNOWN
            }
        })
        .collect()
}

/// Each nearly isolated label (at most one like neighbour in its 3x3 neighbourhood, clipped at
/// the edges) replaced by the neighbourhood's most frequent; corners and edges of shapes stay.
fn majority_filter(labels: &[u8], w: usize, h: usize) -> Vec<u8> {
    let mut out = labels.to_vec();
    for y in 0..h {
        for x in 0..w {
            let mut counts = [0u8; Colour::ALL.len() + 1];
            for ny in y.saturating_sub(1)..(y + 2).min(h) {
                for nx in x.saturating_sub(1)..(x + 2).min(w) {
                    counts[labels[ny * w + nx] as usize] += 1;
                }
            }
            let own = labels[y * w + x];
            if counts[own as usize] <= 2 {
                let top = counts.iter().copied().max().unwrap_or(0);
                if counts[own as usize] < top {
                    out[y * w + x] = counts.iter().position(|&c| c == top).unwrap_or(0) as u8;
                }
            }
        }
    }
    out
}

/// The index and count of the largest nonzero count (the first on a tie).
fn majority(counts: &[usize]) -> Option<(usize, usize)> {
    counts
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, c)| c > 0)
        .fold(None, |best: Option<(usize, usize)>, (i, c)| match best {
            Some((_, b)) if b >= c => best,
            _ => Some((i, c)),
        })
}

/// The pixel indices of the largest 4-connected region whose labels satisfy `keep`.
fn largest_region(labels: &[u8], w: usize, h: usize, keep: impl Fn(u8) -> bool) -> Vec<usize> {
    let mut seen = vec![false; labels.len()];
    let mut best = Vec::new();
    let mut stack = Vec::new();
    for start in 0..labels.len() {
        if seen[start] || !keep(labels[start]) {
            continue;
        }
        let mut region = Vec::new();
        seen[start] = true;
        stack.push(start);
        while let Some(i) = stack.pop() {
            region.push(i);
            let (x, y) = (i % w, i / w);
            let mut visit = |j: usize| {
                if !seen[j] && keep(labels[j]) {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        if region.len() > best.len() {
            best = region;
        }
    }
    best
}

/// The shape of a region (pixel indices in an image `w` wide), from its row spans.
/// The least intersection-over-union with an ideal shape that names it.
const MIN_IOU: f64 = 0.7;

/// A region filled row by row: for each row from `top`, the span of its pixels (`None` for a
/// row without any).
struct Filled {
    top: usize,
    rows: Vec<Option<(usize, usize)>>,
    area: usize,
}

impl Filled {
    fn new(region: &[usize], w: usize) -> Option<Self> {
        let top = region.iter().map(|&i| i / w).min()?;
        let bottom = region.iter().map(|&i| i / w).max()?;
        let mut rows: Vec<Option<(usize, usize)>> = vec![None; bottom - top + 1];
        for &i in region {
            let (x, r) = (i % w, i / w - top);
            rows[r] = Some(rows[r].map_or((x, x), |(a, b)| (a.min(x), b.max(x))));
        }
        let area = rows.iter().flatten().map(|(a, b)| b - a + 1).sum();
        Some(Self { top, rows, area })
    }

    fn contains(&self, x: usize, y: usize) -> bool {
        y.checked_sub(self.top)
            .and_then(|r| self.rows.get(r).copied().flatten())
            .is_some_and(|(a, b)| (a..=b).contains(&x))
    }

    /// The centroid, in doubled coordinates (pixel centres at odd values).
    fn centroid2(&self) -> (f64, f64) {
        let (mut sx, mut sy) = (0.0, 0.0);
        for (r, span) in self.rows.iter().enumerate() {
            if let Some((a, b)) = *span {
                let n = (b - a + 1) as f64;
                sx += n * (a + b + 1) as f64;
                sy += n * (2 * (self.top + r) + 1) as f64;
            }
        }
        (sx / self.area as f64, sy / self.area as f64)
    }
}

/// Whether the pixel centre (`px`, `py`), in doubled coordinates, lies in `shape` drawn in the
/// box of side `e` at (`x0`, `y0`): [`draw`]'s tests.
fn in_shape(shape: Shape, (x0, y0, e): (i64, i64, i64), px: i64, py: i64) -> bool {
    let (cx, cy) = (2 * x0 + e, 2 * y0 + e);
    match shape {
        Shape::Square => true,
        Shape::Circle => (px - cx).pow(2) + (py - cy).pow(2) <= e * e,
        Shape::Triangle => 2 * (px - cx).abs() <= py - 2 * y0,
    }
}

/// The intersection-over-union of `filled` with `shape` in the box `at` = (`x0`, `y0`, `e`),
/// within a `w` x `h` image.
fn iou(filled: &Filled, shape: Shape, at: (i64, i64, i64), w: usize, h: usize) -> f64 {
    let (x0, y0, e) = at;
    let (mut both, mut ideal) = (0usize, 0usize);
    let clamp = |v: i64, hi: usize| v.clamp(0, hi as i64) as usize;
    for y in clamp(y0, h)..clamp(y0 + e, h) {
        for x in clamp(x0, w)..clamp(x0 + e, w) {
            if in_shape(shape, at, 2 * x as i64 + 1, 2 * y as i64 + 1) {
                ideal += 1;
                both += usize::from(filled.contains(x, y));
            }
        }
    }
    let union = filled.area + ideal - both;
    if union == 0 {
        0.0
    } else {
        both as f64 / union as f64
    }
}

/// The best fit of `shape` to `filled`: its intersection-over-union. Starts from the box whose
/// ideal shape has the region's area and centroid, then moves the box and its side one pixel
/// at a time while that improves the fit.
fn fit(filled: &Filled, shape: Shape, w: usize, h: usize) -> f64 {
    let area = filled.area as f64;
    let (e, centre_y) = match shape {
        Shape::Square => (area.sqrt(), 0.5),
        Shape::Circle => ((area / std::f64::consts::FRAC_PI_4).sqrt(), 0.5),
        // a triangle's centroid is two thirds of the way down from its apex
        Shape::Triangle => ((2.0 * area).sqrt(), 2.0 / 3.0),
    };
    let (cx2, cy2) = filled.centroid2();
    let mut at = (
        ((cx2 - e) / 2.0).round() as i64,
        ((cy2 - 2.0 * centre_y * e) / 2.0).round() as i64,
        (e.round() as i64).max(1),
    );
    let mut best = iou(filled, shape, at, w, h);
    // each move must improve the fit, so this ends; the bound only caps the work
    for _ in 0..64 {
        let (x, y, e) = at;
        let moves = [
            (x - 1, y, e),
            (x + 1, y, e),
            (x, y - 1, e),
            (x, y + 1, e),
            (x, y, e + 1),
            (x, y, e - 1),
            (x - 1, y - 1, e + 2),
            (x + 1, y + 1, e - 2),
        ];
        let next = moves
            .into_iter()
            .filter(|m| m.2 >= 1)
            .map(|m| (iou(filled, shape, m, w, h), m))
            .fold(None, |acc: Option<(f64, (i64, i64, i64))>, c| match acc {
                Some(a) if a.0 >= c.0 => Some(a),
                _ => Some(c),
            });
        match next {
            Some((v, m)) if v > best => (best, at) = (v, m),
            _ => break,
        }
    }
    best
}

/// The shape of a region (pixel indices in a `w` x `h` image): the best fitting ideal shape, or
/// `None` where none fits well ([`MIN_IOU`]).
fn shape_of(region: &[usize], w: usize, h: usize) -> Option<Shape> {
    let filled = Filled::new(region, w)?;
    let (shape, best) = Shape::ALL
        .into_iter()
        .map(|s| (s, fit(&filled, s, w, h)))
        .fold(None, |acc: Option<(Shape, f64)>, c| match acc {
            Some(a) if a.1 >= c.1 => Some(a),
            _ => Some(c),
        })?;
    (best >= MIN_IOU).then_some(shape)
}

/// The seed [`eval_cases`] samples trained combos with in `kiln eval shapes`, so every model is
/// asked the same prompts.
pub const EVAL_SEED: u64 = 0;

/// Which part of the combos an evaluated prompt comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// One of [`HELD_OUT`]: never in the training data.
    HeldOut,
    /// A combo training data is drawn from.
    Trained,
}

/// One prompt to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalCase {
    /// The combo whose caption is the prompt.
    pub combo: Combo,
    /// Held out or trained.
    pub split: Split,
}

/// The prompts of an evaluation: every [`HELD_OUT`] combo, then `trained` distinct trained combos
/// drawn with `seed` (at most the 156 there are).
pub fn eval_cases(trained: usize, seed: u64) -> Result<Vec<EvalCase>> {
    let mut pool = Combo::trained();
    if trained > pool.len() {
        return Err(Error::InvalidSpec(format!(
            "{trained} trained combos asked for; there are {}",
            pool.len()
        )));
    }
    let mut rng = SeededNoise::new(seed);
    // a partial Fisher-Yates shuffle: the first `trained` are a uniform sample
    for i in 0..trained {
        let j = i + rng.next_index(pool.len() - i);
        pool.swap(i, j);
    }
    let held_out = HELD_OUT.iter().map(|&combo| EvalCase {
        combo,
        split: Split::HeldOut,
    });
    let sampled = pool[..trained].iter().map(|&combo| EvalCase {
        combo,
        split: Split::Trained,
    });
    Ok(held_out.chain(sampled).collect())
}

/// Counts for one [`Split`]: images, and how many had everything or each part right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SplitScore {
    /// Images classified.
    pub samples: usize,
    /// Images whose background, colour and shape were all as asked.
    pub exact: usize,
    /// Images with the background colour asked for.
    pub background: usize,
    /// Images with the shape colour asked for.
    pub colour: usize,
    /// Images with the shape asked for.
    pub shape: usize,
}

/// [`SplitScore`] as fractions of its images (`None` without any).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Rates {
    /// Fraction drawn exactly as asked.
    pub exact: Option<f64>,
    /// Fraction with the right background.
    pub background: Option<f64>,
    /// Fraction with the right shape colour.
    pub colour: Option<f64>,
    /// Fraction with the right shape.
    pub shape: Option<f64>,
}

impl SplitScore {
    /// Adds one image asked to show `combo` and read as `seen`.
    pub fn record(&mut self, combo: &Combo, seen: &Classification) {
        self.samples += 1;
        self.exact += usize::from(seen.matches(combo));
        self.background += usize::from(seen.background == Some(combo.background));
        self.colour += usize::from(seen.colour == Some(combo.colour));
        self.shape += usize::from(seen.shape == Some(combo.shape));
    }

    /// The counts as fractions of the images.
    pub fn rates(&self) -> Rates {
        let f = |k: usize| (self.samples > 0).then(|| k as f64 / self.samples as f64);
        Rates {
            exact: f(self.exact),
            background: f(self.background),
            colour: f(self.colour),
            shape: f(self.shape),
        }
    }
}

/// The score of an evaluation, held-out and trained prompts apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EvalScore {
    /// Prompts from [`HELD_OUT`].
    pub held_out: SplitScore,
    /// Prompts from the trained combos.
    pub trained: SplitScore,
}

impl EvalScore {
    /// Adds one image drawn for `case` and read as `seen`.
    pub fn record(&mut self, case: &EvalCase, seen: &Classification) {
        match case.split {
            Split::HeldOut => self.held_out.record(&case.combo, seen),
            Split::Trained => self.trained.record(&case.combo, seen),
        }
    }

    /// The score of `split`.
    pub fn split(&self, split: Split) -> &SplitScore {
        match split {
            Split::HeldOut => &self.held_out,
            Split::Trained => &self.trained,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn names_and_captions_round_trip() {
        for colour in Colour::ALL {
            assert_eq!(colour.to_string().parse::<Colour>().unwrap(), colour);
        }
        for shape in Shape::ALL {
            assert_eq!(shape.to_string().parse::<Shape>().unwrap(), shape);
        }
        let all = Combo::all();
        assert_eq!(all.len(), 168);
        for combo in &all {
            assert_eq!(Combo::parse_caption(&combo.caption()).unwrap(), *combo);
        }
        let c = Combo::new(Colour::Red, Shape::Circle, Colour::Blue);
        assert_eq!(c.caption(), "a red circle on a blue background");
        for bad in [
            "",
            "a red circle on a blue",
            "a pink circle on a blue background",
            "a red hexagon on a blue background",
            "a red circle on a red background",
            "the red circle on a blue background",
        ] {
            assert!(
                matches!(Combo::parse_caption(bad), Err(Error::Parse(_))),
                "{bad}"
            );
        }
        assert!(matches!("Red".parse::<Colour>(), Err(Error::Parse(_))));
    }

    #[test]
    fn palette_colours_are_far_apart() {
        for (i, a) in Colour::ALL.iter().enumerate() {
            for b in &Colour::ALL[i + 1..] {
                let d: i32 = a
                    .rgb()
                    .iter()
                    .zip(b.rgb())
                    .map(|(&x, y)| (i32::from(x) - i32::from(y)).pow(2))
                    .sum();
                assert!(
                    d >= 90 * 90,
                    "{a} and {b} are {} apart",
                    f64::from(d).sqrt()
                );
            }
        }
    }

    #[test]
    fn held_out_combos_leave_every_part_in_training() {
        let unique: HashSet<_> = HELD_OUT.iter().collect();
        assert_eq!(unique.len(), HELD_OUT.len(), "duplicates in HELD_OUT");
        assert!(HELD_OUT.iter().all(|c| c.colour != c.background));
        for colour in Colour::ALL {
            assert!(
                HELD_OUT.iter().any(|c| c.colour == colour),
                "{colour} as shape"
            );
            assert!(
                HELD_OUT.iter().any(|c| c.background == colour),
                "{colour} as background"
            );
        }
        let trained = Combo::trained();
        assert_eq!(trained.len(), 168 - HELD_OUT.len());
        for colour in Colour::ALL {
            assert!(trained.iter().any(|c| c.colour == colour));
            assert!(trained.iter().any(|c| c.background == colour));
        }
        for shape in Shape::ALL {
            assert!(trained.iter().any(|c| c.shape == shape));
        }
        for h in HELD_OUT {
            assert!(
                trained
                    .iter()
                    .any(|t| t.colour == h.colour && t.shape == h.shape)
            );
            assert!(
                trained
                    .iter()
                    .any(|t| t.colour == h.colour && t.background == h.background)
            );
            assert!(
                trained
                    .iter()
                    .any(|t| t.shape == h.shape && t.background == h.background)
            );
        }
    }

    #[test]
    fn every_generated_image_is_classified_exactly() {
        for (size, count) in [(24, 300), (32, 300), (64, 100), (200, 20)] {
            for sample in ShapesSpec::new(count, size, 1).samples().unwrap() {
                assert!(!sample.combo.is_held_out());
                let seen = classify(&sample.image).unwrap();
                assert!(
                    seen.matches(&sample.combo),
                    "{size} px: {} at {:?} read as {seen:?}",
                    sample.combo,
                    sample.placement
                );
            }
        }
    }

    /// Adds N(0, sigma) to every channel and box-blurs `radius` px, clamped to 0..=255.
    fn degrade(image: &RgbImage, sigma: f64, radius: usize, seed: u64) -> RgbImage {
        let (w, h) = (image.width, image.height);
        let mut blurred = image.data.clone();
        if radius > 0 {
            for y in 0..h {
                for x in 0..w {
                    for c in 0..3 {
                        let (mut sum, mut n) = (0u32, 0u32);
                        for ny in y.saturating_sub(radius)..(y + radius + 1).min(h) {
                            for nx in x.saturating_sub(radius)..(x + radius + 1).min(w) {
                                sum += u32::from(image.data[3 * (ny * w + nx) + c]);
                                n += 1;
                            }
                        }
                        blurred[3 * (y * w + x) + c] = ((sum + n / 2) / n) as u8;
                    }
                }
            }
        }
        let mut rng = SeededNoise::new(seed);
        let data = blurred
            .iter()
            .map(|&v| {
                (f64::from(v) + sigma * rng.next_normal())
                    .round()
                    .clamp(0.0, 255.0) as u8
            })
            .collect();
        RgbImage {
            width: w,
            height: h,
            data,
        }
    }

    #[test]
    fn classify_survives_noise_and_blur() {
        for (size, radius) in [(32, 1), (64, 1), (64, 2)] {
            let count = 200;
            let mut right = 0;
            for (k, sample) in ShapesSpec::new(count, size, 2)
                .samples()
                .unwrap()
                .enumerate()
            {
                let noisy = degrade(&sample.image, 20.0, radius, k as u64);
                let seen = classify(&noisy).unwrap();
                right += usize::from(seen.matches(&sample.combo));
            }
            let accuracy = right as f64 / count as f64;
            eprintln!("{size} px, sigma 20, blur radius {radius}: accuracy {accuracy:.3}");
            assert!(accuracy >= 0.95, "{size} px blur {radius}: {accuracy}");
        }
    }

    #[test]
    fn classify_is_honest_about_what_it_cannot_tell() {
        // only background, clean and noisy
        let blank = render(
            &Combo::new(Colour::Red, Shape::Square, Colour::Blue),
            &Placement {
                x: 0,
                y: 0,
                extent: 0,
            },
            32,
        )
        .unwrap();
        let seen = classify(&blank).unwrap();
        assert_eq!(seen.background, Some(Colour::Blue));
        assert_eq!((seen.colour, seen.shape), (None, None));
        let seen = classify(&degrade(&blank, 20.0, 1, 0)).unwrap();
        assert_eq!((seen.background, seen.shape), (Some(Colour::Blue), None));
        // mid grey is no palette colour
        let grey = RgbImage {
            width: 16,
            height: 16,
            data: vec![128; 16 * 16 * 3],
        };
        assert_eq!(classify(&grey).unwrap(), Classification::default());
        // a long bar is no shape of the dataset
        let mut bar = blank.clone();
        for y in 14..18 {
            for x in 2..30 {
                bar.data[3 * (y * 32 + x)..3 * (y * 32 + x) + 3]
                    .copy_from_slice(&Colour::Red.rgb());
            }
        }
        let seen = classify(&bar).unwrap();
        assert_eq!(seen.colour, Some(Colour::Red));
        assert_eq!(seen.shape, None);
        // an empty image and a buffer that does not fit its size
        let empty = RgbImage {
            width: 0,
            height: 0,
            data: vec![],
        };
        assert_eq!(classify(&empty).unwrap(), Classification::default());
        let bad = RgbImage {
            width: 4,
            height: 4,
            data: vec![0; 5],
        };
        assert!(matches!(classify(&bad), Err(Error::InvalidInput(_))));
        let huge = RgbImage {
            width: usize::MAX,
            height: 2,
            data: vec![],
        };
        assert!(matches!(classify(&huge), Err(Error::InvalidInput(_))));
    }

    #[test]
    fn the_same_seed_writes_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, seed: u64| {
            let out = dir.path().join(name);
            generate(&ShapesSpec::new(12, 24, seed), &out).unwrap();
            let mut files: Vec<_> = std::fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            files
                .iter()
                .map(|p| {
                    let name = p.file_name().unwrap().to_string_lossy().into_owned();
                    (name, std::fs::read(p).unwrap())
                })
                .collect::<Vec<_>>()
        };
        let a = write("a", 5);
        let b = write("b", 5);
        let c = write("c", 6);
        assert_eq!(a.len(), 24);
        assert_eq!(a[0].0, "00000.png");
        assert_eq!(a[1].0, "00000.txt");
        assert_eq!(a, b);
        assert_ne!(a, c);
        // the folder reads back as a dataset, captions exact, combos never held out
        let data = crate::ImageCaptionDataset::from_dir(&dir.path().join("a")).unwrap();
        assert_eq!(data.len(), 12);
        for example in &data.examples {
            let combo = Combo::parse_caption(&example.caption).unwrap();
            assert_eq!(example.caption, combo.caption());
            assert!(!combo.is_held_out());
            let image = image::open(&example.image).unwrap().to_rgb8();
            let image = RgbImage {
                width: image.width() as usize,
                height: image.height() as usize,
                data: image.into_raw(),
            };
            assert_eq!((image.width, image.height), (24, 24));
            assert!(classify(&image).unwrap().matches(&combo));
        }
    }

    #[test]
    fn held_out_combos_never_appear_in_generated_captions() {
        let mut seen = HashSet::new();
        for sample in ShapesSpec::new(5000, 8, 3).samples().unwrap() {
            assert!(!sample.combo.is_held_out(), "{}", sample.combo);
            seen.insert(sample.combo);
        }
        // 5000 uniform draws of 156 combos reach all of them
        assert_eq!(seen.len(), Combo::trained().len());
    }

    #[test]
    fn existing_folders_are_kept_unless_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("shapes");
        generate(&ShapesSpec::new(2, 16, 0), &out).unwrap();
        let err = generate(&ShapesSpec::new(3, 16, 0), &out).unwrap_err();
        assert!(matches!(err, Error::OutputExists { .. }), "{err}");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 4);
        generate(&ShapesSpec::new(3, 16, 0).with_overwrite(true), &out).unwrap();
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 6);
        // nothing left beside it
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn bad_specs_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("never");
        for spec in [
            ShapesSpec::new(0, 32, 0),
            ShapesSpec::new(1, 7, 0),
            ShapesSpec::new(1, 0, 0),
            ShapesSpec::new(1, 1 << 20, 0),
            ShapesSpec::new(1, usize::MAX, 0),
            ShapesSpec::new(MAX_COUNT + 1, 32, 0),
        ] {
            let err = generate(&spec, &out).unwrap_err();
            assert!(matches!(err, Error::InvalidSpec(_)), "{spec:?}: {err}");
        }
        assert!(!out.exists());
        let combo = HELD_OUT[0];
        for (placement, size) in [
            (
                Placement {
                    x: 0,
                    y: 0,
                    extent: 9,
                },
                8,
            ),
            (
                Placement {
                    x: 5,
                    y: 0,
                    extent: 4,
                },
                8,
            ),
            (
                Placement {
                    x: usize::MAX,
                    y: 0,
                    extent: 4,
                },
                8,
            ),
            (
                Placement {
                    x: 0,
                    y: 0,
                    extent: 1,
                },
                MAX_SIZE + 1,
            ),
            (
                Placement {
                    x: 0,
                    y: 0,
                    extent: 0,
                },
                0,
            ),
        ] {
            assert!(matches!(
                render(&combo, &placement, size),
                Err(Error::InvalidSpec(_))
            ));
        }
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let err = generate(&ShapesSpec::new(1, 8, 0).with_overwrite(true), &file).unwrap_err();
        assert!(matches!(err, Error::InvalidSpec(_)), "{err}");
    }

    #[test]
    fn eval_cases_are_the_held_out_and_a_seeded_sample() {
        let cases = eval_cases(12, EVAL_SEED).unwrap();
        assert_eq!(cases.len(), HELD_OUT.len() + 12);
        assert_eq!(cases, eval_cases(12, EVAL_SEED).unwrap());
        let held: Vec<Combo> = cases
            .iter()
            .filter(|c| c.split == Split::HeldOut)
            .map(|c| c.combo)
            .collect();
        assert_eq!(held, HELD_OUT);
        let trained: HashSet<Combo> = cases
            .iter()
            .filter(|c| c.split == Split::Trained)
            .map(|c| c.combo)
            .collect();
        assert_eq!(trained.len(), 12);
        assert!(trained.iter().all(|c| !c.is_held_out()));
        assert_ne!(cases, eval_cases(12, 1).unwrap());
        assert_eq!(eval_cases(156, 0).unwrap().len(), 168);
        assert!(matches!(eval_cases(157, 0), Err(Error::InvalidSpec(_))));

        let mut score = EvalScore::default();
        let case = cases[0];
        let right = Classification {
            background: Some(case.combo.background),
            colour: Some(case.combo.colour),
            shape: Some(case.combo.shape),
        };
        score.record(&case, &right);
        score.record(
            &case,
            &Classification {
                shape: None,
                ..right
            },
        );
        let r = score.held_out.rates();
        assert_eq!(
            (r.exact, r.background, r.shape),
            (Some(0.5), Some(1.0), Some(0.5))
        );
        assert_eq!(score.trained.rates(), Rates::default());
    }
}
