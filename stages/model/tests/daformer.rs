//! The MiT encoder and DAFormer decoder against an independent PyTorch implementation, and
//! SegFormer's ImageNet checkpoints as PyTorch writes them. The fixtures under
//! `tests/fixtures/daformer` were written by `tests/daformer_reference.py` (see its docstring
//! for how to regenerate them; CI has no PyTorch).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};
use dag_model::daformer::{AsppBranch, FuseLayer};
use dag_model::{
    load_daformer_weights, load_mit_weights, load_model, save_model, Architecture, DaFormer,
    DaFormerConfig, Fusion, MitConfig, ModelError, Noise, Segmenter,
};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/daformer")
}

/// The tensors the reference wrote, by name, as (shape, values).
fn read_tensors(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let meta: BTreeMap<String, Vec<usize>> =
        serde_json::from_slice(&std::fs::read(dir.join("tensors.json")).unwrap()).unwrap();
    meta.into_iter()
        .map(|(name, shape)| {
            let bytes = std::fs::read(dir.join(format!("{name}.bin"))).unwrap();
            let values: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(values.len(), shape.iter().product::<usize>(), "{name}");
            (name, (shape, values))
        })
        .collect()
}

fn tensor<const D: usize>((shape, values): &(Vec<usize>, Vec<f32>), device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values.clone(), shape.clone()), device)
}

/// `max |ours - reference|` must stay within `tol` times the reference's largest magnitude
/// (at least 1).
fn assert_close(what: &str, ours: Tensor<4>, reference: &(Vec<usize>, Vec<f32>), tol: f32) {
    assert_eq!(ours.dims().to_vec(), reference.0, "{what}: shape");
    let ours: Vec<f32> = ours.into_data().try_to_vec::<f32>().unwrap();
    assert_values(what, &ours, &reference.1, tol);
}

fn assert_values(what: &str, ours: &[f32], reference: &[f32], tol: f32) {
    assert_eq!(ours.len(), reference.len(), "{what}: length");
    let scale = reference.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let worst = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= tol * scale,
        "{what}: max difference {worst} exceeds {tol} x {scale}"
    );
}

fn tiny_daformer(fusion: Fusion) -> DaFormerConfig {
    let mut encoder = MitConfig::variant(0).unwrap();
    encoder.drop_path = 0.0;
    DaFormerConfig {
        embed_dim: 64,
        channels: 48,
        fusion,
        dropout: 0.0,
        ..DaFormerConfig::new(encoder, 7)
    }
}

