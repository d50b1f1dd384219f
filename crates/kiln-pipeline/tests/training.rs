//! The training step against diffusers' `train_text_to_image.py` computation
//! (`xtask/fixtures/training.py`): the loss and the gradients of the tiny SD 1.x (epsilon) and
//! SD 2.x (v-prediction, Min-SNR gamma 5) UNets, on burn's autodiff over flex.

mod common;

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param};

use burn::tensor::{DType, Device, Gradients, Tensor};
use kiln_nn::reference::{Reference, max_relative_error, tolerance};
use kiln_pipeline::training::DiffusionLoss;
use kiln_scheduler::SchedulerConfig;
use kiln_unet::UNet2DConditionModel;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    unet: String,
    prediction_type: String,
    snr_gamma: Option<f64>,
    checked: Vec<String>,
}

/// Every float parameter's gradient by its diffusers name (Linear weights transposed back to
/// PyTorch's `[out, in]`), and the sum of their squares.
struct GradCollector<'a> {
    grads: &'a Gradients,
    path: Vec<String>,
    found: BTreeMap<String, Tensor<4>>,
    sq_norm: f64,
    missing: usize,
}

impl ModuleVisitor for GradCollector<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(grad) = param.val().grad(self.grads) else {
            self.missing += 1;
            return;
        };
        self.sq_norm += grad.clone().powi_scalar(2).sum().into_scalar::<f64>();
        let name = kiln_nn::init::checkpoint_name(&self.path);
        let grad: Tensor<4> = match D {
            // burn's Linear weight is [in, out]
            2 => grad.transpose().unsqueeze(),
            _ => grad.unsqueeze(),
        };
        self.found.insert(name, grad);
    }
}

#[test]
fn loss_and_gradients_match_diffusers() {
    let device = Device::autodiff(common::device());
    let root = common::root().join("fixtures/training");
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(root.join("cases.json")).unwrap()).unwrap();
    let reference = Reference::open(&root.join("expected.safetensors")).unwrap();
    let inner = common::device();
    assert_eq!(cases.len(), 2);
    for case in &cases {
        let t = |name: &str| format!("{}.{name}", case.name);
        let unet = UNet2DConditionModel::from_pretrained(
            &common::fixtures().join(&case.unet).join("unet"),
            DType::F32,
            &device,
        )
        .unwrap();
        let config = SchedulerConfig::from_json(&format!(
            r#"{{"_class_name": "DDPMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "prediction_type": "{}"}}"#,
            case.prediction_type
        ))
        .unwrap();
        let objective = DiffusionLoss::new(&config, case.snr_gamma).unwrap();
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
        let expected_loss: f32 = reference
            .tensor::<1>(&t("loss"), &inner)
            .unwrap()
            .into_scalar();
        let got_loss: f32 = loss.clone().into_scalar();
        let loss_err = (got_loss - expected_loss).abs() / expected_loss.abs();
        eprintln!(
            "{}: loss {got_loss} vs {expected_loss} (relative {loss_err:.2e})",
            case.name
        );
        assert!(
            loss_err < 1e-5,
            "{}: loss {got_loss} vs {expected_loss}",
            case.name
        );

        let grads = loss.backward();
        let mut collector = GradCollector {
            grads: &grads,
            path: Vec::new(),
            found: BTreeMap::new(),
            sq_norm: 0.0,
            missing: 0,
        };
        unet.visit(&mut collector);
        assert_eq!(
            collector.missing, 0,
            "{}: parameters without gradient",
            case.name
        );
        let expected_norm: f32 = reference
            .tensor::<1>(&t("grad_sq_norm"), &inner)
            .unwrap()
            .into_scalar();
        let norm_err = (collector.sq_norm as f32 - expected_norm).abs() / expected_norm;
        eprintln!(
            "{}: gradient sum of squares {:.6e} vs {expected_norm:.6e} (relative {norm_err:.2e})",
            case.name, collector.sq_norm
        );
        // bounds: [`tolerance::GRADIENT`] derives them for any CPU and thread count
        assert!(
            norm_err < tolerance::GRADIENT,
            "{}: gradient norm",
            case.name
        );
        for name in &case.checked {
            let expected: Tensor<4> =
                match reference.tensor::<4>(&t(&format!("grad.{name}")), &inner) {
                    Ok(g) => g,
                    Err(_) => reference
                        .tensor::<2>(&t(&format!("grad.{name}")), &inner)
                        .map(|g| g.unsqueeze())
                        .or_else(|_| {
                            reference
                                .tensor::<1>(&t(&format!("grad.{name}")), &inner)
                                .map(|g| g.unsqueeze())
                        })
                        .unwrap(),
                };
            let got = collector.found.get(name).unwrap_or_else(|| {
                let some: Vec<&String> = collector.found.keys().take(8).collect();
                panic!(
                    "{}: no gradient named {name}; have e.g. {some:?}",
                    case.name
                )
            });
            let err = max_relative_error(got, &expected);
            eprintln!("{}: grad {name}: relative error {err:.2e}", case.name);
            assert!(
                err < tolerance::GRADIENT,
                "{}: grad {name}: {err}",
                case.name
            );
        }
    }
}
