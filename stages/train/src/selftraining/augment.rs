//! DACS's strong augmentation, applied after ClassMix (and by MIC to the target batch): colour
//! jitter and Gaussian blur, on host images in the training layout (BGR, minus
//! [`dag_data::MEAN_BGR`]).
//!
//! As in the references (`DACS:utils/transformsgpu.py`, `DAFormer:dacs_transforms.py`,
//! `MIC:masking_consistency_module.py`), whether the batch is jittered and whether it is blurred
//! are drawn once per batch. ClassMix's transform runs once per mixed image, so the jitter
//! factors, their order and the blur's sigma are drawn per image ([`StrongAugment::apply`]);
//! MIC's runs once on the target batch, so only the factors are drawn per image and the order
//! and the sigma once ([`StrongAugment::apply_to_batch`]). The jitter is kornia 0.5.8's
//! `ColorJitter` (the version DAFormer pins): in `[0, 1]` (the mean added back, divided by 255),
//! additive brightness, multiplicative contrast, saturation and hue in HSV, in a random order.
//! Like DACS, it runs on the channels as stored (BGR), which mirrors the hue circle; the hue draw
//! is symmetric, so the distribution of results is that of an RGB jitter. The blur is kornia's
//! `GaussianBlur2d` with reflect padding, computed separably.

use rand_core::RngCore;

use dag_data::Normalisation;

use super::mixing::{choose_distinct, uniform, uniform_in};

/// The switches of the strong augmentation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StrongAugment {
    /// Strength `s`: brightness, contrast and saturation factors in `[max(0, 1-s), 1+s]`, hue
    /// shift in `[-s, s]` (a fraction of the hue circle), as kornia's `ColorJitter(s, s, s, s)`.
    pub jitter_strength: f32,
    /// Probability that the batch is jittered.
    pub jitter_p: f32,
    /// Probability that the batch is blurred.
    pub blur_p: f32,
    /// How the images were normalised: the jitter runs on their colours on the 0..1 scale.
    pub input: Normalisation,
}

/// The draws of one image's colour jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JitterDraw {
    /// `x + (brightness - 1)`.
    pub brightness: f32,
    /// `x * contrast`.
    pub contrast: f32,
    /// HSV saturation times this.
    pub saturation: f32,
    /// Hue rotated by this fraction of the circle.
    pub hue: f32,
    /// The order the four run in: indices into (brightness, contrast, saturation, hue).
    pub order: [usize; 4],
}

/// Sigma range of the blur and the reference's kernel size rule.
pub const BLUR_SIGMA: (f32, f32) = (0.15, 1.15);

/// The odd kernel size the references use for a side of `side` pixels: the odd number nearest
/// a tenth of the side (`floor(ceil(0.1 s) - 0.5 + ceil(0.1 s) mod 2)`): 51 for 512, 103 for
/// 1024.
pub fn blur_kernel_size(side: usize) -> usize {
    let t = (0.1 * side as f64).ceil();
    ((t - 0.5 + t % 2.0).floor() as usize).max(1)
}

/// The normalised 1-D Gaussian of `size` taps centred on tap `size / 2`, as kornia's
/// `gaussian`.
pub fn gaussian_kernel(size: usize, sigma: f32) -> Vec<f32> {
    let half = (size / 2) as f32;
    let g: Vec<f32> = (0..size)
        .map(|i| {
            let x = i as f32 - half;
            (-(x * x) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let sum: f32 = g.iter().sum();
    g.into_iter().map(|v| v / sum).collect()
}

/// Reflect-padding index (`torch.nn.functional.pad(mode="reflect")`: the edge pixel is not
/// repeated), folded again for kernels wider than the image.
fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m < n as isize { m } else { period - m }) as usize
}

/// Blurs one `[h, w]` plane with the separable kernel `k` (rows, then columns), reflect padding.
pub fn blur_plane(plane: &mut [f32], [h, w]: [usize; 2], ky: &[f32], kx: &[f32]) {
    let (ry, rx) = ((ky.len() / 2) as isize, (kx.len() / 2) as isize);
    let mut tmp = vec![0f32; h * w];
    for y in 0..h {
        let row = &plane[y * w..(y + 1) * w];
        for x in 0..w {
            let mut acc = 0f32;
            for (j, &k) in kx.iter().enumerate() {
                acc += k * row[reflect(x as isize + j as isize - rx, w)];
            }
            tmp[y * w + x] = acc;
        }
    }
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0f32;
            for (j, &k) in ky.iter().enumerate() {
                acc += k * tmp[reflect(y as isize + j as isize - ry, h) * w + x];
            }
            plane[y * w + x] = acc;
        }
    }
}

