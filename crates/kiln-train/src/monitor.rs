//! What a person watching a training run sees: the per-step log of the run (`loss.csv` in its
//! output folder), a plot of it, the smoothed loss and a progress bar for each stage.
//!
//! - [`LossLog`] appends one CSV row per step (`step,stage,<columns...>`), flushed as it is
//!   written so a killed run keeps its log, and cuts the log back to a checkpoint when a run
//!   resumes.
//! - [`plot_loss_csv`] draws the log as a PNG: one panel per stage, the raw loss light with its
//!   exponential moving average over it, on a log scale. The font is bundled (a subset of DejaVu
//!   Sans in `assets/`), so plots need no system font.
//! - [`Smoothed`] is that moving average, with TensorBoard's bias correction.
//! - [`Progress`] is an `indicatif` bar for one stage: step/total, smoothed loss, steps per
//!   second and ETA, hidden when stderr is not a terminal.
//!
//! ```no_run
//! # fn main() -> kiln_train::Result<()> {
//! use kiln_train::monitor::{LossLog, PlotOptions, Progress};
//!
//! let out = std::path::Path::new("my-model");
//! let mut log = LossLog::create(out, &["loss", "lr"])?;
//! let mut bar = Progress::new("unet", 1000, 0);
//! for step in 1..=1000 {
//!     let loss = 0.1; // trainer.step()?
//!     log.record("unet", step, &[loss, 1e-5])?;
//!     bar.inc(loss);
//! }
//! bar.finish();
//! log.plot(&out.join("loss.png"), &PlotOptions::default())?;
//! # Ok(()) }
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use image::ImageEncoder;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::{Error, Result};

/// The name of the loss log in a run's output folder.
pub const LOSS_CSV: &str = "loss.csv";

/// DejaVu Sans cut down to printable ASCII and a few symbols (23 KB); see
/// `assets/DejaVuSans-Subset.LICENSE` for its licence and how it was made.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-Subset.ttf");
/// The family the bundled font is registered under: plotters' default family, so every text of a
/// chart uses it.
const FONT_FAMILY: &str = "sans-serif";

// ---------------------------------------------------------------------------------------------
// The loss log
// ---------------------------------------------------------------------------------------------

/// The per-step log of a run: `loss.csv` in its output folder, a header `step,stage,<columns...>`
/// and one row per step, e.g. `12,unet,0.1375,1e-5`.
///
/// Stages are logged one after the other (all of `vae`, then all of `unet`), and within a stage
/// the steps increase, so a position in the log is a (stage, step) pair; [`LossLog::resume`] cuts
/// the log back to one. Each row is written to the file as soon as it is recorded. Values are
/// written as Rust's `{:?}` prints an `f64`: the shortest form that reads back to the same bits,
/// with an exponent only for very small or large magnitudes, and `NaN`, `inf`, `-inf` when not
/// finite (which Python's `float`, pandas and Rust's `parse` all read).
#[derive(Debug)]
pub struct LossLog {
    path: PathBuf,
    columns: Vec<String>,
    file: File,
    /// The stages logged so far, in order.
    stages: Vec<String>,
    /// The last step logged for the last stage.
    last_step: Option<u64>,
}

impl LossLog {
    /// Starts `dir/loss.csv` (creating `dir` if needed, replacing an earlier log) with the header
    /// `step,stage,<columns...>`; each [`record`](Self::record) then gives one value per column.
    ///
    /// Column names must be unique, non-empty, other than `step` and `stage`, and free of
    /// commas, quotes and line breaks.
    pub fn create(dir: &Path, columns: &[&str]) -> Result<Self> {
        let path = dir.join(LOSS_CSV);
        validate_columns(&path, columns)?;
        fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let header = format!("step,stage,{}\n", columns.join(","));
        write_atomically(&path, |file| file.write_all(header.as_bytes()))?;
        Ok(Self {
            file: open_append(&path)?,
            path,
            columns: columns.iter().map(|c| c.to_string()).collect(),
            stages: Vec::new(),
            last_step: None,
        })
    }

    /// Opens the existing `dir/loss.csv` of a run being resumed from the checkpoint written after
    /// `step` of `stage`, and cuts it back to that checkpoint: it keeps the rows up to the first
    /// one past (`stage`, `step`) (a row of a later stage, or of `stage` with a later step) and
    /// drops that row and all after it, so the resumed run's log has no duplicate or orphan rows.
    /// A stage the log has not reached yet keeps every row. The columns are the file's.
    ///
    /// The file is rewritten atomically (a temporary file renamed over it); an unterminated last
    /// line (a row torn by a kill) is dropped with the rest.
    pub fn resume(dir: &Path, stage: &str, step: u64) -> Result<Self> {
        let path = dir.join(LOSS_CSV);
        validate_name(&path, "stage", stage)?;
        let text = fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let parsed = parse_log(&path, &text)?;
        let table = &parsed.table;
        let stages = table.stages();
        let position = |s: &str| stages.iter().position(|t| *t == s).unwrap_or(stages.len());
        let resume_at = position(stage);
        let kept = table
            .rows
            .iter()
            .position(|row| {
                let at = position(&row.stage);
                at > resume_at || (at == resume_at && row.step > step)
            })
            .unwrap_or(table.rows.len());
        let end = match kept {
            0 => parsed.body_start,
            n => parsed.row_ends[n - 1],
        };
        let mut content = String::with_capacity(end + 1);
        content.push_str(parsed.header.trim_end_matches(['\n', '\r']));
        content.push('\n');
        content.push_str(&text[parsed.body_start..end]);
        write_atomically(&path, |file| file.write_all(content.as_bytes()))?;

        let rows = &table.rows[..kept];
        let mut kept_stages: Vec<String> = Vec::new();
        for row in rows {
            if kept_stages.last() != Some(&row.stage) {
                kept_stages.push(row.stage.clone());
            }
        }
        Ok(Self {
            file: open_append(&path)?,
            columns: table.columns.clone(),
            stages: kept_stages,
            last_step: rows.last().map(|row| row.step),
            path,
        })
    }