/// The gradient of a parameter, in PyTorch's layout (Linear weights are `[in, out]` in Burn).
fn grad_of(model: &DaFormer, name: &str, grads: &burn::tensor::Gradients) -> Option<Vec<f32>> {
    let b = &model.backbone.stages;
    let head = &model.decode_head;
    let linear = |l: &burn::nn::Linear| l.weight.val().grad(grads).map(|g| g.transpose());
    let param = |p: &Param<Tensor<4>>| p.val().grad(grads);
    let param1 = |p: &Param<Tensor<1>>| p.val().grad(grads);
    let bias = |l: &burn::nn::Linear| param1(l.bias.as_ref().unwrap());
    let flat2 = |t: Option<Tensor<2>>| t.map(|t| t.into_data().try_to_vec::<f32>().unwrap());
    let flat4 = |t: Option<Tensor<4>>| t.map(|t| t.into_data().try_to_vec::<f32>().unwrap());
    let flat1 = |t: Option<Tensor<1>>| t.map(|t| t.into_data().try_to_vec::<f32>().unwrap());
    let aspp = |i: usize| match &head.fuse_layer {
        FuseLayer::SepAspp(a) => &a.aspp_modules[i],
        FuseLayer::Conv(_) => panic!("no ASPP"),
    };
    Some(
        match name {
            "backbone.patch_embed1.proj.weight" => flat4(param(&b[0].patch_embed.proj.weight)),
            "backbone.patch_embed2.norm.weight" => flat1(param1(&b[1].patch_embed.norm.gamma)),
            "backbone.block1.0.attn.q.weight" => flat2(linear(&b[0].blocks[0].attn.q)),
            "backbone.block1.1.attn.sr.bias" => flat1(param1(
                b[0].blocks[1]
                    .attn
                    .sr
                    .as_ref()
                    .unwrap()
                    .bias
                    .as_ref()
                    .unwrap(),
            )),
            "backbone.block1.1.attn.norm.bias" => flat1(param1(
                b[0].blocks[1]
                    .attn
                    .norm
                    .as_ref()
                    .unwrap()
                    .beta
                    .as_ref()
                    .unwrap(),
            )),
            "backbone.block2.0.attn.kv.bias" => flat1(bias(&b[1].blocks[0].attn.kv)),
            "backbone.block3.1.mlp.dwconv.dwconv.weight" => {
                flat4(param(&b[2].blocks[1].mlp.dwconv.weight))
            }
            "backbone.block4.1.mlp.fc2.bias" => flat1(bias(&b[3].blocks[1].mlp.fc2)),
            "backbone.norm4.weight" => flat1(param1(&b[3].norm.gamma)),
            "decode_head.embed_layers.0.proj.weight" => flat2(linear(&head.embed_layers[0])),
            "decode_head.conv_seg.weight" => flat4(param(&head.conv_seg.weight)),
            "decode_head.fuse_layer.aspp_modules.0.bn.weight" => match aspp(0) {
                AsppBranch::Pointwise(c) => flat1(param1(&c.bn.gamma)),
                AsppBranch::Separable(_) => panic!("branch 0 is pointwise"),
            },
            "decode_head.fuse_layer.aspp_modules.2.depthwise_conv.conv.weight" => match aspp(2) {
                AsppBranch::Separable(s) => flat4(param(&s.depthwise_conv.conv.weight)),
                AsppBranch::Pointwise(_) => panic!("branch 2 is separable"),
            },
            "decode_head.fuse_layer.aspp_modules.3.pointwise_conv.bn.weight" => match aspp(3) {
                AsppBranch::Separable(s) => flat1(param1(&s.pointwise_conv.bn.gamma)),
                AsppBranch::Pointwise(_) => panic!("branch 3 is separable"),
            },
            "decode_head.fuse_layer.bottleneck.bn.bias" => match &head.fuse_layer {
                FuseLayer::SepAspp(a) => flat1(param1(&a.bottleneck.bn.beta)),
                FuseLayer::Conv(_) => panic!("no ASPP"),
            },
            "decode_head.fuse_layer.conv.weight" => match &head.fuse_layer {
                FuseLayer::Conv(c) => flat4(param(&c.conv.weight)),
                FuseLayer::SepAspp(_) => panic!("no 1x1 fusion"),
            },
            "decode_head.fuse_layer.bn.weight" => match &head.fuse_layer {
                FuseLayer::Conv(c) => flat1(param1(&c.bn.gamma)),
                FuseLayer::SepAspp(_) => panic!("no 1x1 fusion"),
            },
            _ => return None,
        }
        .unwrap_or_else(|| panic!("{name} received no gradient")),
    )
}

/// Inference and training-mode logits and gradients of the Burn network equal PyTorch's on
/// the same weights and input.
fn check_parity(fusion: Fusion, fusion_name: &str) {
    let dir = fixtures().join(format!("parity_{fusion_name}"));
    let expected = read_tensors(&dir);
    let weights = dir.join("model.pth");
    let config = tiny_daformer(fusion);

    // Inference: BatchNorm on running statistics.
    let device = Device::flex();
    let (model, report) = load_daformer_weights(config.init(&device).unwrap(), &weights).unwrap();
    assert!(report.missing.is_empty(), "{:?}", report.missing);
    assert!(
        report
            .unused
            .iter()
            .all(|k| k.ends_with("num_batches_tracked")),
        "unused: {:?}",
        report.unused
    );
    let input: Tensor<4> = tensor(&expected["input"], &device);
    assert_close(
        "eval logits",
        model.forward(input),
        &expected["eval_logits"],
        1e-4,
    );

    // Training: batch statistics, and gradients of sum(weights * logits).
    let device = Device::flex().autodiff();
    let (model, _) = load_daformer_weights(config.init(&device).unwrap(), &weights).unwrap();
    let input: Tensor<4> = tensor(&expected["input"], &device);
    let logits = model.forward(input);
    let loss_weights: Tensor<4> = tensor(&expected["loss_weights"], &device);
    let grads = (logits.clone() * loss_weights).sum().backward();
    assert_close(
        "train logits",
        logits.inner(),
        &expected["train_logits"],
        1e-4,
    );
    let mut compared = 0;
    for (name, reference) in &expected {
        let Some(param) = name.strip_prefix("grad_") else {
            continue;
        };
        let ours = grad_of(&model, param, &grads)
            .unwrap_or_else(|| panic!("the test does not know {param}"));
        assert_values(name, &ours, &reference.1, 1e-4);
        compared += 1;
    }
    assert!(compared >= 13, "only {compared} gradients compared");
}