/// Draws one image's jitter in kornia's order: brightness, contrast, hue, saturation, then the
/// order of the four operations.
pub fn draw_jitter(strength: f32, rng: &mut dyn RngCore) -> JitterDraw {
    let mut draw = draw_jitter_factors(strength, rng);
    draw.order = draw_jitter_order(rng);
    draw
}

/// The four factors of one image's jitter (brightness, contrast, hue, saturation), with the
/// identity order.
pub fn draw_jitter_factors(strength: f32, rng: &mut dyn RngCore) -> JitterDraw {
    let s = strength;
    let brightness = uniform_in(rng, (1.0 - s).max(0.0), (1.0 + s).min(2.0));
    let contrast = uniform_in(rng, (1.0 - s).max(0.0), 1.0 + s);
    let hue = uniform_in(rng, (-s).max(-0.5), s.min(0.5));
    let saturation = uniform_in(rng, (1.0 - s).max(0.0), 1.0 + s);
    JitterDraw {
        brightness,
        contrast,
        saturation,
        hue,
        order: [0, 1, 2, 3],
    }
}

/// The order of the four jitter operations, a uniform permutation.
pub fn draw_jitter_order(rng: &mut dyn RngCore) -> [usize; 4] {
    let picked = choose_distinct(rng, 4, 4);
    [picked[0], picked[1], picked[2], picked[3]]
}

/// kornia 0.5.8's `rgb_to_hsv`, with the hue as a fraction of the circle in `[0, 1)`.
fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let v = r.max(g).max(b);
    let delta = v - r.min(g).min(b);
    let s = delta / (v + 1e-6);
    let d = if delta == 0.0 { 1.0 } else { delta };
    let (rc, gc, bc) = (v - r, v - g, v - b);
    // The first channel holding the maximum decides, in the order R, G, B.
    let candidate = if r == v {
        bc - gc
    } else if g == v {
        2.0 * d + rc - bc
    } else {
        4.0 * d + gc - rc
    };
    let h = (candidate / d / 6.0).rem_euclid(1.0);
    (h, s, v)
}

