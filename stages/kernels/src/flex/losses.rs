//! The softmax-based losses on flex as single passes over host memory with hand-derived
//! gradients (`super::host::unary`), instead of Burn's chain of strided max / exp / sum /
//! division ops and their backward passes (BENCHMARKS.md, "Fused losses on flex").
//!
//! Maps are `[N, C, P]` row-major (`P = H * W`): a pixel's class scores lie `P` apart. Each
//! kernel first finds every pixel's log-sum-exp `ls` (pixel-parallel, reading the `C` rows in
//! contiguous runs), then works row by row, where `log p_c = z_c - ls`. Every value is computed
//! by the same sequence of operations whatever the thread count, so results are bit-identical
//! from run to run.

use super::host::{int_values, unary, HostBackward, HostOutput, HostTensor};
use burn::tensor::{Int, Tensor};
use rayon::prelude::*;

use crate::plain::IGNORE_LABEL;

/// Pixels per parallel task in the log-sum-exp pass.
const BLOCK: usize = 1024;

/// `[N, C, P]` of an `[N, C, H, W]` map.
fn image_dims(x: &HostTensor) -> [usize; 3] {
    let dims = x.dims();
    [dims[0], dims[1], dims[2..].iter().product()]
}

/// Every pixel's `ln sum_c exp(z_c)`, `[N, P]`.
fn log_sum_exp(z: &[f32], [_, c, p]: [usize; 3]) -> Vec<f32> {
    let mut ls = vec![0.0f32; z.len() / c.max(1)];
    if c == 0 || p == 0 {
        return ls;
    }
    ls.par_chunks_mut(p).enumerate().for_each(|(n, image)| {
        let z = &z[n * c * p..][..c * p];
        image
            .par_chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(block, out)| {
                let (start, len) = (block * BLOCK, out.len());
                let rows = || z.chunks_exact(p).map(|row| &row[start..start + len]);
                let mut max = vec![f32::NEG_INFINITY; len];
                for row in rows() {
                    for (m, &v) in max.iter_mut().zip(row) {
                        *m = m.max(v);
                    }
                }
                out.fill(0.0);
                for row in rows() {
                    for ((s, &v), &m) in out.iter_mut().zip(row).zip(&max) {
                        *s += (v - m).exp();
                    }
                }
                for (s, m) in out.iter_mut().zip(max) {
                    *s = m + s.ln();
                }
            });
    });
    ls
}

/// Calls `f(n, c, row)` for every `[P]` row of an `[N, C, P]` output, in parallel.
fn for_each_row(
    out: &mut [f32],
    [_, c, p]: [usize; 3],
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    if p == 0 || c == 0 {
        return;
    }
    out.par_chunks_mut(p)
        .enumerate()
        .for_each(|(row, values)| f(row / c, row % c, values));
}

/// `-p ln p / norm` per class and pixel, `p = softmax(z)` over the class axis.
pub(crate) fn self_information(logits: &Tensor<4>, norm: f64) -> Option<Tensor<4>> {
    let dims = logits.dims();
    unary(logits, move |z: &HostTensor, wants_backward| {
        let shape = image_dims(z);
        let p = shape[2];
        let ls = log_sum_exp(z.values(), shape);
        let scale = -1.0 / norm as f32;
        let mut values = vec![0.0f32; z.values().len()];
        let zv = z.values();
        for_each_row(&mut values, shape, |n, class, out| {
            let row = &zv[(n * shape[1] + class) * p..][..p];
            for ((o, &v), &l) in out.iter_mut().zip(row).zip(&ls[n * p..][..p]) {
                let log_p = v - l;
                *o = scale * log_p.exp() * log_p;
            }
        });
        let backward = wants_backward.then(|| {
            let z = z.clone();
            Box::new(move |g: &[f32]| self_information_backward(&z, &ls, g, scale)) as HostBackward
        });
        HostOutput {
            values,
            dims,
            backward,
        }
    })
}