    /// Appends the row `step,stage,<values...>`, one value per column, and hands it to the OS at
    /// once (a run killed afterwards keeps it).
    ///
    /// Fails with [`Error::LossLog`] when the number of values is not the number of columns, the
    /// stage name is not a valid field, or the row does not come after the last one: a smaller or
    /// equal step of the same stage, or a stage logged before another one.
    pub fn record(&mut self, stage: &str, step: u64, values: &[f64]) -> Result<()> {
        validate_name(&self.path, "stage", stage)?;
        if values.len() != self.columns.len() {
            return Err(self.error(format!(
                "a row has {} value(s) for the {} column(s) {}",
                values.len(),
                self.columns.len(),
                self.columns.join(",")
            )));
        }
        let new_stage = match self.stages.last() {
            Some(last) if last == stage => {
                if let Some(prev) = self.last_step.filter(|&prev| step <= prev) {
                    return Err(self.error(format!(
                        "step {step} of stage `{stage}` does not come after step {prev}"
                    )));
                }
                false
            }
            current => {
                if self.stages.iter().any(|s| s == stage) {
                    let current = current.map_or("", String::as_str);
                    return Err(self.error(format!(
                        "stage `{stage}` was logged before `{current}`; stages are logged one \
                         after the other"
                    )));
                }
                true
            }
        };
        let mut line = format!("{step},{stage}");
        for value in values {
            line.push_str(&format!(",{value:?}"));
        }
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })?;
        if new_stage {
            self.stages.push(stage.to_string());
        }
        self.last_step = Some(step);
        Ok(())
    }

    /// The log file (`<dir>/loss.csv`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The value columns, after `step` and `stage`.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Draws the log as written so far to the PNG `png`; see [`plot_loss_csv`].
    pub fn plot(&self, png: &Path, options: &PlotOptions) -> Result<()> {
        plot_loss_csv(&self.path, png, options)
    }

    fn error(&self, message: String) -> Error {
        Error::LossLog {
            path: self.path.clone(),
            message,
        }
    }
}

/// A loss log read back: its columns and rows, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct LossTable {
    /// The value columns, after `step` and `stage`.
    pub columns: Vec<String>,
    /// The rows, in the order they were written.
    pub rows: Vec<LossRow>,
}

/// One row of a loss log.
#[derive(Debug, Clone, PartialEq)]
pub struct LossRow {
    /// The step number.
    pub step: u64,
    /// The stage, e.g. `vae` or `unet`.
    pub stage: String,
    /// One value per column of the table.
    pub values: Vec<f64>,
}

impl LossTable {
    /// The index of column `name` in each row's values.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }

    /// The stages in the order they were logged.
    pub fn stages(&self) -> Vec<&str> {
        let mut stages: Vec<&str> = Vec::new();
        for row in &self.rows {
            if !stages.contains(&row.stage.as_str()) {
                stages.push(&row.stage);
            }
        }
        stages
    }
}

/// Reads a loss log written by [`LossLog`]. An unterminated last line (a row still being written,
/// or torn by a kill) is left out; any other malformed line is an [`Error::LossLog`] naming its
/// line number.
pub fn read_loss_csv(path: &Path) -> Result<LossTable> {
    let text = fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_log(path, &text)?.table)
}

/// A parsed log and where its parts are in the text.
struct ParsedLog<'a> {
    table: LossTable,
    header: &'a str,
    /// The byte offset of the first row.
    body_start: usize,
    /// The byte offset just past each row's line break.
    row_ends: Vec<usize>,
}

fn parse_log<'a>(path: &Path, text: &'a str) -> Result<ParsedLog<'a>> {
    let error = |message: String| Error::LossLog {
        path: path.to_path_buf(),
        message,
    };
    let mut lines = text.split_inclusive('\n');
    let header = lines
        .next()
        .ok_or_else(|| error("the file is empty: it has no header".into()))?;
    let names: Vec<&str> = header.trim_end_matches(['\n', '\r']).split(',').collect();
    if names.len() < 3 || names[0] != "step" || names[1] != "stage" {
        return Err(error(format!(
            "line 1: the header is `{}`; a loss log starts with `step,stage,` and a column",
            header.trim_end()
        )));
    }
    let columns = &names[2..];
    validate_columns(path, columns)?;

    let mut rows = Vec::new();
    let mut row_ends = Vec::new();
    let mut offset = header.len();
    for (index, line) in lines.enumerate() {
        let number = index + 2;
        offset += line.len();
        let Some(line) = line.strip_suffix('\n') else {
            break; // torn last line
        };
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != names.len() {
            return Err(error(format!(
                "line {number}: {} field(s) for the {} of the header",
                fields.len(),
                names.len()
            )));
        }
        let step = fields[0].parse::<u64>().map_err(|_| {
            error(format!(
                "line {number}: step `{}` is not a step number",
                fields[0]
            ))
        })?;
        let values = fields[2..]
            .iter()
            .map(|f| {
                f.trim()
                    .parse::<f64>()
                    .map_err(|_| error(format!("line {number}: `{f}` is not a number")))
            })
            .collect::<Result<Vec<f64>>>()?;
        rows.push(LossRow {
            step,
            stage: fields[1].to_string(),
            values,
        });
        row_ends.push(offset);
    }
    Ok(ParsedLog {
        table: LossTable {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows,
        },
        header,
        body_start: header.len(),
        row_ends,
    })
}

