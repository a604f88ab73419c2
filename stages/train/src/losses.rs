//! The losses of ADVENT-style training, on `[N, C, H, W]` logits. Each runs the fastest kernel
//! of the logits' backend (`dag_kernels`).

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

pub use dag_kernels::IGNORE_LABEL;

/// Cross-entropy of `logits` `[N, C, H, W]` against `labels` `[N, H, W]`, averaged over the
/// pixels whose label is not [`IGNORE_LABEL`] (PyTorch's `CrossEntropyLoss(ignore_index=255)`).
/// A batch without any labelled pixel gives 0 rather than NaN, as ADVENT's `cross_entropy_2d`.
/// Labels other than 255 must lie in `0..C`; the training loop checks that on the host.
pub fn masked_cross_entropy(logits: Tensor<4>, labels: Tensor<3, Int>) -> Tensor<1> {
    dag_kernels::masked_cross_entropy(logits, labels)
}

/// `sum_p w_p CE_p / denominator` of `logits` `[N, C, H, W]` against `labels` `[N, H, W]`
/// (row-major, 255 ignored) with `w_p` the pixel's weight times its class's weight: TUFL's
/// `CrossEntropyLoss(weight=class_weight, reduction='none')` times a pixel weight, averaged as
/// the caller says. A generic log-softmax and gather, as the class weights rule out the fused
/// kernel of [`masked_cross_entropy`].
pub fn class_weighted_cross_entropy(
    logits: Tensor<4>,
    labels: &[u8],
    pixel_weights: Option<&[f32]>,
    class_weights: &[f32],
    denominator: f64,
) -> Tensor<1> {
    let [n, _, h, w] = logits.dims();
    let device = logits.device();
    let mut index = Vec::with_capacity(labels.len());
    let mut weight = Vec::with_capacity(labels.len());
    for (px, &label) in labels.iter().enumerate() {
        let class_weight = class_weights.get(usize::from(label)).copied();
        match class_weight {
            Some(cw) if label != IGNORE_LABEL as u8 => {
                index.push(i64::from(label));
                weight.push(cw * pixel_weights.map_or(1.0, |p| p[px]));
            }
            _ => {
                index.push(0);
                weight.push(0.0);
            }
        }
    }
    let index: Tensor<4, Int> = Tensor::from_data(TensorData::new(index, [n, 1, h, w]), &device);
    let weight: Tensor<4> = Tensor::from_data(TensorData::new(weight, [n, 1, h, w]), &device);
    let picked = log_softmax(logits, 1).gather(1, index);
    (picked * weight)
        .sum()
        .neg()
        .div_scalar(denominator.max(1.0))
}

/// ADVENT's weighted self-information map `I = -p * log2(p) / log2(C)` of `logits`
/// `[N, C, H, W]`, with `p = softmax(logits)` over the class axis. Computed from log-softmax,
/// so it stays finite where a probability underflows (ADVENT adds 1e-30 inside the log).
pub fn self_information(logits: Tensor<4>) -> Tensor<4> {
    let [_, c, _, _] = logits.dims();
    // -p ln p / ln C == -p log2 p / log2 C.
    dag_kernels::self_information(logits, entropy_norm(c))
}

/// MinEnt: the mean over `N, H, W` of the per-pixel normalised entropy `sum_c I_c`.
pub fn entropy_loss(logits: Tensor<4>) -> Tensor<1> {
    let [n, _, h, w] = logits.dims();
    self_information(logits)
        .sum()
        .div_scalar((n * h * w).max(1) as f64)
}

/// Binary cross-entropy with logits against a constant `label` (0 = source, 1 = target),
/// averaged over every element, in the stable form `max(x,0) - x*y + ln(1 + exp(-|x|))`.
pub fn bce_with_logits(logits: Tensor<4>, label: f64) -> Tensor<1> {
    dag_kernels::bce_with_logits(logits, label)
}

/// `ln C`, the largest entropy of `C` classes; 1 for `C == 1`, which has no uncertainty at all.
fn entropy_norm(classes: usize) -> f64 {
    if classes > 1 {
        (classes as f64).ln()
    } else {
        1.0
    }
}

/// With HRDA's detail crop, `(1 - w) main_term + w ce(detail)`: the detail logits resized to
/// their window (as mmseg resizes them to the cropped label), and `ce` given that window to
/// read its labels and weights from. Returns the term and the detail's own loss (for the log);
/// without a detail crop, `main_term` alone.
pub(crate) fn with_detail(
    model: &dag_model::Segmenter,
    main_term: Tensor<1>,
    detail: Option<dag_model::DetailLogits>,
    ce: impl FnOnce(Tensor<4>, &dag_model::PixelWindow) -> Tensor<1>,
) -> (Tensor<1>, Option<Tensor<1>>) {
    let Some(detail) = detail else {
        return (main_term, None);
    };
    let window = detail.window;
    let logits = model.resize_logits_differentiable(detail.logits, [window.height, window.width]);
    let detail_term = ce(logits, &window);
    let w = detail.loss_weight;
    (
        main_term.mul_scalar(1.0 - w) + detail_term.clone().mul_scalar(w),
        Some(detail_term),
    )
}