/// With `a_c = g_c p_c (ln p_c + 1)`: `dz_c = scale * (a_c - p_c * sum_k a_k)`, where `scale`
/// is the forward pass's `-1 / norm`.
fn self_information_backward(z: &HostTensor, ls: &[f32], g: &[f32], scale: f32) -> Vec<f32> {
    let shape = image_dims(z);
    let [_, c, p] = shape;
    let zv = z.values();
    // sum_k a_k per pixel, accumulated over the class rows in order.
    let mut total = vec![0.0f32; ls.len()];
    if p > 0 {
        total.par_chunks_mut(p).enumerate().for_each(|(n, sums)| {
            for class in 0..c {
                let offset = (n * c + class) * p;
                let (row, grad) = (&zv[offset..][..p], &g[offset..][..p]);
                for (((s, &v), &gv), &l) in sums.iter_mut().zip(row).zip(grad).zip(&ls[n * p..]) {
                    let log_p = v - l;
                    *s += gv * log_p.exp() * (log_p + 1.0);
                }
            }
        });
    }
    let mut dz = vec![0.0f32; zv.len()];
    for_each_row(&mut dz, shape, |n, class, out| {
        let offset = (n * c + class) * p;
        let (row, grad) = (&zv[offset..][..p], &g[offset..][..p]);
        let (ls, total) = (&ls[n * p..][..p], &total[n * p..][..p]);
        for i in 0..p {
            let log_p = row[i] - ls[i];
            let prob = log_p.exp();
            out[i] = scale * (grad[i] * prob * (log_p + 1.0) - prob * total[i]);
        }
    });
    dz
}

/// Mean over labelled pixels of `-ln softmax(z)[label]`; 0 without any labelled pixel.
pub(crate) fn masked_cross_entropy(
    logits: &Tensor<4>,
    labels: &Tensor<3, Int>,
) -> Option<Tensor<1>> {
    let labels = int_values(labels)?;
    let [n, c, h, w] = logits.dims();
    assert_eq!(
        labels.len(),
        n * h * w,
        "labels [N, H, W] match the logits [N, C, H, W]"
    );
    assert!(
        labels
            .iter()
            .all(|&l| l == IGNORE_LABEL || (0..c as i64).contains(&l)),
        "labels lie in 0..{c} or are {IGNORE_LABEL}"
    );
    unary(logits, move |z: &HostTensor, wants_backward| {
        let shape = image_dims(z);
        let p = shape[2];
        let zv = z.values();
        let ls = log_sum_exp(zv, shape);
        // Per-image sums, added in image order: the same total whatever the thread count.
        let per_image: Vec<(f64, usize)> = (0..n)
            .into_par_iter()
            .map(|image| {
                let mut sum = 0.0f64;
                let mut count = 0usize;
                for pixel in 0..p {
                    let label = labels[image * p + pixel];
                    if label != IGNORE_LABEL {
                        let v = zv[(image * c + label as usize) * p + pixel];
                        sum += f64::from(ls[image * p + pixel] - v);
                        count += 1;
                    }
                }
                (sum, count)
            })
            .collect();
        let (sum, count) = per_image
            .iter()
            .fold((0.0, 0), |(s, k), &(si, ki)| (s + si, k + ki));
        let count = count.max(1);
        let backward = wants_backward.then(|| {
            let z = z.clone();
            Box::new(move |g: &[f32]| cross_entropy_backward(&z, &ls, &labels, g[0] / count as f32))
                as HostBackward
        });
        HostOutput {
            values: vec![(sum / count as f64) as f32],
            dims: [1],
            backward,
        }
    })
}