#[test]
fn daformer_sep_aspp_matches_pytorch() {
    check_parity(Fusion::daformer(), "sep_aspp");
}

#[test]
fn segformer_style_conv1x1_decoder_matches_pytorch() {
    check_parity(Fusion::Conv1x1, "conv1x1");
}

/// SegFormer's `mit_b0.pth` and `mit_b5.pth` as PyTorch writes them load with no missing and
/// no unused encoder tensor; the ImageNet classifier is the only unused key, and values land
/// where they belong (Linear weights transposed).
#[test]
fn segformer_imagenet_checkpoints_load_completely() {
    for variant in [0, 5] {
        let keys: Vec<String> = serde_json::from_slice(
            &std::fs::read(fixtures().join(format!("mit_b{variant}.keys.json"))).unwrap(),
        )
        .unwrap();
        let index = |key: &str| keys.iter().position(|k| k == key).unwrap() as f32;
        let path = fixtures().join(format!("mit_b{variant}.pth"));
        let device = Device::flex();
        let config = MitConfig::from_name(&format!("mit_b{variant}")).unwrap();
        assert_eq!(config.variant_name(), Some(format!("mit_b{variant}")));
        let (encoder, report) =
            load_mit_weights(config.init(&device).unwrap(), &path, false).unwrap();
        assert!(
            report.missing.is_empty(),
            "mit_b{variant}: {:?}",
            report.missing
        );
        assert_eq!(
            report.unused,
            vec!["head.bias".to_string(), "head.weight".to_string()],
            "mit_b{variant}"
        );
        assert_eq!(report.applied.len(), keys.len() - 2, "mit_b{variant}");

        let value = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap()[0];
        let last = encoder.stages[3].blocks.last().unwrap();
        let s = config.depths[2] - 1;
        assert_eq!(
            value(encoder.stages[2].blocks[s].mlp.fc2.weight.val()),
            index(&format!("block3.{s}.mlp.fc2.weight"))
        );
        assert_eq!(
            value(last.attn.kv.weight.val()),
            index(&format!("block4.{}.attn.kv.weight", config.depths[3] - 1))
        );
        let dw: Vec<f32> = encoder.stages[1].blocks[0]
            .mlp
            .dwconv
            .weight
            .val()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(dw[0], index("block2.0.mlp.dwconv.dwconv.weight"));
        let norm: Vec<f32> = encoder.stages[3]
            .norm
            .gamma
            .val()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(norm[0], index("norm4.weight"));

        // The wrong variant is refused with the file's name.
        if variant == 0 {
            let b1 = MitConfig::variant(1).unwrap().init(&device).unwrap();
            match load_mit_weights(b1, &path, false) {
                Err(ModelError::Weights { path: p, .. }) => assert_eq!(p, path),
                other => panic!("B0 weights in a B1 encoder: {other:?}"),
            }
        }
    }
}

#[test]
fn variants_and_shapes() {
    let device = Device::flex();
    for (v, blocks) in [(0, 8), (1, 8), (2, 16), (3, 28), (4, 41), (5, 52)] {
        let c = MitConfig::variant(v).unwrap();
        assert_eq!(c.depths.iter().sum::<usize>(), blocks, "B{v}");
    }
    assert!(MitConfig::variant(6).is_err());
    assert!(MitConfig::from_name("mit_b9").is_err());
    let model = tiny_daformer(Fusion::daformer()).init(&device).unwrap();
    for (h, w) in [(32, 64), (50, 70)] {
        let x = Tensor::<4>::zeros([1, 3, h, w], &device);
        let (logits, features) = model.forward_with_features(x, &mut Noise::none());
        let down = |x: usize, times: usize| (0..times).fold(x.div_ceil(4), |x, _| x.div_ceil(2));
        assert_eq!(logits.dims(), [1, 7, down(h, 0), down(w, 0)]);
        assert_eq!(features.dims(), [1, 256, down(h, 3), down(w, 3)]);
    }
}