fn validate_columns(path: &Path, columns: &[&str]) -> Result<()> {
    let error = |message: String| Error::LossLog {
        path: path.to_path_buf(),
        message,
    };
    if columns.is_empty() {
        return Err(error("a loss log needs at least one value column".into()));
    }
    for (i, column) in columns.iter().enumerate() {
        validate_name(path, "column", column)?;
        if *column == "step" || *column == "stage" {
            return Err(error(format!(
                "`{column}` is the name of a fixed column; name the value column otherwise"
            )));
        }
        if columns[..i].contains(column) {
            return Err(error(format!("column `{column}` appears twice")));
        }
    }
    Ok(())
}

/// A stage or column name must be a plain CSV field.
fn validate_name(path: &Path, what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.trim() != name || name.contains([',', '"', '\n', '\r']) {
        return Err(Error::LossLog {
            path: path.to_path_buf(),
            message: format!(
                "{what} name {name:?} must be non-empty, without surrounding spaces, commas, \
                 quotes or line breaks"
            ),
        });
    }
    Ok(())
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes `path` by writing a temporary file next to it and renaming that over it, so a reader
/// (or a crash) sees the old file or the new one, never a part.
fn write_atomically(path: &Path, write: impl FnOnce(&mut File) -> io::Result<()>) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let io_error = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        io_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let tmp = path.with_file_name(format!(
        ".{}.{}-{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = File::create(&tmp).and_then(|mut file| {
        write(&mut file)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    });
    result.map_err(|source| {
        // Best effort: the error that matters is the one returned.
        let _ = fs::remove_file(&tmp);
        io_error(source)
    })
}

// ---------------------------------------------------------------------------------------------
// Smoothing
// ---------------------------------------------------------------------------------------------

/// An exponential moving average with bias correction, as TensorBoard smooths scalars: after `n`
/// finite inputs `x_1..x_n` it is `sum_i (1 - beta) beta^(n-i) x_i / (1 - beta^n)`, so the first
/// value is the first input and a constant input gives that constant. Non-finite inputs are
/// ignored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Smoothed {
    beta: f64,
    /// The biased average.
    average: f64,
    /// `beta^n` for the `n` inputs taken.
    beta_pow: f64,
}

impl Default for Smoothed {
    /// `beta = 0.98`: the last ~50 steps weigh most.
    fn default() -> Self {
        Self {
            beta: 0.98,
            average: 0.0,
            beta_pow: 1.0,
        }
    }
}

impl Smoothed {
    /// An average that keeps `beta` of itself at each input; `beta` in `[0, 1)` (0 follows the
    /// input, closer to 1 smooths more).
    pub fn new(beta: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&beta) {
            return Err(Error::InvalidOption(format!(
                "smoothing beta {beta} is not in [0, 1)"
            )));
        }
        Ok(Self {
            beta,
            ..Self::default()
        })
    }

    /// Takes `x` (ignored unless finite) and returns the smoothed value: NaN while no finite input
    /// has been taken.
    pub fn update(&mut self, x: f64) -> f64 {
        if x.is_finite() {
            self.average = self.beta * self.average + (1.0 - self.beta) * x;
            self.beta_pow *= self.beta;
        }
        self.value().unwrap_or(f64::NAN)
    }

    /// The smoothed value, or `None` before the first finite input.
    pub fn value(&self) -> Option<f64> {
        (self.beta_pow < 1.0).then(|| self.average / (1.0 - self.beta_pow))
    }

    /// The `beta` of this average.
    pub fn beta(&self) -> f64 {
        self.beta
    }
}

// ---------------------------------------------------------------------------------------------
// The progress bar
// ---------------------------------------------------------------------------------------------

/// A progress bar for one stage of a run, on stderr: stage name, step/total, the smoothed loss
/// (and the last one when it is not finite), steps per second, elapsed time and ETA.
///
/// It draws nothing when stderr is not a terminal (`indicatif` checks); [`Progress::hidden`] never
/// draws.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    smoothed: Smoothed,
    /// Made by [`Progress::hidden`]: messages are dropped rather than written to stderr.
    silent: bool,
}

