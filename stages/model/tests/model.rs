//! Shapes, frozen BatchNorm, artifacts and ImageNet loading of dag-model, on flex.

use std::path::PathBuf;

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor, TensorData, Tolerance};
use dag_model::{
    load_imagenet_backbone, load_model, output_size, save_model, Architecture, DeepLabV2Config,
    DiscriminatorConfig, ModelError, ResNetStyle, Segmenter,
};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"),
    )
    .join("tests/fixtures")
    .join(name)
}

/// The architecture of the `.pth` fixtures (see tests/fixtures/make_pth.py).
fn tiny(classes: usize) -> DeepLabV2Config {
    DeepLabV2Config {
        blocks: [1, 1, 2, 2],
        width: 0.0625,
        classes,
        classifier_dilations: dag_model::deeplab::CLASSIFIER_DILATIONS.to_vec(),
        input: dag_model::InputConvention::CaffeBgr,
        resnet: dag_model::ResNetStyle::Caffe,
    }
}

#[test]
fn heads_have_stride_8_and_the_class_count() {
    let device = Device::flex();
    let model = tiny(5).init(&device).unwrap();
    for (h, w) in [(64, 48), (37, 45), (33, 33)] {
        let x = Tensor::<4>::random([2, 3, h, w], Distribution::Normal(0.0, 1.0), &device);
        let (aux, main) = model.forward(x);
        let [oh, ow] = output_size([h, w]);
        assert_eq!(aux.dims(), [2, 5, oh, ow], "aux for {h}x{w}");
        assert_eq!(main.dims(), [2, 5, oh, ow], "main for {h}x{w}");
    }
    // PyTorch's sizes for the same stem (checked against backbone.json for 37x45 below).
    assert_eq!(output_size([64, 48]), [9, 7]);
    assert_eq!(output_size([512, 1024]), [65, 129]);
    assert_eq!(output_size([37, 45]), [5, 6]);
}

#[test]
fn head_channels_follow_width_and_depth() {
    let c = DeepLabV2Config::new(101, 19).unwrap();
    assert_eq!(c.blocks, [3, 4, 23, 3]);
    assert_eq!((c.aux_channels(), c.main_channels()), (1024, 2048));
    let small = DeepLabV2Config::new(26, 19).unwrap().with_width(0.25);
    assert_eq!((small.aux_channels(), small.main_channels()), (256, 512));
    assert!(matches!(
        DeepLabV2Config::new(34, 19),
        Err(ModelError::UnknownDepth(34))
    ));
    assert!(tiny(0).init(&Device::flex()).is_err());
}

#[test]
fn batchnorm_affine_is_frozen_but_statistics_update() {
    let device = Device::flex().autodiff();
    let model = tiny(3).init(&device).unwrap();
    let before = model.backbone.bn1.running_mean.value_sync().into_data();
    let x = Tensor::<4>::random([2, 3, 32, 32], Distribution::Normal(1.0, 2.0), &device);
    let (aux, main) = model.forward(x);
    let grads = (aux.sum() + main.sum()).backward();
    let bn = &model.backbone.layer1[0].bn2;
    assert!(
        bn.gamma.val().grad(&grads).is_none(),
        "gamma must be frozen"
    );
    assert!(bn.beta.val().grad(&grads).is_none(), "beta must be frozen");
    assert!(model.backbone.layer1[0]
        .conv2
        .weight
        .val()
        .grad(&grads)
        .is_some());
    assert!(model.layer6.conv2d_list[3]
        .weight
        .val()
        .grad(&grads)
        .is_some());
    let after = model.backbone.bn1.running_mean.value_sync().into_data();
    assert_ne!(before, after, "running statistics update in training");
}

#[test]
fn discriminator_outputs_a_patch_map() {
    let device = Device::flex();
    let d = DiscriminatorConfig::new(5)
        .with_ndf(8)
        .init(&mut ChaCha8Rng::seed_from_u64(3), &device)
        .unwrap();
    let x = Tensor::<4>::random([2, 5, 64, 96], Distribution::Default, &device);
    assert_eq!(d.forward(x).dims(), [2, 1, 2, 3]);
    assert_eq!(d.convs.len(), 5);
    assert_eq!(d.convs[3].weight.dims(), [64, 32, 4, 4]);
}

