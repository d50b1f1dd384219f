//! Full-size parity: the SD 1.5 and SD 2.1 text-encoder configs with random weights against
//! transformers, one forward of 77 tokens.
//!
//! Heavy, so gated: it runs only with `KILN_FULL_SIZE=1`, after `cargo xtask py full_size.py make`
//! has written `.cache/full-size/`:
//!
//! ```text
//! KILN_FULL_SIZE=1 cargo test --release -p kiln-clip --test full_size -- --nocapture
//! ```
//!
//! Error measure: `max |kiln - transformers| / max |transformers|`, tolerance [`TOL`] in f32.

mod common;

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Int, Tensor};
use kiln_clip::ClipTextModel;
use kiln_nn::reference::{Reference, max_relative_error, tolerance};

/// A forward pass in f32 against the reference in f32: the bound, and why it holds on any CPU
/// or thread count, is [`tolerance::FORWARD`].
const TOL: f32 = tolerance::FORWARD;

fn cache() -> Option<PathBuf> {
    if std::env::var_os("KILN_FULL_SIZE").is_none() {
        eprintln!("skipped: set KILN_FULL_SIZE=1 (after `cargo xtask py full_size.py make`)");
        return None;
    }
    Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/full-size"))
}

#[test]
fn full_size_text_encoders_match_transformers() {
    let Some(base) = cache() else { return };
    let device = common::device();
    for (name, params) in [("sd15", 123_060_480usize), ("sd21", 340_387_840)] {
        let dir = base.join(name).join("text_encoder");
        let model = ClipTextModel::from_dir(&dir, &device).unwrap();
        let io = Reference::open(&dir.join("io.safetensors")).unwrap();
        let ids: Tensor<2> = io.tensor("input_ids", &device).unwrap();
        let ids: Tensor<2, Int> = ids.int();
        let start = std::time::Instant::now();
        let out = model.forward(ids, 0).unwrap();
        let last: Tensor<3> = io.tensor("last_hidden_state", &device).unwrap();
        let pooled: Tensor<2> = io.tensor("pooler_output", &device).unwrap();
        let e1 = max_relative_error(&out.hidden_state, &last);
        let e2 = max_relative_error(&out.pooled, &pooled);
        eprintln!(
            "{name} text encoder: {} parameters, forward {:.1?}, max relative error {e1:.3e} (hidden), {e2:.3e} (pooled)",
            model.num_params(),
            start.elapsed()
        );
        assert_eq!(model.num_params(), params, "{name}: parameter count");
        assert!(e1 < TOL && e2 < TOL, "{name}: {e1} / {e2}");
    }
}