impl Progress {
    /// A bar for `stage` of `total` steps, starting at `start_step` (0 for a new run, the
    /// checkpoint's step for a resumed one; speed and ETA count only the steps made here).
    pub fn new(stage: &str, total: u64, start_step: u64) -> Self {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
            .with_position(start_step.min(total));
        let style = ProgressStyle::with_template(
            "{prefix:.bold} {bar:30.cyan/blue} {pos}/{len} | loss {msg} | {per_sec} | \
             {elapsed} elapsed, eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message("-");
        bar.set_prefix(stage.to_string());
        // The steps before `start_step` were made by an earlier run: keep them out of the speed.
        bar.reset_eta();
        if !bar.is_hidden() {
            bar.enable_steady_tick(Duration::from_millis(500));
        }
        Self {
            bar,
            smoothed: Smoothed::default(),
            silent: false,
        }
    }

    /// A bar that never draws and drops its messages, for tests and library users with their own
    /// display; it still counts steps and smooths the loss.
    pub fn hidden() -> Self {
        Self {
            bar: ProgressBar::hidden(),
            smoothed: Smoothed::default(),
            silent: true,
        }
    }

    /// Counts one step with its `loss`.
    pub fn inc(&mut self, loss: f64) {
        let smoothed = self.smoothed.update(loss);
        let mut message = format_loss(smoothed);
        if !loss.is_finite() {
            message.push_str(&format!(" (last {loss})"));
        }
        self.bar.set_message(message);
        self.bar.inc(1);
    }

    /// Prints `msg` on its own line above the bar without breaking it; when stderr is not a
    /// terminal it is written to stderr as a plain line, and a [`hidden`](Self::hidden) bar drops
    /// it.
    pub fn println(&self, msg: impl AsRef<str>) {
        let msg = msg.as_ref();
        if self.silent {
            tracing::debug!("{msg}");
        } else if self.bar.is_hidden() {
            // Nothing to do if stderr itself is gone.
            let _ = writeln!(io::stderr(), "{msg}");
        } else {
            self.bar.println(msg);
        }
    }

    /// Stops the bar, leaving its last state on screen.
    pub fn finish(&self) {
        self.bar.finish();
    }

    /// The step reached: the start step plus the steps counted.
    pub fn position(&self) -> u64 {
        self.bar.position()
    }

    /// The smoothed loss, or `None` before the first finite one.
    pub fn smoothed(&self) -> Option<f64> {
        self.smoothed.value()
    }

    /// Whether the bar draws nothing (stderr is not a terminal, or [`Progress::hidden`]).
    pub fn is_hidden(&self) -> bool {
        self.bar.is_hidden()
    }
}

/// A loss as a person reads it: four decimals, or scientific notation when small.
fn format_loss(x: f64) -> String {
    if !x.is_finite() {
        "-".to_string()
    } else if x != 0.0 && x.abs() < 1e-3 {
        format!("{x:.3e}")
    } else {
        format!("{x:.4}")
    }
}

// ---------------------------------------------------------------------------------------------
// The plot
// ---------------------------------------------------------------------------------------------

/// How [`plot_loss_csv`] draws a log.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotOptions {
    /// Image width in pixels (240 to 8192).
    pub width: u32,
    /// Image height in pixels (160 to 8192).
    pub height: u32,
    /// The column drawn.
    pub column: String,
    /// The `beta` of the moving average drawn over the raw values (see [`Smoothed`]).
    pub smoothing: f64,
}

impl Default for PlotOptions {
    /// 1200x500, the `loss` column, `beta = 0.98`.
    fn default() -> Self {
        Self {
            width: 1200,
            height: 500,
            column: "loss".into(),
            smoothing: 0.98,
        }
    }
}

/// Stage colours (matplotlib's first five), in the order stages were logged.
const COLOURS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

/// Draws the loss log `csv` as the PNG `png`: one panel per stage, side by side, with the
/// column against step on a log scale, the raw values light and their moving average over them,
/// axis titles, tick labels and a legend. Values that a log scale cannot show (non-finite, zero or
/// negative) are left out and counted in the legend. An empty log gives an empty panel.
///
/// The image is written atomically (a temporary file renamed over `png`).
pub fn plot_loss_csv(csv: &Path, png: &Path, options: &PlotOptions) -> Result<()> {
    let plot_error = |message: String| Error::Plot {
        path: png.to_path_buf(),
        message,
    };
    let (width, height) = (options.width, options.height);
    if !(240..=8192).contains(&width) || !(160..=8192).contains(&height) {
        return Err(plot_error(format!(
            "size {width}x{height} is outside 240x160 to 8192x8192"
        )));
    }
    let smoothing = Smoothed::new(options.smoothing)?;
    let table = read_loss_csv(csv)?;
    let column = table
        .column(&options.column)
        .ok_or_else(|| Error::LossLog {
            path: csv.to_path_buf(),
            message: format!(
                "there is no column `{}` to plot (columns: {})",
                options.column,
                table.columns.join(", ")
            ),
        })?;
    register_font().map_err(plot_error)?;

    let mut pixels = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        draw_figure(&root, &table, column, &options.column, smoothing).map_err(plot_error)?;
        root.present().map_err(|e| plot_error(e.to_string()))?;
    }
    write_atomically(png, |file| {
        let mut writer = BufWriter::new(file);
        image::codecs::png::PngEncoder::new(&mut writer)
            .write_image(&pixels, width, height, image::ExtendedColorType::Rgb8)
            .map_err(io::Error::other)?;
        writer.flush()
    })
}

/// Registers the bundled font with plotters, once per process.
fn register_font() -> std::result::Result<(), String> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err("the bundled font cannot be read".into())
    }
}

/// One stage's points, split where a log scale cannot go.
struct StageSeries {
    raw: Vec<Vec<(u64, f64)>>,
    smoothed: Vec<Vec<(u64, f64)>>,
    steps: Range<u64>,
    /// The range of the values shown, `None` when there are none.
    values: Option<(f64, f64)>,
    /// Values left out: non-finite, zero or negative.
    hidden: usize,
    first_step: u64,
    last_step: u64,
    last_smoothed: Option<f64>,
}

impl StageSeries {
    fn new(rows: &[&LossRow], column: usize, mut smoothing: Smoothed) -> Self {
        let shown = |v: f64| v.is_finite() && v > 0.0;
        let mut raw: Vec<Vec<(u64, f64)>> = vec![Vec::new()];
        let mut smoothed: Vec<Vec<(u64, f64)>> = vec![Vec::new()];
        let mut hidden = 0;
        let mut values: Option<(f64, f64)> = None;
        let mut include = |v: f64| {
            values = Some(values.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))));
        };
        for row in rows {
            let v = row.values[column];
            let s = smoothing.update(v);
            for (series, v) in [(&mut raw, v), (&mut smoothed, s)] {
                if shown(v) {
                    if let Some(segment) = series.last_mut() {
                        segment.push((row.step, v));
                    }
                    include(v);
                } else if series.last().is_some_and(|s| !s.is_empty()) {
                    series.push(Vec::new());
                }
            }
            if !shown(v) {
                hidden += 1;
            }
        }
        let first_step = rows.first().map_or(0, |r| r.step);
        let last_step = rows.last().map_or(0, |r| r.step);
        let (lo, hi) = (first_step.min(last_step), first_step.max(last_step));
        let steps = if lo == hi {
            lo.saturating_sub(1)..hi.saturating_add(1)
        } else {
            lo..hi
        };
        Self {
            raw,
            smoothed,
            steps,
            values,
            hidden,
            first_step,
            last_step,
            last_smoothed: smoothing.value(),
        }
    }
}

