//! `WeightsFile`, `LazyTensor` and `load_tensors`: rows of a fused tensor and reshaped
//! tensors land in the right parameters, in burn's layout, and misuse is a typed error.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{DType, Device, Tensor, TensorData};
use kiln_nn::Error;
use kiln_nn::weights::{WeightsFile, load_tensors};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

#[derive(Module, Debug)]
struct Pair {
    q: Linear,
    k: Linear,
}

fn pair(device: &Device) -> Pair {
    let linear = || LinearConfig::new(2, 2).with_bias(false).init(device);
    Pair {
        q: linear(),
        k: linear(),
    }
}

/// `fused` [4, 2] f16 = 0..8 (PyTorch [out, in]: q rows 0-1, k rows 2-3), `conv` [2, 2, 1, 1]
/// f32 = 10..14, `ids` [3] i64.
fn file() -> (tempfile::NamedTempFile, WeightsFile) {
    let fused: Vec<u8> = (0..8)
        .flat_map(|v| half::f16::from_f32(v as f32).to_le_bytes())
        .collect();
    let conv: Vec<u8> = (10..14).flat_map(|v| (v as f32).to_le_bytes()).collect();
    let ids: Vec<u8> = (0..3i64).flat_map(|v| v.to_le_bytes()).collect();
    let tensors = [
        (
            "fused",
            TensorView::new(Dtype::F16, vec![4, 2], &fused).unwrap(),
        ),
        (
            "conv",
            TensorView::new(Dtype::F32, vec![2, 2, 1, 1], &conv).unwrap(),
        ),
        ("ids", TensorView::new(Dtype::I64, vec![3], &ids).unwrap()),
    ];
    let tmp = tempfile::Builder::new()
        .suffix(".safetensors")
        .tempfile()
        .unwrap();
    safetensors::serialize_to_file(tensors, None, tmp.path()).unwrap();
    let file = WeightsFile::open(tmp.path()).unwrap();
    (tmp, file)
}

fn values(p: &Param<Tensor<2>>) -> Vec<f32> {
    p.val()
        .to_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap()
}

#[test]
fn narrowed_and_reshaped_tensors_load_transposed_and_cast() {
    let (_tmp, file) = file();
    let device = Device::default();
    let fused = file.tensor("fused").unwrap();
    assert_eq!(fused.shape(), [4, 2]);
    let k = fused.clone().narrow(2, 2).unwrap();
    let conv = file.tensor("conv").unwrap().reshape(vec![2, 2]).unwrap();
    let loaded = load_tensors(
        pair(&device),
        vec![("q.weight".into(), conv), ("k.weight".into(), k)],
        DType::F32,
        file.path(),
    )
    .unwrap();
    // burn's Linear keeps [in, out]: the transpose of PyTorch's rows
    assert_eq!(values(&loaded.k.weight), [4.0, 6.0, 5.0, 7.0]);
    assert_eq!(values(&loaded.q.weight), [10.0, 12.0, 11.0, 13.0]);
    assert_eq!(loaded.k.weight.val().dtype(), DType::F32);
    let rows = fused.narrow(1, 2).unwrap().read().unwrap();
    assert_eq!(rows.shape().to_vec(), [2, 2]);
    let expected = TensorData::new(vec![2.0f32, 3.0, 4.0, 5.0], [2, 2]);
    assert_eq!(rows.convert::<f32>(), expected);
}