#[test]
fn artifact_round_trip_rebuilds_the_same_model() {
    let device = Device::flex();
    let config = tiny(4);
    let model = Segmenter::from(config.init(&device).unwrap());
    let x = Tensor::<4>::random([1, 3, 40, 40], Distribution::Normal(0.0, 1.0), &device);
    let expected = model.predict_probs(x.clone(), [40, 40]).into_data();
    let dir = tempfile::tempdir().unwrap();
    save_model(model, serde_json::json!({"iterations": 3}), dir.path()).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("model.json")).unwrap()).unwrap();
    assert_eq!(json["architecture"], "deeplabv2", "{json}");
    let (loaded, desc) = load_model(dir.path(), &device).unwrap();
    assert_eq!(desc.arch, Architecture::DeepLabV2(config));
    assert_eq!(desc.metadata["iterations"], 3);
    let got = loaded.predict_probs(x, [40, 40]).into_data();
    got.assert_eq(&expected, true);
    // A damaged description is reported with its path.
    std::fs::write(dir.path().join("model.json"), b"{").unwrap();
    let err = load_model(dir.path(), &device).unwrap_err().to_string();
    assert!(err.contains("model.json"), "{err}");
}

/// DACS's classifier sums two branches (dilations 6 and 12): the logits are the sum of those two
/// convs alone, the option survives the artifact, and a `model.json` without the field (every
/// model written before it) reads as ADVENT's four branches, which are not written out.
#[test]
fn the_two_branch_classifier_sums_its_two_convs_and_round_trips() {
    let device = Device::flex();
    let config = tiny(4).with_classifier_dilations(&[6, 12]);
    let model = config.init(&device).unwrap();
    assert_eq!(model.layer6.conv2d_list.len(), 2);
    assert_eq!(model.layer6.conv2d_list[1].dilation, [12, 12]);
    let features = Tensor::<4>::random(
        [1, config.main_channels(), 9, 9],
        Distribution::Default,
        &device,
    );
    let head = &model.layer6;
    let sum = head.conv2d_list[0].forward(features.clone())
        + head.conv2d_list[1].forward(features.clone());
    head.forward(features)
        .into_data()
        .assert_approx_eq::<f32>(&sum.into_data(), Tolerance::default());

    let dir = tempfile::tempdir().unwrap();
    save_model(model.into(), serde_json::json!({}), dir.path()).unwrap();
    let (loaded, desc) = load_model(dir.path(), &device).unwrap();
    let Architecture::DeepLabV2(read) = desc.arch else {
        panic!("a DeepLabV2 was saved")
    };
    assert_eq!(read.classifier_dilations, vec![6, 12]);
    assert_eq!(loaded.deeplab().unwrap().layer5.conv2d_list.len(), 2);

    let advent = tiny(4);
    let json = serde_json::to_value(&advent).unwrap();
    assert!(json.get("classifier_dilations").is_none(), "{json}");
    let read: DeepLabV2Config = serde_json::from_value(json).unwrap();
    assert_eq!(read.classifier_dilations, vec![6, 12, 18, 24]);
}

#[test]
fn predict_upsamples_with_aligned_corners() {
    let device = Device::flex();
    let model = tiny(3).init(&device).unwrap();
    let x = Tensor::<4>::random([1, 3, 48, 64], Distribution::Normal(0.0, 1.0), &device);
    let (aux_small, main_small) = model.valid().forward(x.clone());
    let model = Segmenter::from(model);
    let logits = model.predict_logits(x.clone(), [97, 131]);
    let (aux, main) = (logits.aux.unwrap(), logits.main);
    assert_eq!(main.dims(), [1, 3, 97, 131]);
    assert_eq!(aux.dims(), [1, 3, 97, 131]);
    // align_corners = true keeps the corner values exactly.
    let corner = |t: Tensor<4>, h: usize, w: usize| -> Vec<f32> {
        t.slice([0..1, 0..3, h..h + 1, w..w + 1])
            .into_data()
            .try_to_vec()
            .unwrap()
    };
    let [sh, sw] = output_size([48, 64]);
    assert_eq!(
        corner(main.clone(), 96, 130),
        corner(main_small.clone(), sh - 1, sw - 1)
    );
    assert_eq!(corner(aux, 0, 0), corner(aux_small, 0, 0));
    let probs = model.predict_probs(x, [97, 131]);
    let sums = probs.sum_dim(1).into_data();
    sums.assert_approx_eq::<f32>(
        &TensorData::new(vec![1.0f32; 97 * 131], [1, 1, 97, 131]),
        Tolerance::absolute(1e-5),
    );
}