/// A narrow DAFormer as the synthetic benchmark trains it: widths stay multiples of the heads.
fn narrow() -> DaFormerConfig {
    DaFormerConfig::new(MitConfig::variant(0).unwrap().with_width(0.25), 5).with_width(0.25)
}

#[test]
fn width_scales_encoder_and_decoder() {
    let c = narrow();
    assert_eq!(c.encoder.embed_dims, [8, 16, 40, 64]);
    assert_eq!((c.embed_dim, c.channels), (64, 64));
    let thin = MitConfig::variant(5).unwrap().with_width(0.01);
    assert_eq!(
        thin.embed_dims,
        [1, 2, 5, 8],
        "one channel per head at least"
    );
    thin.validate().unwrap();
}

/// Dropout and stochastic depth draw only from the caller's generator: the same seed gives the
/// same logits, another seed others, and no generator keeps every unit, also on the training
/// device (teachers).
#[test]
fn stochastic_layers_follow_the_given_generator() {
    let device = Device::flex().autodiff();
    let mut config = narrow();
    config.encoder.drop_path = 0.5;
    config.dropout = 0.5;
    let model = Segmenter::from(config.init(&device).unwrap());
    let x = Tensor::<4>::random([2, 3, 32, 32], burn::tensor::Distribution::Default, &device);
    let run = |seed: Option<u64>| -> Vec<f32> {
        let logits = match seed {
            Some(seed) => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                model.forward(x.clone(), &mut Noise::from_rng(&mut rng))
            }
            None => model.forward(x.clone(), &mut Noise::none()),
        };
        logits.main.into_data().try_to_vec::<f32>().unwrap()
    };
    assert_eq!(run(Some(1)), run(Some(1)));
    assert_ne!(run(Some(1)), run(Some(2)));
    let plain = run(None);
    assert_ne!(run(Some(1)), plain);
    // Without a generator every unit is kept: the same weights with both rates at 0 give the
    // same logits, whatever generator they are handed.
    let mut deterministic = config.clone();
    deterministic.encoder.drop_path = 0.0;
    deterministic.dropout = 0.0;
    let Segmenter::DaFormer(stochastic) = model else {
        unreachable!()
    };
    let kept = deterministic
        .init(&device)
        .unwrap()
        .load_record(stochastic.into_record());
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let kept = Segmenter::from(kept)
        .forward(x, &mut Noise::from_rng(&mut rng))
        .main
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    assert_eq!(kept, plain);
}

/// A DAFormer saved as a model artifact comes back as the same network.
#[test]
fn daformer_artifact_round_trip() {
    let device = Device::flex();
    let config = narrow();
    let model = Segmenter::from(config.init(&device).unwrap());
    assert!(!model.has_aux());
    let x = Tensor::<4>::random([1, 3, 32, 48], burn::tensor::Distribution::Default, &device);
    let expected = model.predict_probs(x.clone(), [32, 48]).into_data();
    let dir = tempfile::tempdir().unwrap();
    save_model(model, serde_json::json!({}), dir.path()).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("model.json")).unwrap()).unwrap();
    assert_eq!(json["architecture"], "daformer", "{json}");
    let (loaded, desc) = load_model(dir.path(), &device).unwrap();
    assert_eq!(desc.arch, Architecture::DaFormer(config));
    loaded
        .predict_probs(x, [32, 48])
        .into_data()
        .assert_eq(&expected, true);
    // An architecture this build does not know is named in the error.
    let mut unknown = json.clone();
    unknown["architecture"] = "hrnet".into();
    std::fs::write(dir.path().join("model.json"), unknown.to_string()).unwrap();
    let err = load_model(dir.path(), &device).unwrap_err().to_string();
    assert!(err.contains("hrnet") && err.contains("daformer"), "{err}");
}
