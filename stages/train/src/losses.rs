//! The losses of ADVENT-style training, on `[N, C, H, W]` logits.

use burn::tensor::activation::{log_softmax, relu, softmax};
use burn::tensor::{Int, Tensor};

/// Label value that the segmentation loss ignores.
pub const IGNORE_LABEL: i64 = 255;

/// Cross-entropy of `logits` `[N, C, H, W]` against `labels` `[N, H, W]`, averaged over the
/// pixels whose label is not [`IGNORE_LABEL`] (PyTorch's `CrossEntropyLoss(ignore_index=255)`).
/// A batch without any labelled pixel gives 0 rather than NaN, as ADVENT's `cross_entropy_2d`.
/// Labels other than 255 must lie in `0..C`; the training loop checks that on the host.
pub fn masked_cross_entropy(logits: Tensor<4>, labels: Tensor<3, Int>) -> Tensor<1> {
    #[cfg(feature = "tch")]
    if let Some(loss) = fused::masked_cross_entropy(&logits, &labels) {
        return loss;
    }
    if let Some(loss) = crate::host_losses::masked_cross_entropy(&logits, &labels) {
        return loss;
    }
    let log_p = log_softmax(logits, 1);
    let ignored = labels.clone().equal_elem(IGNORE_LABEL);
    let valid = ignored.clone().bool_not().float();
    // Ignored pixels gather class 0 and are then zeroed by the mask.
    let safe = labels.mask_fill(ignored, 0);
    let picked: Tensor<3> = log_p.gather(1, safe.unsqueeze_dim(1)).squeeze_dim(1);
    let count = valid.clone().sum().clamp_min(1.0);
    (picked * valid).sum().neg() / count
}

/// ADVENT's weighted self-information map `I = -p * log2(p) / log2(C)` of `logits`
/// `[N, C, H, W]`, with `p = softmax(logits)` over the class axis. Computed from log-softmax,
/// so it stays finite where a probability underflows (ADVENT adds 1e-30 inside the log).
pub fn self_information(logits: Tensor<4>) -> Tensor<4> {
    let [_, c, _, _] = logits.dims();
    #[cfg(feature = "tch")]
    if let Some(map) = fused::self_information(&logits, c) {
        return map;
    }
    if let Some(map) = crate::host_losses::self_information(&logits, entropy_norm(c)) {
        return map;
    }
    let log_p = log_softmax(logits.clone(), 1);
    let p = softmax(logits, 1);
    // -p ln p / ln C == -p log2 p / log2 C; C == 1 has no uncertainty at all.
    (p * log_p).neg().div_scalar(entropy_norm(c))
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
    #[cfg(feature = "tch")]
    if let Some(loss) = fused::bce_with_logits(&logits, label) {
        return loss;
    }
    let stable = logits.clone().abs().neg().exp().log1p();
    (relu(logits.clone()) - logits.mul_scalar(label) + stable).mean()
}

/// `ln C`, the largest entropy of `C` classes; 1 for `C == 1`, which has no uncertainty at all.
fn entropy_norm(classes: usize) -> f64 {
    if classes > 1 {
        (classes as f64).ln()
    } else {
        1.0
    }
}

/// The same losses on `device: tch` in training, each as one LibTorch operation with LibTorch's
/// fused kernels and gradients (`dag_model::libtorch`); `None` elsewhere.
#[cfg(feature = "tch")]
mod fused {
    use burn::tensor::{Int, Tensor};
    use dag_model::libtorch::tch::{self, Kind, Reduction};
    use dag_model::libtorch::{record, tracked, tracked_int};

    use super::{entropy_norm, IGNORE_LABEL};

    pub(super) fn masked_cross_entropy(
        logits: &Tensor<4>,
        labels: &Tensor<3, Int>,
    ) -> Option<Tensor<1>> {
        let labels = tracked_int(labels)?;
        Some(record([tracked(logits)?], move |t| {
            let sum = t[0].log_softmax(1, None).nll_loss2d(
                &labels,
                None::<tch::Tensor>,
                Reduction::Sum,
                IGNORE_LABEL,
            );
            let count = labels.ne(IGNORE_LABEL).sum(Kind::Float).clamp_min(1.0);
            (sum / count).reshape([1])
        }))
    }

    pub(super) fn self_information(logits: &Tensor<4>, classes: usize) -> Option<Tensor<4>> {
        let scale = -1.0 / entropy_norm(classes);
        Some(record([tracked(logits)?], move |t| {
            let log_p = t[0].log_softmax(1, None);
            (log_p.exp() * &log_p) * scale
        }))
    }

    pub(super) fn bce_with_logits(logits: &Tensor<4>, label: f64) -> Option<Tensor<1>> {
        Some(record([tracked(logits)?], move |t| {
            let target = t[0].full_like(label);
            t[0].binary_cross_entropy_with_logits(
                &target,
                None::<tch::Tensor>,
                None,
                Reduction::Mean,
            )
            .reshape([1])
        }))
    }
}
