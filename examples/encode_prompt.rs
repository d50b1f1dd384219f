//! Tokenize a prompt and encode it with a CLIP text encoder.
//!
//! ```sh
//! cargo run --release -p kiln-clip --example encode_prompt -- fixtures/clip/model-fullvocab "a photo of a cat"
//! ```
//! The model folder is a diffusers folder with `tokenizer/` and `text_encoder/`.

use kiln_clip::{ClipTextModel, ClipTokenizer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(model), Some(prompt)) = (args.next(), args.next()) else {
        eprintln!("usage: encode_prompt MODEL_DIR PROMPT");
        std::process::exit(2);
    };
    let device = kiln_nn::default_device()?;
    let tokenizer = ClipTokenizer::from_dir(&model)?;
    let encoder = ClipTextModel::from_dir(&model, &device)?;

    let ids = tokenizer.encode(&prompt)?;
    let n = ids
        .iter()
        .position(|&id| id == tokenizer.eos_id())
        .map_or(ids.len(), |p| p + 1);
    println!("tokens: {:?}", &tokenizer.tokens(&ids)[..n]);

    let out = encoder.encode_ids(&[ids], 0, &device)?;
    let [batch, seq, hidden] = out.hidden_state.dims();
    let mean: f32 = out.hidden_state.mean().into_scalar();
    println!("embedding: [{batch}, {seq}, {hidden}], mean {mean:.5}");
    Ok(())
}
