//! Bad input gives a typed error naming what is wrong, never a panic.

mod common;

use std::path::Path;

use common::{device, fixtures};
use kiln_clip::{ClipTextConfig, ClipTextModel, ClipTokenizer, Error};
use safetensors::tensor::{Dtype, TensorView};

fn copy_te(to: &Path) {
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("te-sd1").join(name), to.join(name)).unwrap();
    }
}

/// Rewrites `model.safetensors` in `dir` through `edit`, which sees `(name, shape, f32 values)`.
fn rewrite_weights(dir: &Path, edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, view.shape().to_vec(), values)
        })
        .collect();
    edit(&mut tensors);
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, TensorView)> = raw
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn load(dir: &Path) -> Error {
    ClipTextModel::from_dir(dir, &device()).unwrap_err()
}

#[test]
fn missing_folder() {
    let err = load(Path::new("/no/such/model")).to_string();
    assert!(
        err.contains("/no/such/model") && err.contains("not found"),
        "{err}"
    );
    let err = ClipTokenizer::from_dir("/no/such/model")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let err = load(dir.path()).to_string();
    assert!(err.contains("config.json"), "{err}");
    std::fs::copy(
        fixtures().join("te-sd1/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = load(dir.path()).to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("vocab.json"), "{err}");
}

#[test]
fn unreadable_json() {
    let dir = tempfile::tempdir().unwrap();
    copy_te(dir.path());
    std::fs::write(dir.path().join("config.json"), "{ \"hidden_size\": 32,").unwrap();
    let err = load(dir.path());
    assert!(
        matches!(err, Error::Nn(kiln_nn::Error::Json { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn config_field_of_the_wrong_type() {
    let dir = tempfile::tempdir().unwrap();
    copy_te(dir.path());
    let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        text.replace("\"hidden_size\": 32", "\"hidden_size\": \"wide\""),
    )
    .unwrap();
    let err = load(dir.path()).to_string();
    assert!(
        err.contains("invalid type") && err.contains("wide"),
        "{err}"
    );

    std::fs::write(
        dir.path().join("config.json"),
        text.replace("\"quick_gelu\"", "\"swishy\""),
    )
    .unwrap();
    let err = load(dir.path()).to_string();
    assert!(err.contains("swishy"), "{err}");
}

#[test]
fn config_values_that_cannot_describe_a_model() {
    let dir = tempfile::tempdir().unwrap();
    copy_te(dir.path());
    let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        text.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 5"),
    )
    .unwrap();
    let err = ClipTextConfig::from_file(&dir.path().join("config.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("num_attention_heads"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    copy_te(dir.path());
    rewrite_weights(dir.path(), |t| {
        t.retain(|(n, _, _)| n != "encoder.layers.1.mlp.fc2.bias")
    });
    let err = load(dir.path());
    assert!(
        matches!(err, Error::Nn(kiln_nn::Error::MissingTensor { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("encoder.layers.1.mlp.fc2.bias"),
        "{err}"
    );
}

#[test]
fn misshaped_tensor_names_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    copy_te(dir.path());
    rewrite_weights(dir.path(), |t| {
        for (name, shape, values) in t.iter_mut() {
            if name == "encoder.layers.0.mlp.fc1.weight" {
                *shape = vec![36, 32];
                values.truncate(36 * 32);
            }
        }
    });
    let err = load(dir.path()).to_string();
    assert!(err.contains("encoder.layers.0.mlp.fc1.weight"), "{err}");
    assert!(
        err.contains("[36, 32]") && err.contains("[37, 32]"),
        "{err}"
    );

    // A misshaped norm weight (not transposed by the adapter) is reported the same way.
    copy_te(dir.path());
    rewrite_weights(dir.path(), |t| {
        for (name, shape, values) in t.iter_mut() {
            if name == "final_layer_norm.weight" {
                *shape = vec![31];
                values.truncate(31);
            }
        }
    });
    let err = load(dir.path()).to_string();
    assert!(
        err.contains("final_layer_norm.weight") && err.contains("[31]") && err.contains("[32]"),
        "{err}"
    );
}

#[test]
fn extra_tensor_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    copy_te(dir.path());
    rewrite_weights(dir.path(), |t| {
        t.push((
            "encoder.layers.9.mlp.fc1.bias".into(),
            vec![2],
            vec![0.0; 2],
        ))
    });
    let err = load(dir.path()).to_string();
    assert!(err.contains("encoder.layers.9.mlp.fc1.bias"), "{err}");
}

#[test]
fn not_a_safetensors_file() {
    let dir = tempfile::tempdir().unwrap();
    copy_te(dir.path());
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"PK\x03\x04 this is a zip, not safetensors",
    )
    .unwrap();
    let err = load(dir.path());
    assert!(
        matches!(err, Error::Nn(kiln_nn::Error::NotSafetensors { .. })),
        "{err:?}"
    );
    std::fs::write(dir.path().join("model.safetensors"), b"abc").unwrap();
    assert!(matches!(
        load(dir.path()),
        Error::Nn(kiln_nn::Error::NotSafetensors { .. })
    ));
}

#[test]
fn bad_ids_and_clip_skip_are_errors() {
    let device = device();
    let model = ClipTextModel::from_dir(fixtures().join("te-sd1"), &device).unwrap();
    let err = model
        .encode_ids(&[vec![5000; 77]], 0, &device)
        .unwrap_err()
        .to_string();
    assert!(err.contains("5000") && err.contains("vocabulary"), "{err}");
    let err = model
        .encode_ids(&[vec![1; 78]], 0, &device)
        .unwrap_err()
        .to_string();
    assert!(err.contains("78"), "{err}");
    let err = model
        .encode_ids(&[vec![1; 77]], 3, &device)
        .unwrap_err()
        .to_string();
    assert!(err.contains("clip_skip"), "{err}");
    assert!(
        model
            .encode_ids(&[vec![1; 77], vec![1; 76]], 0, &device)
            .is_err()
    );
}

#[test]
fn tokenizer_with_broken_special_tokens() {
    let dir = common::classic_tokenizer("sd1");
    std::fs::write(
        dir.path().join("special_tokens_map.json"),
        r#"{"pad_token": 7}"#,
    )
    .unwrap();
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("pad_token"), "{err}");
}
