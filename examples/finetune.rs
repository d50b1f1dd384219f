//! Fine-tunes a diffusers folder's UNet on a folder of captioned images with `kiln-train`, then
//! writes the result as a new diffusers folder.
//!
//! ```text
//! cargo run --release -p kiln-train --example finetune -- MODEL_DIR DATA_DIR OUT_DIR [STEPS]
//! # e.g. on the bundled tiny model, with images + .txt captions in ./photos:
//! cargo run --release -p kiln-train --example finetune -- fixtures/pipeline/sd1 photos tuned 50
//! ```

use std::path::PathBuf;

use kiln_train::{ImageCaptionDataset, LrSchedule, TrainConfig, Trainer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, data, out] = [0, 1, 2].map(|i| args.get(i).map(PathBuf::from));
    let (Some(model), Some(data), Some(out)) = (model, data, out) else {
        return Err("usage: finetune MODEL_DIR DATA_DIR OUT_DIR [STEPS]".into());
    };
    let steps: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(100);

    let device = kiln_nn::default_device()?;
    let dataset = ImageCaptionDataset::from_dir(&data)?;
    let config = TrainConfig {
        learning_rate: 1e-5,
        lr_schedule: LrSchedule::Cosine,
        lr_warmup_steps: steps / 10,
        max_steps: steps,
        snr_gamma: Some(5.0),
        random_flip: true,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(&model, dataset, config, &device)?;
    let before = trainer.eval_loss(0)?;
    for _ in 0..steps {
        let loss = trainer.step()?;
        if trainer.steps() % 10 == 0 {
            println!(
                "step {}: loss {loss:.4}, lr {:.2e}",
                trainer.steps(),
                trainer.learning_rate()
            );
        }
    }
    println!(
        "validation loss {before:.4} -> {:.4}",
        trainer.eval_loss(0)?
    );
    trainer.save(&out)?;
    println!("wrote {}", out.display());
    Ok(())
}
