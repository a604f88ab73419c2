//! HRDA's multi-resolution network on hand-checked cases: the fused training output rebuilt on
//! the host from its parts (detail pasted at its stride-4 window, attention zero outside it),
//! the whole-image pass over overlapping detail crops, and sliding-window inference.

use burn::module::Module;
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Distribution, Tensor};
use dag_model::hrda::slide_windows;
use dag_model::{
    load_model, save_model, Architecture, DaFormerConfig, Hrda, HrdaConfig, MitConfig, Noise,
    PixelWindow, Segmenter,
};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// A narrow HRDA: MiT-B0 at a quarter width, no dropout or drop path, 32x32 detail crops (the
/// smallest MiT's first reduction takes), 64x64 test windows.
fn tiny() -> HrdaConfig {
    let mut encoder = MitConfig::variant(0).unwrap().with_width(0.25);
    encoder.drop_path = 0.0;
    let mut network = DaFormerConfig::new(encoder, 5).with_width(0.0625);
    network.dropout = 0.0;
    HrdaConfig {
        attention_embed_dim: 8,
        detail_crop: [32, 32],
        test_window: [64, 64],
        test_stride: [16, 16],
        ..HrdaConfig::new(network)
    }
}

fn values(x: Tensor<4>) -> Vec<f32> {
    x.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// PyTorch's bilinear resize with `align_corners=False` of one `h x w` plane, written
/// independently of the kernel under test.
fn resize_plane(x: &[f32], [h, w]: [usize; 2], [oh, ow]: [usize; 2]) -> Vec<f32> {
    let taps = |o: usize, n: usize, on: usize| {
        let src = ((o as f64 + 0.5) * n as f64 / on as f64 - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n - 1);
        let i1 = (i0 + 1).min(n - 1);
        (i0, i1, (src - i0 as f64) as f32)
    };
    let mut out = vec![0.0; oh * ow];
    for r in 0..oh {
        let (r0, r1, fr) = taps(r, h, oh);
        for c in 0..ow {
            let (c0, c1, fc) = taps(c, w, ow);
            let at = |y: usize, x: usize| x + y * w;
            let top = x[at(r0, c0)] * (1.0 - fc) + x[at(r0, c1)] * fc;
            let bottom = x[at(r1, c0)] * (1.0 - fc) + x[at(r1, c1)] * fc;
            out[r * ow + c] = top * (1.0 - fr) + bottom * fr;
        }
    }
    out
}

fn assert_close(what: &str, ours: &[f32], expected: &[f32], tol: f32) {
    assert_eq!(ours.len(), expected.len(), "{what}: length");
    let worst = ours
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= tol, "{what}: max difference {worst} exceeds {tol}");
}

#[test]
fn fused_output_pastes_the_detail_into_its_window() {
    let device = Device::flex();
    let model: Hrda = tiny().init(&device).unwrap();
    let x = Tensor::<4>::random([2, 3, 80, 64], Distribution::Default, &device);
    let window = PixelWindow {
        top: 16,
        left: 8,
        height: 32,
        width: 32,
    };
    let out = model.forward_train(x.clone(), window, &mut Noise::none());

    // The parts, each computed on its own view.
    let context_view = dag_model::resize(x.clone(), [40, 32]);
    let context_features = model.backbone.forward(context_view, &mut Noise::none());
    let context = model
        .decode_head
        .forward(&context_features, &mut Noise::none());
    let attention = sigmoid(
        model
            .scale_attention
            .forward(&context_features, &mut Noise::none()),
    );
    let detail_view = x.slice([0..2, 0..3, 16..48, 8..40]);
    let detail = model.decode_head.forward(
        &model.backbone.forward(detail_view, &mut Noise::none()),
        &mut Noise::none(),
    );
    assert_eq!(out.context.dims(), [2, 5, 10, 8]);
    assert_eq!(out.detail.dims(), [2, 5, 8, 8]);
    assert_eq!(out.fused.dims(), [2, 5, 20, 16]);
    assert_close(
        "context",
        &values(out.context),
        &values(context.clone()),
        1e-5,
    );
    assert_close("detail", &values(out.detail), &values(detail.clone()), 1e-5);

    // The attention: the head's sigmoid on the window's cells of the context logits (rows
    // 16/8 .. 48/8, columns 8/8 .. 40/8), zero elsewhere.
    let attention = values(attention);
    let masked = values(out.attention);
    let (lh, lw) = (10, 8);
    for (i, (&ours, &full)) in masked.iter().zip(&attention).enumerate() {
        let (row, col) = ((i / lw) % lh, i % lw);
        let inside = (2..6).contains(&row) && (1..5).contains(&col);
        let expected = if inside { full } else { 0.0 };
        assert!(
            (ours - expected).abs() <= 1e-6,
            "attention at ({row}, {col}): {ours}, expected {expected}"
        );
    }

    // fused = up2(a) * insert(detail) + up2((1 - a) * context), rebuilt plane by plane, the
    // detail pasted at rows 16/4 .. 48/4 and columns 8/4 .. 40/4 of the 20x16 map.
    let (context, detail) = (values(context), values(detail));
    let mut expected = Vec::new();
    for plane in 0..2 * 5 {
        let a = &masked[plane * lh * lw..(plane + 1) * lh * lw];
        let lr = &context[plane * lh * lw..(plane + 1) * lh * lw];
        let weighted: Vec<f32> = a.iter().zip(lr).map(|(a, l)| (1.0 - a) * l).collect();
        let up_a = resize_plane(a, [lh, lw], [20, 16]);
        let up_lr = resize_plane(&weighted, [lh, lw], [20, 16]);
        let hr = &detail[plane * 64..(plane + 1) * 64];
        for i in 0..20 * 16 {
            let (row, col) = (i / 16, i % 16);
            let inserted = if (4..12).contains(&row) && (2..10).contains(&col) {
                hr[(row - 4) * 8 + (col - 2)]
            } else {
                0.0
            };
            expected.push(up_a[i] * inserted + up_lr[i]);
        }
    }
    assert_close("fused", &values(out.fused), &expected, 1e-5);
}