/// `dz_c = scale * (p_c - [c == label])` on labelled pixels, 0 elsewhere.
fn cross_entropy_backward(z: &HostTensor, ls: &[f32], labels: &[i64], scale: f32) -> Vec<f32> {
    let shape = image_dims(z);
    let [_, c, p] = shape;
    let zv = z.values();
    let mut dz = vec![0.0f32; zv.len()];
    for_each_row(&mut dz, shape, |n, class, out| {
        let row = &zv[(n * c + class) * p..][..p];
        let (ls, labels) = (&ls[n * p..][..p], &labels[n * p..][..p]);
        for i in 0..p {
            let label = labels[i];
            out[i] = if label == IGNORE_LABEL {
                0.0
            } else {
                let hit = if label == class as i64 { 1.0 } else { 0.0 };
                scale * ((row[i] - ls[i]).exp() - hit)
            };
        }
    });
    dz
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::{log_softmax, softmax};
    use burn::tensor::{Device, Int, Tensor, TensorData, Tolerance};

    use super::*;

    const SHAPE: [usize; 4] = [2, 5, 3, 7];

    /// Deterministic logits over a wide range, with pixels where one class dominates so much
    /// that the other classes' probabilities underflow to zero.
    fn logits(device: &Device) -> Tensor<4> {
        let len = SHAPE.iter().product::<usize>();
        let mut values: Vec<f32> = (0..len)
            .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 9.0)
            .collect();
        for pixel in 0..7 {
            values[2 * 21 + pixel] = 120.0;
        }
        Tensor::from_data(TensorData::new(values, SHAPE), device)
    }

    /// Upstream weights, so that every output element has its own gradient.
    fn weights<const D: usize>(dims: [usize; D], device: &Device) -> Tensor<D> {
        let len = dims.iter().product::<usize>();
        let values: Vec<f32> = (0..len)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0)
            .collect();
        Tensor::from_data(TensorData::new(values, dims), device)
    }

    fn labels(device: &Device) -> Tensor<3, Int> {
        let [n, c, h, w] = SHAPE;
        let values: Vec<i64> = (0..n * h * w)
            .map(|i| if i % 5 == 3 { 255 } else { (i * 7 % c) as i64 })
            .collect();
        Tensor::from_data(TensorData::new(values, [n, h, w]), device)
    }

    fn reference_self_information(z: Tensor<4>, norm: f64) -> Tensor<4> {
        (softmax(z.clone(), 1) * log_softmax(z, 1))
            .neg()
            .div_scalar(norm)
    }

    fn reference_cross_entropy(z: Tensor<4>, labels: Tensor<3, Int>) -> Tensor<1> {
        let log_p = log_softmax(z, 1);
        let ignored = labels.clone().equal_elem(IGNORE_LABEL);
        let valid = ignored.clone().bool_not().float();
        let picked: Tensor<3> = log_p
            .gather(1, labels.mask_fill(ignored, 0).unsqueeze_dim(1))
            .squeeze_dim(1);
        let count = valid.clone().sum().clamp_min(1.0);
        (picked * valid).sum().neg() / count
    }

    /// The values and input gradient of the fused `kernel` (which must take the fused path on
    /// flex) against `reference`, Burn's own ops with the gradients its autodiff derives.
    fn check<const D: usize>(
        kernel: impl Fn(&Tensor<4>) -> Option<Tensor<D>>,
        reference: impl Fn(Tensor<4>) -> Tensor<D>,
    ) {
        let device = Device::flex().autodiff();
        let z = logits(&device).require_grad();
        let got = kernel(&z).expect("the fused kernel runs on flex");
        let dims = got.dims();
        let upstream = weights(dims, &device);
        let got_grad = z
            .grad(&(got.clone() * upstream.clone()).sum().backward())
            .expect("a gradient");
        let z = logits(&device).require_grad();
        let want = reference(z.clone());
        let want_grad = z
            .grad(&(want.clone() * upstream).sum().backward())
            .expect("a gradient");
        let tolerance = Tolerance::absolute(1e-5);
        got.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), tolerance);
        got_grad
            .into_data()
            .assert_approx_eq::<f32>(&want_grad.into_data(), tolerance);
        // Untracked and plain flex take the same kernel, forward only.
        let plain = kernel(&logits(&Device::flex())).expect("the fused kernel runs on flex");
        assert_eq!(plain.dims(), dims);
    }

    #[test]
    fn self_information_values_and_gradient() {
        let norm = 5f64.ln();
        check(
            |z| self_information(z, norm),
            |z| reference_self_information(z, norm),
        );
    }

    #[test]
    fn masked_cross_entropy_values_and_gradient() {
        let device = Device::flex().autodiff();
        check(
            |z| masked_cross_entropy(z, &labels(&device)),
            |z| reference_cross_entropy(z, labels(&device)),
        );
    }

    #[test]
    fn cross_entropy_without_labelled_pixels_is_zero_with_zero_gradient() {
        let device = Device::flex().autodiff();
        let [n, _, h, w] = SHAPE;
        let none = Tensor::<3, Int>::full([n, h, w], IGNORE_LABEL, &device);
        let z = logits(&device).require_grad();
        let loss = masked_cross_entropy(&z, &none).expect("the fused kernel runs on flex");
        let grad = z.grad(&loss.clone().backward()).expect("a gradient");
        assert_eq!(loss.into_scalar::<f32>(), 0.0);
        assert_eq!(grad.abs().max().into_scalar::<f32>(), 0.0);
    }

    #[test]
    fn other_devices_and_dtypes_are_left_to_burn() {
        let z = logits(&Device::flex()).cast(burn::tensor::DType::F64);
        assert!(self_information(&z, 1.0).is_none());
    }
}
