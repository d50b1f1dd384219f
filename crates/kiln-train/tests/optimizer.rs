//! One optimiser step of diffusers' fine-tuning script against PyTorch
//! (`xtask/fixtures/training.py`): the gradients' global norm, `clip_grad_norm_` to 1.0 and a
//! `torch.optim.AdamW` step (lr 1e-3, betas 0.9 / 0.999, eps 1e-8, weight decay 1e-2) give the
//! same parameters as Kiln's [`clip_grad_norm`] and [`adamw`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, Tensor};
use kiln_nn::reference::{Reference, max_relative_error};
use kiln_pipeline::training::DiffusionLoss;
use kiln_scheduler::SchedulerConfig;
use kiln_train::{TrainConfig, adamw, clip_grad_norm};
use kiln_unet::UNet2DConditionModel;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every float parameter by its diffusers name, as `[.., .., .., ..]` in PyTorch's layout.
#[derive(Default)]
struct Named {
    path: Vec<String>,
    values: BTreeMap<String, Tensor<4>>,
}

impl ModuleVisitor for Named {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        // enum variants (CamelCase) add no key segment; norms' gamma/beta are weight/bias
        let name = self
            .path
            .iter()
            .filter(|s| !s.starts_with(|c: char| c.is_ascii_uppercase()))
            .map(|s| match s.as_str() {
                "gamma" => "weight",
                "beta" => "bias",
                other => other,
            })
            .collect::<Vec<_>>()
            .join(".");
        let value = param.val();
        let value: Tensor<4> = match D {
            2 => value.transpose().unsqueeze(),
            _ => value.unsqueeze(),
        };
        self.values.insert(name, value);
    }
}

fn named(module: &UNet2DConditionModel) -> BTreeMap<String, Tensor<4>> {
    let mut v = Named::default();
    module.visit(&mut v);
    v.values
}

fn reference_4d(r: &Reference, name: &str, device: &Device) -> Tensor<4> {
    r.tensor::<4>(name, device)
        .or_else(|_| r.tensor::<2>(name, device).map(|t| t.unsqueeze()))
        .or_else(|_| r.tensor::<1>(name, device).map(|t| t.unsqueeze()))
        .unwrap()
}

#[test]
fn clipped_adamw_step_matches_pytorch() {
    let inner = kiln_nn::parse_device("flex").unwrap();
    let device = Device::autodiff(inner.clone());
    let dir = root().join("fixtures/training");
    let reference = Reference::open(&dir.join("expected.safetensors")).unwrap();
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let t = |k: &str| format!("{name}.{k}");
        let unet = UNet2DConditionModel::from_pretrained(
            &root()
                .join("fixtures/pipeline")
                .join(case["unet"].as_str().unwrap())
                .join("unet"),
            DType::F32,
            &device,
        )
        .unwrap();
        let config = SchedulerConfig::from_json(&format!(
            r#"{{"_class_name": "DDPMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "prediction_type": "{}"}}"#,
            case["prediction_type"].as_str().unwrap()
        ))
        .unwrap();
        let objective = DiffusionLoss::new(&config, case["snr_gamma"].as_f64()).unwrap();
        let timesteps: Vec<f64> = reference
            .tensor::<1>(&t("timesteps"), &inner)
            .unwrap()
            .into_data()
            .convert::<f64>()
            .try_to_vec::<f64>()
            .unwrap();
        let loss = objective
            .loss(
                &unet,
                reference.tensor(&t("latents"), &device).unwrap(),
                reference.tensor(&t("noise"), &device).unwrap(),
                &timesteps,
                reference
                    .tensor(&t("encoder_hidden_states"), &device)
                    .unwrap(),
            )
            .unwrap();
        let mut grads = GradientsParams::from_grads(loss.backward(), &unet);
        let norm = clip_grad_norm(&unet, &mut grads, 1.0);
        let expected_norm: f32 = reference
            .tensor::<1>(&t("grad_total_norm"), &inner)
            .unwrap()
            .into_scalar();
        let norm_err = (norm as f32 - expected_norm).abs() / expected_norm;
        eprintln!("{name}: gradient norm {norm:.6} vs {expected_norm:.6} ({norm_err:.1e})");
        assert!(
            norm > 1.0 && norm_err < 1e-5,
            "{name}: norm {norm} vs {expected_norm}"
        );

        let before = named(&unet);
        let config = TrainConfig::default();
        let unet = adamw(&config).step(1e-3, unet, grads);
        let values = named(&unet);
        for param in case["checked"].as_array().unwrap() {
            let param = param.as_str().unwrap();
            let expected = reference_4d(&reference, &t(&format!("after.{param}")), &inner);
            let host = |t: &Tensor<4>| Tensor::<4>::from_data(t.clone().into_data(), &inner);
            let (got, start) = (host(&values[param]), host(&before[param]));
            let err = max_relative_error(&got, &expected);
            // the update itself (about lr = 1e-3 per element), against PyTorch's
            let delta_err = max_relative_error(&(got - start.clone()), &(expected - start));
            eprintln!(
                "{name}: {param} after one step: relative error {err:.1e}, of the update {delta_err:.1e}"
            );
            assert!(
                err < 1e-5 && delta_err < 1e-3,
                "{name}: {param}: {err} / {delta_err}"
            );
        }
    }
}