fn draw_figure<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    table: &LossTable,
    column: usize,
    column_name: &str,
    smoothing: Smoothed,
) -> std::result::Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let stages = table.stages();
    if stages.is_empty() {
        let empty = StageSeries::new(&[], column, smoothing);
        return draw_panel(
            root,
            "no steps logged yet",
            &empty,
            COLOURS[0],
            column_name,
            smoothing.beta(),
        );
    }
    let panels = root.split_evenly((1, stages.len()));
    for (i, (stage, area)) in stages.iter().zip(panels.iter()).enumerate() {
        let rows: Vec<&LossRow> = table.rows.iter().filter(|r| r.stage == *stage).collect();
        let series = StageSeries::new(&rows, column, smoothing);
        let steps = if series.first_step == series.last_step {
            format!("step {}", series.first_step)
        } else {
            format!("steps {}-{}", series.first_step, series.last_step)
        };
        let last = series
            .last_smoothed
            .map_or_else(String::new, |v| format!(", smoothed {}", format_loss(v)));
        let title = format!("{stage}: {steps}{last}");
        draw_panel(
            area,
            &title,
            &series,
            COLOURS[i % COLOURS.len()],
            column_name,
            smoothing.beta(),
        )?;
    }
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    series: &StageSeries,
    colour: RGBColor,
    column_name: &str,
    beta: f64,
) -> std::result::Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let (w, h) = area.dim_in_pixel();
    let scale = (f64::from(w.min(h)) / 450.0).clamp(0.7, 2.5);
    // Text sizes and line widths in pixels, grown with the panel.
    let px = |size: f64| (size * scale).round().max(8.0) as u32;
    let stroke = |width: f64| (width * scale).round().max(1.0) as u32;

    let (lo, hi) = match series.values {
        None => (0.1, 1.0),
        Some((lo, hi)) if lo == hi => (lo / 2.0, hi * 2.0),
        Some((lo, hi)) => {
            let pad = (hi / lo).powf(0.05);
            (lo / pad, hi * pad)
        }
    };
    let ticks = log_ticks(lo, hi);
    let y = (lo..hi).log_scale().with_key_points(ticks);

    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT_FAMILY, px(19.0)))
        .margin(px(10.0))
        .margin_right(px(24.0))
        .x_label_area_size(px(42.0))
        .y_label_area_size(px(62.0))
        .build_cartesian_2d(series.steps.clone(), y)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(format!("{column_name} (log scale)"))
        .x_labels(6)
        .x_label_formatter(&|step| step.to_string())
        .y_label_formatter(&|v| format_tick(*v))
        .label_style((FONT_FAMILY, px(13.0)))
        .axis_desc_style((FONT_FAMILY, px(14.0)))
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(TRANSPARENT)
        .axis_style(BLACK)
        .draw()
        .map_err(err)?;

    let raw_style = colour.mix(0.35).stroke_width(stroke(1.0));
    let smooth_style = colour.stroke_width(stroke(2.0));
    let mut labelled = false;
    for segment in series.raw.iter().filter(|s| !s.is_empty()) {
        let drawn = chart
            .draw_series(LineSeries::new(segment.iter().copied(), raw_style))
            .map_err(err)?;
        if !labelled {
            drawn
                .label(format!("{column_name} per step"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], raw_style));
            labelled = true;
        }
    }
    labelled = false;
    for segment in series.smoothed.iter().filter(|s| !s.is_empty()) {
        let drawn = chart
            .draw_series(LineSeries::new(segment.iter().copied(), smooth_style))
            .map_err(err)?;
        if !labelled {
            drawn
                .label(format!("smoothed (EMA, beta {beta})"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], smooth_style));
            labelled = true;
        }
    }
    // A point with no neighbour to join (a one-row log, a value between gaps) as a dot.
    for (segments, radius, style) in [
        (&series.raw, stroke(2.0), colour.mix(0.5).filled()),
        (&series.smoothed, stroke(3.0), colour.filled()),
    ] {
        let lone = segments.iter().filter(|s| s.len() == 1).map(|s| s[0]);
        chart
            .draw_series(lone.map(|point| Circle::new(point, radius, style)))
            .map_err(err)?;
    }
    let any_label = series.raw.iter().any(|s| !s.is_empty());
    if series.hidden > 0 {
        let red = RED.stroke_width(2);
        chart
            .draw_series(std::iter::empty::<PathElement<(u64, f64)>>())
            .map_err(err)?
            .label(format!(
                "{} step(s) not shown (NaN, inf or <= 0)",
                series.hidden
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x + 6, y - 4), (x + 14, y + 4)], red));
    }
    if any_label || series.hidden > 0 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font((FONT_FAMILY, px(13.0)))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// Tick values for a log axis over `lo..hi` (`0 < lo < hi`): powers of ten when the range spans
