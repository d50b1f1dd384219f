//! Textual-inversion embeddings against diffusers' `load_textual_inversion` on the tiny SD 1.x
//! pipeline (`fixtures/textual-inversion/`, `xtask/fixtures/textual_inversion.py`): diffusers'
//! layout and the A1111 web UI's, one vector and several, in the prompt and the negative prompt.

mod common;

use std::path::PathBuf;

use burn::tensor::{Tensor, TensorData};
use kiln_nn::reference::{Reference, tolerance};
use kiln_pipeline::{GenerateOptions, LoadOptions, PromptSyntax, StableDiffusionPipeline};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    prompt: String,
    negative: String,
    height: usize,
    width: usize,
    steps: usize,
    guidance: f64,
}

fn dir() -> PathBuf {
    common::root().join("fixtures/textual-inversion")
}

fn generate(
    pipe: &StableDiffusionPipeline,
    case: &Case,
    latents: Tensor<4>,
    syntax: PromptSyntax,
) -> Tensor<4> {
    let options = GenerateOptions::new(&case.prompt)
        .with_negative_prompt(&case.negative)
        .with_steps(case.steps)
        .with_guidance_scale(case.guidance)
        .with_size(case.width, case.height)
        .with_prompt_syntax(syntax)
        .with_latents(latents);
    common::ddim(pipe, &options)
}

#[test]
fn embeddings_match_diffusers() {
    let device = common::device();
    let reference = Reference::open(&dir().join("expected.safetensors")).unwrap();
    let case: Case =
        serde_json::from_str(&std::fs::read_to_string(dir().join("case.json")).unwrap()).unwrap();
    let latents = || reference.tensor::<4>("latents", &device).unwrap();
    let diff =
        |a: &Tensor<4>, b: &Tensor<4>| -> f32 { (a.clone() - b.clone()).abs().max().into_scalar() };
    let mut last = None;
    for kind in ["sd1", "sd2"] {
        let model = common::model(kind);
        let mut pipe =
            StableDiffusionPipeline::from_pretrained(model.path(), LoadOptions::default(), &device)
                .unwrap();
        let none: Tensor<4> = reference
            .tensor(&format!("{kind}.none.image"), &device)
            .unwrap();
        let before = generate(&pipe, &case, latents(), PromptSyntax::Plain);
        assert!(diff(&before, &none) <= tolerance::IMAGE, "{kind}");

        let cat = pipe
            .load_textual_inversion(&dir().join("learned_embeds.safetensors"), None)
            .unwrap();
        assert_eq!(cat, "<cat-toy>", "diffusers' key names the token");
        let style = pipe
            .load_textual_inversion(&dir().join("style2.safetensors"), None)
            .unwrap();
        assert_eq!(style, "style2", "the file name names an A1111 embedding");
        let ids = pipe.tokenizer.content_ids("style2").unwrap();
        assert_eq!(ids, [49409, 49410, 49411], "three vectors, three ids");

        let want: Tensor<4> = reference.tensor(&format!("{kind}.image"), &device).unwrap();
        assert!(
            diff(&want, &none) > 0.05,
            "{kind}: the embeddings change the image"
        );
        for syntax in [PromptSyntax::Plain, PromptSyntax::A1111] {
            let image = generate(&pipe, &case, latents(), syntax);
            let d = diff(&image, &want);
            eprintln!("{kind} {syntax:?}: max |float diff| {d:.2e}");
            assert!(d <= tolerance::IMAGE, "{kind} {syntax:?}: {d}");
        }
        last = Some((model, pipe));
    }
    let (_model, mut pipe) = last.unwrap();

    // a taken token, a width of another model, several tensors: refused with the file
    let err = pipe
        .load_textual_inversion(&dir().join("style2.safetensors"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("style2") && err.contains("already"), "{err}");
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, tensors: Vec<(&str, TensorData)>| {
        use safetensors::tensor::{Dtype, TensorView};
        let path = tmp.path().join(name);
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(k, d)| {
                (
                    k.to_string(),
                    TensorView::new(Dtype::F32, d.shape().to_vec(), d.as_bytes()).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &path).unwrap();
        path
    };
    let wide = write(
        "wide.safetensors",
        vec![(
            "emb_params",
            TensorData::new(vec![0.1f32; 2 * 768], [2, 768]),
        )],
    );
    let err = pipe
        .load_textual_inversion(&wide, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("wide.safetensors") && err.contains("768"),
        "{err}"
    );
    let two = write(
        "two.safetensors",
        vec![
            ("clip_l", TensorData::new(vec![0.1f32; 8], [1, 8])),
            ("clip_g", TensorData::new(vec![0.1f32; 8], [1, 8])),
        ],
    );
    let err = pipe
        .load_textual_inversion(&two, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("two.safetensors") && err.contains("SDXL"),
        "{err}"
    );
    let pickle = tmp.path().join("emb.pt");
    std::fs::write(&pickle, b"x").unwrap();
    let err = pipe
        .load_textual_inversion(&pickle, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("emb.pt") && err.contains("not a PyTorch checkpoint"),
        "{err}"
    );
}

/// The A1111 web UI's `.pt` embedding (legacy PyTorch format, with `string_to_token` beside
/// `string_to_param`) and diffusers' `learned_embeds.bin` (`xtask/fixtures/pickle_files.py`) read
/// as their safetensors twins: the same token and vectors.
#[test]
fn pickle_embeddings_read_as_their_safetensors_twins() {
    use kiln_clip::TextualInversion;
    let pickles = common::root().join("fixtures/pickle");
    for (pickle, twin) in [
        ("style2.pt", "style2.safetensors"),
        ("learned_embeds.bin", "learned_embeds.safetensors"),
    ] {
        let ours = TextualInversion::open(&pickles.join(pickle), None).unwrap();
        let theirs = TextualInversion::open(&dir().join(twin), None).unwrap();
        assert_eq!(ours.token, theirs.token, "{pickle}");
        assert_eq!(ours.vectors, theirs.vectors, "{pickle}");
        assert!(ours.vectors_2.is_none());
    }
}