#[test]
fn detail_windows_are_drawn_on_the_context_grid() {
    let device = Device::flex();
    let model = tiny().init(&device).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut tops = std::collections::BTreeSet::new();
    let mut lefts = std::collections::BTreeSet::new();
    for _ in 0..400 {
        let w = model.draw_window([64, 48], &mut Noise::from_rng(&mut rng));
        assert_eq!([w.height, w.width], [32, 32]);
        tops.insert(w.top);
        lefts.insert(w.left);
    }
    // HRDA's `randint(0, (margin + 1) // 8) * 8`: margins 32 and 16 give 0..=24 and 0..=8.
    assert_eq!(tops.into_iter().collect::<Vec<_>>(), [0, 8, 16, 24]);
    assert_eq!(lefts.into_iter().collect::<Vec<_>>(), [0, 8]);
    // Without a generator, the top-left corner.
    let w = model.draw_window([64, 48], &mut Noise::none());
    assert_eq!((w.top, w.left), (0, 0));
}

#[test]
fn whole_image_pass_averages_overlapping_detail_crops() {
    let device = Device::flex();
    let model = tiny().init(&device).unwrap();
    let x = Tensor::<4>::random([1, 3, 80, 64], Distribution::Default, &device);
    let fused = values(model.forward(x.clone(), &mut Noise::none()));

    let none = &mut Noise::none();
    let context_features = model
        .backbone
        .forward(dag_model::resize(x.clone(), [40, 32]), none);
    let context = values(model.decode_head.forward(&context_features, none));
    let attention = values(sigmoid(
        model.scale_attention.forward(&context_features, none),
    ));
    // 32x32 crops at stride 16 over 80x64: 4 rows x 3 columns.
    let windows = slide_windows([80, 64], [32, 32], [16, 16]);
    assert_eq!(windows.len(), 12);
    let (h4, w4) = (20, 16);
    let mut sum = vec![0.0f32; 5 * h4 * w4];
    let mut count = vec![0.0f32; h4 * w4];
    for win in &windows {
        let crop = x.clone().slice([
            0..1,
            0..3,
            win.top..win.top + win.height,
            win.left..win.left + win.width,
        ]);
        let logits = values(
            model
                .decode_head
                .forward(&model.backbone.forward(crop, none), none),
        );
        for class in 0..5 {
            for r in 0..8 {
                for c in 0..8 {
                    let (row, col) = (win.top / 4 + r, win.left / 4 + c);
                    sum[class * h4 * w4 + row * w4 + col] += logits[class * 64 + r * 8 + c];
                    if class == 0 {
                        count[row * w4 + col] += 1.0;
                    }
                }
            }
        }
    }
    let (lh, lw) = (10, 8);
    let mut expected = Vec::new();
    for class in 0..5 {
        let a = &attention[class * lh * lw..(class + 1) * lh * lw];
        let lr = &context[class * lh * lw..(class + 1) * lh * lw];
        let weighted: Vec<f32> = a.iter().zip(lr).map(|(a, l)| (1.0 - a) * l).collect();
        let up_a = resize_plane(a, [lh, lw], [h4, w4]);
        let up_lr = resize_plane(&weighted, [lh, lw], [h4, w4]);
        for i in 0..h4 * w4 {
            expected.push(up_a[i] * sum[class * h4 * w4 + i] / count[i] + up_lr[i]);
        }
    }
    assert_close("fused", &fused, &expected, 1e-5);
}