/// enough decades, else 1-2-5 or 1..9 times powers of ten, else evenly spaced round values (a
/// range within one decade, where a log axis of powers of ten alone would have no tick).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let first = lo.log10().floor() as i32;
    let last = hi.log10().ceil() as i32;
    let candidates = |mults: &[f64]| -> Vec<f64> {
        (first..=last)
            .flat_map(|k| mults.iter().map(move |m| m * 10f64.powi(k)))
            .filter(|v| (lo..=hi).contains(v))
            .collect()
    };
    let decades = candidates(&[1.0]);
    if decades.len() >= 3 {
        let stride = decades.len().div_ceil(8);
        return decades.into_iter().step_by(stride).collect();
    }
    for mults in [
        &[1.0, 2.0, 5.0][..],
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
    ] {
        let ticks = candidates(mults);
        if (3..=10).contains(&ticks.len()) {
            return ticks;
        }
    }
    // Within a decade: round linear steps of 1, 2 or 5 times a power of ten.
    let rough = (hi - lo) / 5.0;
    let magnitude = 10f64.powi(rough.log10().floor() as i32);
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| (hi - lo) / s <= 7.0)
        .unwrap_or(10.0 * magnitude);
    let start = (lo / step).ceil() as i64;
    let end = (hi / step).floor() as i64;
    (start..=end).map(|i| i as f64 * step).collect()
}

/// A tick label: up to three significant digits, scientific notation outside `[0.001, 10000)`.
fn format_tick(v: f64) -> String {
    let magnitude = v.abs();
    if magnitude != 0.0 && !(1e-3..1e4).contains(&magnitude) {
        let text = format!("{v:.2e}");
        match text.split_once('e') {
            Some((mantissa, exponent)) => format!("{}e{exponent}", trim_zeros(mantissa)),
            None => text,
        }
    } else {
        let decimals = if magnitude == 0.0 {
            0
        } else {
            (2 - magnitude.log10().floor() as i32).clamp(0, 6) as usize
        };
        trim_zeros(&format!("{v:.decimals$}")).to_string()
    }
}