#[test]
fn misuse_is_a_typed_error() {
    let (_tmp, file) = file();
    let device = Device::default();
    let fused = file.tensor("fused").unwrap();
    assert!(matches!(
        fused.clone().narrow(3, 2),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        fused.clone().reshape(vec![3, 3]),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        file.tensor("nope"),
        Err(Error::MissingTensor { .. })
    ));

    let q = fused.clone().narrow(0, 2).unwrap();
    let err = load_tensors(
        pair(&device),
        vec![("q.weight".into(), q)],
        DType::F32,
        file.path(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::MissingTensor { name, .. } if name == "k.weight"),
        "{err}"
    );

    let q = fused.clone().narrow(0, 2).unwrap();
    let err = load_tensors(
        pair(&device),
        vec![("q.weight".into(), q.clone()), ("q.weight".into(), q)],
        DType::F32,
        file.path(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("both map to `q.weight`"), "{err}");

    let err = load_tensors(
        pair(&device),
        vec![
            ("q.weight".into(), fused.clone()),
            ("k.weight".into(), fused.clone().narrow(0, 2).unwrap()),
        ],
        DType::F32,
        file.path(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { name, expected, found, .. }
            if name == "fused" && expected == &[2, 2] && found == &[4, 2]),
        "{err}"
    );

    let ids = file.tensor("ids").unwrap();
    let err = load_tensors(
        pair(&device),
        vec![("q.weight".into(), ids)],
        DType::F32,
        file.path(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::UnsupportedDType { .. }), "{err}");
}

/// A transposed tensor reads as the transpose (a non-square one, in f16, f32 kept apart), and
/// can be neither transposed twice nor narrowed or reshaped after it.
#[test]
fn transposed_tensors_read_transposed() {
    let (_tmp, file) = file();
    // fused [4, 2] = [[0, 1], [2, 3], [4, 5], [6, 7]]
    let t = file.tensor("fused").unwrap().transpose().unwrap();
    assert_eq!(t.shape(), [2, 4]);
    let expected = TensorData::new(vec![0.0f32, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0], [2, 4]);
    assert_eq!(t.read().unwrap().convert::<f32>(), expected);
    let conv = file.tensor("conv").unwrap().reshape(vec![2, 2]).unwrap();
    let square = conv.transpose().unwrap().read().unwrap();
    assert_eq!(
        square.convert::<f32>(),
        TensorData::new(vec![10.0f32, 12.0, 11.0, 13.0], [2, 2])
    );
    for err in [
        t.clone().transpose().map(|_| ()),
        t.clone().narrow(0, 1).map(|_| ()),
        t.clone().reshape(vec![8]).map(|_| ()),
        file.tensor("ids").unwrap().transpose().map(|_| ()),
    ] {
        assert!(matches!(err, Err(Error::InvalidInput(_))), "{err:?}");
    }
}

/// A sharded checkpoint (`*.safetensors.index.json` and its shards, as diffusers writes models
/// above 10 GB) loads as one file through `find_weights` and `load_safetensors`; an index that
/// misplaces a tensor is a typed error.
#[test]
fn sharded_checkpoints_load_as_one_file() {
    use kiln_nn::weights::{LoadOptions, find_weights, load_safetensors};
    let dir = tempfile::tempdir().unwrap();
    let q: Vec<u8> = (0..4).flat_map(|v| (v as f32).to_le_bytes()).collect();
    let k: Vec<u8> = (4..8).flat_map(|v| (v as f32).to_le_bytes()).collect();
    for (shard, name, bytes) in [
        ("m-00001-of-00002.safetensors", "q.weight", &q),
        ("m-00002-of-00002.safetensors", "k.weight", &k),
    ] {
        let view = TensorView::new(Dtype::F32, vec![2, 2], bytes).unwrap();
        safetensors::serialize_to_file([(name, view)], None, &dir.path().join(shard)).unwrap();
    }
    let index = |k_shard: &str| {
        format!(
            r#"{{"metadata": {{}}, "weight_map": {{"q.weight": "m-00001-of-00002.safetensors", "k.weight": "{k_shard}"}}}}"#
        )
    };
    std::fs::write(
        dir.path().join("m.safetensors.index.json"),
        index("m-00002-of-00002.safetensors"),
    )
    .unwrap();
    let path = find_weights(dir.path(), &["m.safetensors"], "weights").unwrap();
    assert!(path.ends_with("m.safetensors.index.json"));
    let device = Device::default();
    let loaded = load_safetensors(pair(&device), &path, &LoadOptions::default()).unwrap();
    assert_eq!(values(&loaded.q.weight), [0.0, 2.0, 1.0, 3.0]);
    assert_eq!(values(&loaded.k.weight), [4.0, 6.0, 5.0, 7.0]);

    std::fs::write(&path, index("m-00001-of-00002.safetensors")).unwrap();
    let err = load_safetensors(pair(&device), &path, &LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("does not hold"), "{err}");
}

/// A PyTorch pickle checkpoint (`fixtures/pickle/sd1.ckpt`: `sd1.safetensors` under Lightning's
/// `state_dict`, with optimizer state beside it) lists the same tensors as its safetensors twin,
/// with the same dtypes, shapes and bytes, whole or narrowed to rows; what lies outside
/// `state_dict` is left out.
#[test]
fn pickle_checkpoints_read_as_their_safetensors_twins() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let pickle = WeightsFile::open(&root.join("fixtures/pickle/sd1.ckpt")).unwrap();
    let twin = WeightsFile::open(&root.join("fixtures/single-file/sd1.safetensors")).unwrap();
    assert!(pickle.is_pickle() && !twin.is_pickle());
    let names = |f: &WeightsFile| {
        f.tensors()
            .map(|(n, i)| (n.to_string(), i.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&pickle), names(&twin));
    assert!(pickle.tensors().count() > 300);
    for (name, info) in twin.tensors() {
        assert_eq!(
            kiln_nn::weights::read_header(pickle.path()).unwrap()[name],
            *info
        );
        let (ours, theirs) = (pickle.tensor(name), twin.tensor(name));
        let (Ok(ours), Ok(theirs)) = (ours, theirs) else {
            // dtypes Kiln does not read (the I32 EMA counter) fail alike
            assert!(
                pickle.tensor(name).is_err() && twin.tensor(name).is_err(),
                "{name}"
            );
            continue;
        };
        assert_eq!(ours.read().unwrap(), theirs.read().unwrap(), "{name}");
        let rows = ours.shape().first().copied().unwrap_or(0);
        if rows >= 3 {
            let (a, b) = (ours.narrow(1, 2).unwrap(), theirs.narrow(1, 2).unwrap());
            assert_eq!(a.read().unwrap(), b.read().unwrap(), "{name} rows 1..3");
        }
    }
}

/// A file that is not a checkpoint is one typed error naming it, whatever its extension; one
/// with no extension is told apart by its first bytes.
#[test]
fn unreadable_pickles_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["model.ckpt", "emb.pt", "pytorch_model.bin"] {
        let path = dir.path().join(name);
        std::fs::write(&path, b"\x80\x02not a pickle at all").unwrap();
        match WeightsFile::open(&path) {
            Err(Error::NotPytorch { path: p, .. }) => assert_eq!(p, path),
            other => panic!("{name}: {other:?}"),
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bare = dir.path().join("weights");
    std::fs::copy(root.join("fixtures/pickle/learned_embeds.bin"), &bare).unwrap();
    assert!(WeightsFile::open(&bare).unwrap().is_pickle());
    std::fs::copy(
        root.join("fixtures/textual-inversion/learned_embeds.safetensors"),
        &bare,
    )
    .unwrap();
    assert!(!WeightsFile::open(&bare).unwrap().is_pickle());
}
