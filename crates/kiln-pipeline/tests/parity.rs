//! End-to-end parity with diffusers' `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline`
//! and `StableDiffusionInpaintPipeline` on the tiny pipelines of `fixtures/pipeline/`
//! (`xtask/fixtures/pipeline.py`): same folder, same initial latents, the same random draws
//! replayed. Tolerance, as issue 5 states it: the 8-bit images within 2/255 per channel; the float
//! images within 5e-4 (measured: at most 8e-5 and 1/255).

mod common;

use common::{cases, run_case};
use kiln_nn::reference::Reference;
use kiln_pipeline::{LoadOptions, StableDiffusionPipeline};

#[test]
fn pipelines_match_diffusers_within_two_levels() {
    let device = common::device();
    let reference = Reference::open(&common::fixtures().join("expected.safetensors")).unwrap();
    let mut failures = Vec::new();
    for kind in ["sd1", "sd2", "inpaint"] {
        let dir = common::model(kind);
        let pipe =
            StableDiffusionPipeline::from_pretrained(dir.path(), LoadOptions::default(), &device)
                .unwrap();
        for case in cases().iter().filter(|c| c.model == kind) {
            let (float_diff, byte_diff) = run_case(case, &pipe, &reference);
            eprintln!(
                "{}: max |float diff| {float_diff:.2e}, max 8-bit diff {byte_diff}",
                case.name
            );
            if byte_diff > 2 || float_diff > 5e-4 {
                failures.push(format!("{}: {float_diff:e} / {byte_diff}", case.name));
            }
        }
    }
    assert!(failures.is_empty(), "beyond tolerance: {failures:?}");
}