fn trim_zeros(number: &str) -> &str {
    if number.contains('.') {
        number.trim_end_matches('0').trim_end_matches('.')
    } else {
        number
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic noisy training curve: `scale * exp(-step / tau) + floor`, times noise in
    /// roughly [0.5, 1.6] from a small LCG.
    fn synthetic_loss(seed: u64, steps: u64, scale: f64, tau: f64, floor: f64) -> Vec<f64> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (1..=steps)
            .map(|step| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 11) as f64 / (1u64 << 53) as f64;
                let noise = (1.2 * (u - 0.5)).exp();
                (scale * (-(step as f64) / tau).exp() + floor) * noise
            })
            .collect()
    }

    /// A log of `vae` steps 1..=vae then `unet` steps 1..=unet, columns `loss,lr`.
    fn two_stage_log(dir: &Path, vae: u64, unet: u64) -> Result<(LossLog, Vec<LossRow>)> {
        let mut log = LossLog::create(dir, &["loss", "lr"])?;
        let mut rows = Vec::new();
        for (stage, steps, seed, scale, tau, floor) in [
            ("vae", vae, 1, 0.8, 40.0, 0.03),
            ("unet", unet, 2, 0.25, 80.0, 0.06),
        ] {
            for (i, loss) in synthetic_loss(seed, steps, scale, tau, floor)
                .into_iter()
                .enumerate()
            {
                let step = i as u64 + 1;
                let lr = 1e-4 * (1.0 - step as f64 / (steps as f64 + 1.0));
                log.record(stage, step, &[loss, lr])?;
                rows.push(LossRow {
                    step,
                    stage: stage.into(),
                    values: vec![loss, lr],
                });
            }
        }
        Ok((log, rows))
    }

    #[test]
    fn log_round_trips_through_the_csv() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            path: "tempdir".into(),
            source,
        })?;
        let (log, rows) = two_stage_log(dir.path(), 120, 180)?;
        assert_eq!(log.path(), dir.path().join(LOSS_CSV));
        assert_eq!(log.columns(), ["loss", "lr"]);
        drop(log);

        // The file as any CSV reader sees it.
        let text = fs::read_to_string(dir.path().join(LOSS_CSV)).map_err(|source| Error::Io {
            path: "loss.csv".into(),
            source,
        })?;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "step,stage,loss,lr");
        assert_eq!(lines.len(), 1 + 300);
        assert!(text.ends_with('\n'));
        for (line, row) in lines[1..].iter().zip(&rows) {
            let fields: Vec<&str> = line.split(',').collect();
            assert_eq!(fields.len(), 4, "{line}");
            assert_eq!(fields[0].parse::<u64>().ok(), Some(row.step));
            assert_eq!(fields[1], row.stage);
            // Rust's shortest round-trip form: the values come back bit for bit.
            assert_eq!(fields[2].parse::<f64>().ok(), Some(row.values[0]));
            assert_eq!(fields[3].parse::<f64>().ok(), Some(row.values[1]));
        }
        assert_eq!(&lines[1][..6], "1,vae,");
        assert_eq!(&lines[121][..7], "1,unet,");

        let table = read_loss_csv(&dir.path().join(LOSS_CSV))?;
        assert_eq!(table.columns, ["loss", "lr"]);
        assert_eq!(table.stages(), ["vae", "unet"]);
        assert_eq!(table.column("lr"), Some(1));
        assert_eq!(table.rows, rows);
        Ok(())
    }

    #[test]
    fn resume_drops_the_rows_after_the_checkpoint() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            path: "tempdir".into(),
            source,
        })?;
        let csv = dir.path().join(LOSS_CSV);
        let (log, rows) = two_stage_log(dir.path(), 100, 100)?;
        drop(log);

        // Resumed in the second stage: all of the first stays, the second up to step 40.
        let mut log = LossLog::resume(dir.path(), "unet", 40)?;
        assert_eq!(log.columns(), ["loss", "lr"]);
        let table = read_loss_csv(&csv)?;
        assert_eq!(table.rows, rows[..140]);
        // The log goes on from there, and only from there.
        assert!(matches!(
            log.record("unet", 40, &[0.1, 0.0]),
            Err(Error::LossLog { .. })
        ));
        assert!(matches!(
            log.record("vae", 101, &[0.1, 0.0]),
            Err(Error::LossLog { .. })
        ));
        log.record("unet", 41, &[0.1, 0.0])?;
        drop(log);
        let table = read_loss_csv(&csv)?;
        assert_eq!(table.rows.len(), 141);
        assert_eq!(table.rows[140].step, 41);

        // Resumed in the first stage: the second one goes entirely.
        let mut log = LossLog::resume(dir.path(), "vae", 50)?;
        log.record("vae", 51, &[0.2, 0.0])?;
        drop(log);
        let table = read_loss_csv(&csv)?;
        assert_eq!(table.rows[..50], rows[..50]);
        assert_eq!(table.rows.len(), 51);
        assert_eq!(table.stages(), ["vae"]);

        // A stage not reached yet keeps everything; a torn last line goes.
        let mut file = open_append(&csv)?;
        file.write_all(b"52,vae,0.1").map_err(|source| Error::Io {
            path: csv.clone(),
            source,
        })?;
        drop(file);
        assert_eq!(read_loss_csv(&csv)?.rows.len(), 51);
        let mut log = LossLog::resume(dir.path(), "unet", 0)?;
        log.record("unet", 1, &[0.3, 0.0])?;
        drop(log);
        let text = fs::read_to_string(&csv).map_err(|source| Error::Io {
            path: csv.clone(),
            source,
        })?;
        assert!(!text.contains("52,vae"));
        assert!(text.ends_with("\n1,unet,0.3,0.0\n"));
        assert_eq!(read_loss_csv(&csv)?.rows.len(), 52);
        Ok(())
    }

    #[test]
    fn bad_rows_columns_and_files_are_typed_errors() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            path: "tempdir".into(),
            source,
        })?;
        for columns in [&[][..], &["loss", "loss"], &["step"], &["a,b"], &[""]] {
            assert!(
                matches!(
                    LossLog::create(dir.path(), columns),
                    Err(Error::LossLog { .. })
                ),
                "{columns:?}"
            );
        }
        let mut log = LossLog::create(dir.path(), &["loss"])?;
        assert!(matches!(
            log.record("unet", 1, &[0.1, 0.2]),
            Err(Error::LossLog { .. })
        ));
        assert!(matches!(
            log.record("u,net", 1, &[0.1]),
            Err(Error::LossLog { .. })
        ));
        drop(log);
        let missing = dir.path().join("nowhere");
        match LossLog::resume(&missing, "unet", 1) {
            Err(Error::Io { path, .. }) => assert_eq!(path, missing.join(LOSS_CSV)),
            other => panic!("expected an IO error naming the file, got {other:?}"),
        }
        let csv = dir.path().join(LOSS_CSV);
        fs::write(&csv, "step,stage,loss\n1,unet,0.5\n2,unet,oops\n").map_err(|source| {
            Error::Io {
                path: csv.clone(),
                source,
            }
        })?;
        match read_loss_csv(&csv) {
            Err(e @ Error::LossLog { .. }) => assert!(e.to_string().contains("line 3"), "{e}"),
            other => panic!("expected a log error, got {other:?}"),
        }
        assert!(matches!(Smoothed::new(1.0), Err(Error::InvalidOption(_))));
        Ok(())
    }

    /// The decoded RGB pixels of a PNG.
    fn decode(png: &Path) -> image::RgbImage {
        match image::open(png) {
            Ok(image) => image.to_rgb8(),
            Err(e) => panic!("{}: {e}", png.display()),
        }
    }

    fn is_dark(p: &image::Rgb<u8>) -> bool {
        p.0.iter().all(|&c| c < 90)
    }

    #[test]
    fn plot_draws_axes_and_curves() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            path: "tempdir".into(),
            source,
        })?;
        let (log, _) = two_stage_log(dir.path(), 150, 150)?;
        let png = dir.path().join("loss.png");
        let options = PlotOptions {
            width: 900,
            height: 420,
            ..PlotOptions::default()
        };
        log.plot(&png, &options)?;
        // `KILN_LOSS_PLOT=/tmp/loss-example.png` keeps a copy to look at.
        if let Some(out) = std::env::var_os("KILN_LOSS_PLOT") {
            let (example, _) = two_stage_log(&dir.path().join("example"), 500, 1500)?;
            example.plot(Path::new(&out), &PlotOptions::default())?;
        }

        let image = decode(&png);
        assert_eq!(image.dimensions(), (900, 420));
        let first = image.get_pixel(0, 0);
        assert!(
            image.pixels().any(|p| p != first),
            "the image is one colour"
        );
        // The left panel's y axis and tick labels, and its x axis, are drawn in black.
        let dark_left = (0..120)
            .flat_map(|x| (0..420).map(move |y| (x, y)))
            .filter(|&(x, y)| is_dark(image.get_pixel(x, y)))
            .count();
        let dark_bottom = (0..450)
            .flat_map(|x| (330..420).map(move |y| (x, y)))
            .filter(|&(x, y)| is_dark(image.get_pixel(x, y)))
            .count();
        assert!(dark_left > 200, "{dark_left} dark pixels by the y axis");
        assert!(dark_bottom > 200, "{dark_bottom} dark pixels by the x axis");
        // Both stage colours appear (the curves).
        let near = |p: &image::Rgb<u8>, c: RGBColor| {
            p.0.iter()
                .zip([c.0, c.1, c.2])
                .all(|(&a, b)| a.abs_diff(b) < 30)
        };
        for colour in &COLOURS[..2] {
            let count = image.pixels().filter(|p| near(p, *colour)).count();
            assert!(count > 300, "{count} pixels of {colour:?}");
        }
        // Written atomically: no temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .map_err(|source| Error::Io {
                path: dir.path().into(),
                source,
            })?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&"loss.png".to_string()), "{names:?}");
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
        Ok(())
    }

    #[test]
    fn non_finite_losses_are_logged_and_plotted_around() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            path: "tempdir".into(),
            source,
        })?;
        let mut log = LossLog::create(dir.path(), &["loss"])?;
        for step in 1..=60u64 {
            let loss = match step {
                20 => f64::NAN,
                21 => f64::INFINITY,
                22 => f64::NEG_INFINITY,
                23 => 0.0,
                _ => 1.0 / step as f64,
            };
            log.record("unet", step, &[loss])?;
        }
        let text = fs::read_to_string(log.path()).map_err(|source| Error::Io {
            path: log.path().into(),
            source,
        })?;
        assert!(text.contains("\n20,unet,NaN\n21,unet,inf\n22,unet,-inf\n23,unet,0.0\n"));
        let table = read_loss_csv(log.path())?;
        assert!(table.rows[19].values[0].is_nan());
        assert_eq!(table.rows[20].values[0], f64::INFINITY);
        assert_eq!(table.rows[21].values[0], f64::NEG_INFINITY);

        let png = dir.path().join("loss.png");
        log.plot(&png, &PlotOptions::default())?;
        let image = decode(&png);
        assert_eq!(image.dimensions(), (1200, 500));
        assert!(image.pixels().any(is_dark));

        // Nothing but non-finite values still gives a plot.
        let mut log = LossLog::create(dir.path(), &["loss"])?;
        log.record("vae", 1, &[f64::NAN])?;
        log.record("vae", 2, &[f64::NAN])?;
        log.plot(&png, &PlotOptions::default())?;
        Ok(())
    }

    #[test]
    fn empty_and_one_row_logs_plot() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            path: "tempdir".into(),
            source,
        })?;
        let png = dir.path().join("loss.png");
        let options = PlotOptions {
            width: 320,
            height: 240,
            ..PlotOptions::default()
        };
        let mut log = LossLog::create(dir.path(), &["loss"])?;
        log.plot(&png, &options)?;
        assert_eq!(decode(&png).dimensions(), (320, 240));
        log.record("unet", 7, &[0.25])?;
        log.plot(&png, &options)?;
        let image = decode(&png);
        assert!(image.pixels().any(is_dark));

        let too_small = PlotOptions {
            width: 10,
            ..options.clone()
        };
        assert!(matches!(
            log.plot(&png, &too_small),
            Err(Error::Plot { .. })
        ));
        let no_column = PlotOptions {
            column: "lr".into(),
            ..options
        };
        assert!(matches!(
            log.plot(&png, &no_column),
            Err(Error::LossLog { .. })
        ));
        Ok(())
    }

    #[test]
    fn smoothed_starts_at_the_first_value_and_converges() -> Result<()> {
        let mut s = Smoothed::default();
        assert_eq!(s.value(), None);
        assert!(s.update(f64::NAN).is_nan());
        assert_eq!(s.update(3.5), 3.5);
        assert_eq!(s.value(), Some(3.5));

        // A constant input is returned as is (bias correction), up to rounding.
        let mut s = Smoothed::new(0.9)?;
        for _ in 0..50 {
            let v = s.update(2.0);
            assert!((v - 2.0).abs() < 1e-12, "{v}");
        }
        // After a jump it converges to the new constant, ignoring non-finite inputs.
        for i in 0..400 {
            s.update(if i % 7 == 0 { f64::INFINITY } else { 5.0 });
        }
        let v = s.value().unwrap_or(f64::NAN);
        assert!((v - 5.0).abs() < 1e-9, "{v}");

        // The debiased value is the weighted mean of the inputs.
        let mut s = Smoothed::new(0.5)?;
        s.update(1.0);
        let v = s.update(4.0);
        // (0.5 * 0.5 * 1 + 0.5 * 4) / (1 - 0.25) = 3.0
        assert!((v - 3.0).abs() < 1e-12, "{v}");
        Ok(())
    }

    #[test]
    fn progress_counts_from_the_start_step() {
        let mut bar = Progress::hidden();
        assert!(bar.is_hidden());
        bar.inc(0.5);
        bar.inc(f64::NAN);
        bar.println("not shown");
        bar.finish();
        assert_eq!(bar.position(), 2);
        assert_eq!(bar.smoothed(), Some(0.5));

        let mut bar = Progress::new("unet", 100, 40);
        bar.inc(0.25);
        assert_eq!(bar.position(), 41);
        bar.finish();
    }

    #[test]
    fn ticks_cover_narrow_and_wide_ranges() {
        assert_eq!(log_ticks(0.001, 20.0), [0.001, 0.01, 0.1, 1.0, 10.0]);
        let narrow = log_ticks(0.12, 0.18);
        assert!(narrow.len() >= 3, "{narrow:?}");
        assert!(narrow.iter().all(|v| (0.12..=0.18).contains(v)));
        let mid = log_ticks(0.03, 0.4);
        assert!((3..=10).contains(&mid.len()), "{mid:?}");
        assert_eq!(format_tick(3.0 * 0.1), "0.3");
        assert_eq!(format_tick(0.125), "0.125");
        assert_eq!(format_tick(20.0), "20");
        assert_eq!(format_tick(2.0 * 10f64.powi(-5)), "2e-5");
    }
}