/// kornia's `hsv_to_rgb`, for a hue given as a fraction of the circle (any sign).
fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = (h * 6.0).rem_euclid(6.0);
    let sector = h6.floor();
    let f = h6 - sector;
    let p = v * (1.0 - s);
    let q = v * (1.0 - f * s);
    let t = v * (1.0 - (1.0 - f) * s);
    match sector as i32 {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// Applies `draw` to one image in `[0, 1]`, planes `[3, h*w]` (the first plane as kornia's R).
pub fn color_jitter(img: &mut [f32], draw: &JitterDraw) {
    let plane = img.len() / 3;
    let (r, rest) = img.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for &op in &draw.order {
        match op {
            0 => {
                let offset = draw.brightness - 1.0;
                for v in r.iter_mut().chain(g.iter_mut()).chain(b.iter_mut()) {
                    *v = (*v + offset).clamp(0.0, 1.0);
                }
            }
            1 => {
                for v in r.iter_mut().chain(g.iter_mut()).chain(b.iter_mut()) {
                    *v = (*v * draw.contrast).clamp(0.0, 1.0);
                }
            }
            op => {
                for i in 0..plane {
                    let (mut h, mut s, v) = rgb_to_hsv(r[i], g[i], b[i]);
                    if op == 2 {
                        s = (s * draw.saturation).clamp(0.0, 1.0);
                    } else {
                        // C's fmod, as torch.fmod: the sign of the dividend.
                        h = (h + draw.hue) % 1.0;
                    }
                    (r[i], g[i], b[i]) = hsv_to_rgb(h, s, v);
                }
            }
        }
    }
}

/// One image's transform: `jitter` then a blur of `sigma`, on an image `[3, h, w]` normalised
/// as `input` says.
pub fn transform_image(
    image: &mut [f32],
    [h, w]: [usize; 2],
    input: &Normalisation,
    jitter: Option<&JitterDraw>,
    sigma: Option<f32>,
) {
    let plane = h * w;
    if let Some(draw) = jitter {
        // To [0, 1] in the stored channel order, as DACS does.
        let mut unit: Vec<f32> = image
            .iter()
            .enumerate()
            .map(|(i, &v)| input.to_unit(i / plane, v))
            .collect();
        color_jitter(&mut unit, draw);
        for (i, (o, v)) in image.iter_mut().zip(unit).enumerate() {
            *o = input.from_unit(i / plane, v);
        }
    }
    if let Some(sigma) = sigma {
        let ky = gaussian_kernel(blur_kernel_size(h), sigma);
        let kx = gaussian_kernel(blur_kernel_size(w), sigma);
        for channel in image.chunks_mut(plane) {
            blur_plane(channel, [h, w], &ky, &kx);
        }
    }
}

impl StrongAugment {
    /// Draws and applies the augmentation to a batch `[n, 3, h, w]` in place: the batch's two
    /// switches first, then per image its jitter and its sigma.
    pub fn apply(&self, images: &mut [f32], [n, c, h, w]: [usize; 4], rng: &mut dyn RngCore) {
        let jitter_on = uniform(rng) < self.jitter_p;
        let blur_on = uniform(rng) < self.blur_p;
        for img in images.chunks_mut(c * h * w).take(n) {
            let jitter = jitter_on.then(|| draw_jitter(self.jitter_strength, rng));
            let sigma = blur_on.then(|| uniform_in(rng, BLUR_SIGMA.0, BLUR_SIGMA.1));
            transform_image(img, [h, w], &self.input, jitter.as_ref(), sigma);
        }
    }

    /// Draws and applies the augmentation to a batch `[n, 3, h, w]` in place as one call of the
    /// reference transform: the batch's two switches, each image's jitter factors, then one
    /// order and one sigma for the whole batch.
    pub fn apply_to_batch(
        &self,
        images: &mut [f32],
        [n, c, h, w]: [usize; 4],
        rng: &mut dyn RngCore,
    ) {
        let jitter_on = uniform(rng) < self.jitter_p;
        let blur_on = uniform(rng) < self.blur_p;
        let mut draws: Vec<JitterDraw> = Vec::new();
        if jitter_on {
            draws = (0..n)
                .map(|_| draw_jitter_factors(self.jitter_strength, rng))
                .collect();
            let order = draw_jitter_order(rng);
            for d in &mut draws {
                d.order = order;
            }
        }
        let sigma = blur_on.then(|| uniform_in(rng, BLUR_SIGMA.0, BLUR_SIGMA.1));
        for (i, img) in images.chunks_mut(c * h * w).take(n).enumerate() {
            transform_image(img, [h, w], &self.input, draws.get(i), sigma);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_sizes_follow_the_reference_rule() {
        assert_eq!(blur_kernel_size(512), 51);
        assert_eq!(blur_kernel_size(1024), 103);
        assert_eq!(blur_kernel_size(80), 7);
        let k = gaussian_kernel(7, 1.0);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((k[0] - k[6]).abs() < 1e-9);
    }

    #[test]
    fn hsv_round_trips() {
        for &(r, g, b) in &[
            (0.2, 0.5, 0.9),
            (0.9, 0.1, 0.1),
            (0.3, 0.3, 0.3),
            (0.0, 1.0, 0.5),
        ] {
            let (h, s, v) = rgb_to_hsv(r, g, b);
            let (r2, g2, b2) = hsv_to_rgb(h, s, v);
            // kornia's 1e-6 in the saturation's denominator makes the trip slightly inexact.
            assert!((r - r2).abs() < 1e-5 && (g - g2).abs() < 1e-5 && (b - b2).abs() < 1e-5);
        }
    }

    #[test]
    fn reflect_padding_does_not_repeat_the_edge() {
        assert_eq!(reflect(-1, 5), 1);
        assert_eq!(reflect(5, 5), 3);
        assert_eq!(reflect(-6, 5), 2);
    }
}