#[test]
fn sliding_window_inference_equals_the_whole_image_pass_when_one_window_covers_it() {
    let device = Device::flex();
    let mut config = tiny();
    config.test_window = [80, 64];
    let model = config.init(&device).unwrap();
    let x = Tensor::<4>::random([2, 3, 80, 64], Distribution::Default, &device);
    let whole = dag_model::resize(model.forward(x.clone(), &mut Noise::none()), [80, 64]);
    let slid = model.infer(x);
    assert_eq!(values(slid), values(whole));
}

#[test]
fn sliding_window_inference_averages_its_windows() {
    let device = Device::flex();
    let model = tiny().init(&device).unwrap();
    let x = Tensor::<4>::random([1, 3, 80, 64], Distribution::Default, &device);
    let slid = values(model.infer(x.clone()));
    // 64x64 windows at stride 16 over 80x64: tops 0 and 16, each decoded on its own and
    // resized to the window.
    let windows = slide_windows([80, 64], [64, 64], [16, 16]);
    assert_eq!(windows.len(), 2);
    let mut sum = vec![0.0f32; 5 * 80 * 64];
    let mut count = vec![0.0f32; 80 * 64];
    for win in windows {
        let crop = x
            .clone()
            .slice([0..1, 0..3, win.top..win.top + 64, win.left..win.left + 64]);
        let logits = values(dag_model::resize(
            model.forward(crop, &mut Noise::none()),
            [64, 64],
        ));
        for class in 0..5 {
            for r in 0..64 {
                for c in 0..64 {
                    let at = (win.top + r) * 64 + win.left + c;
                    sum[class * 80 * 64 + at] += logits[class * 4096 + r * 64 + c];
                    if class == 0 {
                        count[at] += 1.0;
                    }
                }
            }
        }
    }
    let expected: Vec<f32> = sum
        .iter()
        .enumerate()
        .map(|(i, s)| s / count[i % (80 * 64)])
        .collect();
    assert!(count.iter().any(|&c| c > 1.0), "windows overlap");
    assert_close("slid", &slid, &expected, 1e-5);
}

#[test]
fn fused_loss_trains_every_head() {
    let device = Device::flex().autodiff();
    let model = Segmenter::from(tiny().init(&device).unwrap());
    let x = Tensor::<4>::random([1, 3, 64, 64], Distribution::Default, &device);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let logits = model.forward_train(x, &mut Noise::from_rng(&mut rng));
    let detail = logits
        .detail
        .expect("HRDA's training pass has a detail crop");
    assert_eq!(detail.loss_weight, 0.1);
    let loss = logits.main.sum() + detail.logits.sum().mul_scalar(0.5);
    let grads = loss.backward();
    let Segmenter::Hrda(m) = &model else {
        unreachable!()
    };
    for (name, grad) in [
        ("attention", m.scale_attention.conv_seg.weight.grad(&grads)),
        ("decoder", m.decode_head.conv_seg.weight.grad(&grads)),
        (
            "encoder",
            m.backbone.stages[0].patch_embed.proj.weight.grad(&grads),
        ),
    ] {
        let grad = grad.unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(
            grad.abs().max().into_scalar::<f32>() > 0.0,
            "{name}: zero gradient"
        );
    }
}

#[test]
fn hrda_artifact_round_trip_and_input_checks() {
    let device = Device::flex();
    let config = tiny();
    let model = Segmenter::from(config.init(&device).unwrap());
    assert!(model.is_multi_resolution() && !model.has_aux());
    let x = Tensor::<4>::random([1, 3, 64, 80], Distribution::Default, &device);
    let expected = model.predict_probs(x.clone(), [32, 48]).into_data();
    let dir = tempfile::tempdir().unwrap();
    save_model(model, serde_json::json!({}), dir.path()).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("model.json")).unwrap()).unwrap();
    assert_eq!(json["architecture"], "hrda", "{json}");
    let (loaded, desc) = load_model(dir.path(), &device).unwrap();
    assert_eq!(desc.arch, Architecture::Hrda(config.clone()));
    loaded
        .predict_probs(x, [32, 48])
        .into_data()
        .assert_eq(&expected, true);

    let err = loaded.check_input([68, 80], false).unwrap_err();
    assert!(
        err.contains("multiples of 8") && err.contains("80x72"),
        "{err}"
    );
    let err = loaded.check_input([48, 80], false).unwrap_err();
    assert!(err.contains("at least 64"), "{err}");
    loaded.check_input([64, 80], true).unwrap();
    let mut large = config.clone();
    (large.detail_crop, large.test_window) = ([96, 96], [128, 128]);
    let err = large.check_input([64, 80], true).unwrap_err();
    assert!(err.contains("detail crop"), "{err}");
    let mut bad = config;
    bad.detail_crop = [30, 32];
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("detail_crop"), "{err}");
    bad.detail_crop = [16, 16];
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("at least 32"), "{err}");
    // The record holds the three parts under HRDA's names.
    let Segmenter::Hrda(m) = loaded else {
        unreachable!()
    };
    assert!(m.scale_attention.num_params() > 0 && m.decode_head.num_params() > 0);
}