struct Reference {
    input: Tensor<4>,
    layer3: TensorData,
    layer4: TensorData,
    tensors: usize,
}

fn reference(file: &str, device: &Device) -> Reference {
    let text = std::fs::read_to_string(fixture(file)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let floats = |key: &str| -> Vec<f32> {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let shape = |key: &str| -> [usize; 4] {
        let s: Vec<usize> = v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        [s[0], s[1], s[2], s[3]]
    };
    Reference {
        input: Tensor::from_data(
            TensorData::new(floats("input"), shape("input_shape")),
            device,
        ),
        layer3: TensorData::new(floats("layer3"), shape("layer3_shape")),
        layer4: TensorData::new(floats("layer4"), shape("layer4_shape")),
        tensors: v["backbone_tensors"].as_u64().unwrap() as usize,
    }
}

fn check_against_pytorch(file: &str, expected_unused: &[&str]) {
    check_style_against_pytorch(file, ResNetStyle::Caffe, "backbone.json", expected_unused);
}

fn check_style_against_pytorch(
    file: &str,
    style: ResNetStyle,
    features: &str,
    expected_unused: &[&str],
) {
    let device = Device::flex();
    let reference = reference(features, &device);
    let mut config = tiny(3);
    config.resnet = style;
    let model = config.init(&device).unwrap();
    let (backbone, report) = load_imagenet_backbone(model.backbone, &fixture(file), false).unwrap();
    assert_eq!(
        report.applied.len(),
        reference.tensors,
        "{file}: {report:?}"
    );
    assert!(report.missing.is_empty(), "{file}: {:?}", report.missing);
    for name in expected_unused {
        assert!(
            report.unused.iter().any(|u| u.contains(name)),
            "{file}: `{name}` should be unused, got {:?}",
            report.unused
        );
    }
    assert!(report
        .summary()
        .starts_with(&format!("applied {}, missing 0", reference.tensors)));
    let (l3, l4) = backbone.valid().forward(reference.input);
    let tol = Tolerance::absolute(1e-4).set_relative(1e-4);
    l3.into_data()
        .assert_approx_eq::<f32>(&reference.layer3, tol);
    l4.into_data()
        .assert_approx_eq::<f32>(&reference.layer4, tol);
}

#[test]
fn loads_advent_imagenet_naming_and_matches_pytorch() {
    check_against_pytorch("advent_tiny.pth", &["layer5.conv2d_list.0.weight"]);
}

/// mmcv's ResNet-V1c (DAFormer's DeepLabV2): the deep stem, floor-mode pooling, strides on the
/// 3x3 convs and contracted dilations give PyTorch's features, from a checkpoint wrapped in
/// `state_dict` with mmcv's `stem.N` names.
#[test]
fn loads_mmcv_v1c_and_matches_pytorch() {
    check_style_against_pytorch(
        "v1c_tiny.pth",
        ResNetStyle::V1c,
        "backbone_v1c.json",
        &["fc.weight", "fc.bias"],
    );
}

/// The V1c ResNet trains its BatchNorm affine parameters, as mmcv's `requires_grad=True`.
#[test]
fn v1c_batchnorm_is_trainable() {
    let device = Device::flex().autodiff();
    let mut config = tiny(3);
    config.resnet = ResNetStyle::V1c;
    let model = config.init(&device).unwrap();
    let x = Tensor::<4>::random([2, 3, 32, 32], Distribution::Normal(1.0, 2.0), &device);
    let (aux, main) = model.forward(x);
    let grads = (aux.sum() + main.sum()).backward();
    let bn = &model.backbone.layer1[0].bn2;
    assert!(bn.gamma.val().grad(&grads).is_some());
    let stem = model.backbone.deep_stem.as_ref().expect("a deep stem");
    assert!(stem.bn3.beta.val().grad(&grads).is_some());
}

#[test]
fn loads_torchvision_naming_and_matches_pytorch() {
    check_against_pytorch("torchvision_tiny.pth", &["fc.weight", "fc.bias"]);
}

#[test]
fn refuses_partial_loads_unless_allowed() {
    let device = Device::flex();
    let model = tiny(3).init(&device).unwrap();
    let err =
        load_imagenet_backbone(model.backbone, &fixture("partial_tiny.pth"), false).unwrap_err();
    match &err {
        ModelError::PartialLoad { missing, .. } => {
            assert_eq!(missing, &vec!["layer4.0.conv2.weight".to_string()])
        }
        other => panic!("expected PartialLoad, got {other}"),
    }
    assert!(err.to_string().contains("partial_tiny.pth"));
    let model = tiny(3).init(&device).unwrap();
    let (_, report) =
        load_imagenet_backbone(model.backbone, &fixture("partial_tiny.pth"), true).unwrap();
    assert_eq!(report.missing.len(), 1);
}

#[test]
fn refuses_weights_of_another_width() {
    let device = Device::flex();
    let model = tiny(3).with_width(0.125).init(&device).unwrap();
    let err = load_imagenet_backbone(model.backbone, &fixture("torchvision_tiny.pth"), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not fit"), "{err}");
    let model = tiny(3).init(&device).unwrap();
    let missing = load_imagenet_backbone(model.backbone, &fixture("nope.pth"), false);
    assert!(matches!(missing, Err(ModelError::WeightsNotFound(_))));
}

#[test]
fn differentiable_upsampling_matches_interpolate() {
    use burn::tensor::module::interpolate;
    use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
    use dag_model::{upsample, upsample_differentiable};
    let device = Device::flex();
    let x = Tensor::<4>::random([2, 3, 9, 13], Distribution::Normal(0.0, 1.0), &device);
    for size in [[64, 32], [9, 40], [17, 13], [1, 5]] {
        // Burn's own bilinear interpolation is the reference for both forms.
        let reference = interpolate(
            x.clone(),
            InterpolateOptions::new(InterpolateMode::Bilinear)
                .with_align_corners(true)
                .with_output_size(size),
        )
        .into_data();
        let a = upsample(x.clone(), size).into_data();
        let b = upsample_differentiable(x.clone(), size).into_data();
        a.assert_approx_eq::<f32>(&reference, Tolerance::absolute(1e-5));
        b.assert_approx_eq::<f32>(&reference, Tolerance::absolute(1e-5));
    }
    // Gradients flow through it on an autodiff device.
    let ad = Device::flex().autodiff();
    let x = Tensor::<4>::random([1, 2, 5, 6], Distribution::Default, &ad).require_grad();
    let grads = upsample_differentiable(x.clone(), [20, 30])
        .sum()
        .backward();
    let g: Vec<f32> = x.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
    assert!(g.iter().all(|v| *v > 0.0));
}

#[test]
fn host_argmax_matches_burn_argmax_and_breaks_ties_low() {
    let device = Device::flex();
    let x = Tensor::<4>::random([2, 5, 7, 9], Distribution::Normal(0.0, 1.0), &device);
    let burn: Vec<u8> = x
        .clone()
        .argmax(1)
        .into_data()
        .try_into_vec_as::<i64>()
        .unwrap()
        .into_iter()
        .map(|c| c as u8)
        .collect();
    let host = dag_model::argmax_classes(x);
    assert_eq!(host.len(), 2);
    assert_eq!(host.concat(), burn);
    // Pixel 0: classes 1 and 2 tie at the top; pixel 1: the last class wins.
    let tied = Tensor::<4>::from_data(
        TensorData::new(vec![0.0f32, 0.0, 3.0, 1.0, 3.0, 2.0], [1, 3, 1, 2]),
        &device,
    );
    let burn_tied: Vec<i64> = tied
        .clone()
        .argmax(1)
        .into_data()
        .try_into_vec_as::<i64>()
        .unwrap();
    assert_eq!(burn_tied, vec![1, 2], "Burn's own tie rule changed");
    assert_eq!(dag_model::argmax_classes(tied), vec![vec![1u8, 2]]);
}
