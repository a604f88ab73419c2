//! IntraDA's entropy score on hand-made probabilities, and how the rare-class normalisation
//! reorders images, computed by hand from the formulas in methods.md.

use burn::tensor::{Device, Tensor, TensorData};
use dag_metrics::ranking::{count_rare_present, normalized_score, rank_and_split, RARE_CLASSES_19};
use dag_stages::score::score_probabilities;

const C: usize = 19;

/// A probability vector: `top` on class `argmax`, the rest spread evenly.
fn pixel(argmax: usize, top: f64) -> Vec<f64> {
    let rest = (1.0 - top) / (C - 1) as f64;
    (0..C)
        .map(|c| if c == argmax { top } else { rest })
        .collect()
}

/// `-sum_c p log2(p) / log2(C)` of one pixel, summed over classes, divided by C (the score is a
/// mean over classes as well as pixels).
fn expected_pixel_term(p: &[f64]) -> f64 {
    p.iter()
        .map(|&q| -q * (q + 1e-30).log2() / (C as f64).log2())
        .sum::<f64>()
        / C as f64
}

#[test]
fn score_and_normalisation_follow_the_formulas() {
    // Two images of 2x2 pixels. A: confident (0.9) on common classes (road, building, sky,
    // car). B: less confident (0.88) and three of its pixels are rare classes (pole, light, sign).
    let a: Vec<Vec<f64>> = [0, 2, 10, 13].iter().map(|&c| pixel(c, 0.9)).collect();
    let b: Vec<Vec<f64>> = [5, 6, 7, 0].iter().map(|&c| pixel(c, 0.88)).collect();
    // [N, C, H, W] layout.
    let mut data = vec![0f32; 2 * C * 4];
    for (n, img) in [&a, &b].iter().enumerate() {
        for (px, probs) in img.iter().enumerate() {
            for (c, &q) in probs.iter().enumerate() {
                data[n * C * 4 + c * 4 + px] = q as f32;
            }
        }
    }
    let device = Device::flex();
    let p = Tensor::<4>::from_data(TensorData::new(data, [2, C, 2, 2]), &device);
    let scored = score_probabilities(p);

    for (img, s) in [&a, &b].iter().zip(&scored) {
        let expected: f64 = img.iter().map(|p| expected_pixel_term(p)).sum::<f64>() / 4.0;
        assert!(
            (s.score - expected).abs() < 1e-6,
            "score {} expected {expected}",
            s.score
        );
    }
    assert_eq!(scored[0].prediction, vec![0, 2, 10, 13]);
    assert_eq!(scored[1].prediction, vec![5, 6, 7, 0]);

    // Raw scores: A (more confident) ranks first.
    let raw = [scored[0].score, scored[1].score];
    assert!(raw[0] < raw[1]);
    assert_eq!(rank_and_split(&raw, 0.5), (vec![0, 1], 1));

    // Normalised: A has no rare class (x 1.5), B has three (x (8/11 + 0.5)); B ranks first.
    let k = [
        count_rare_present(&scored[0].prediction, &RARE_CLASSES_19),
        count_rare_present(&scored[1].prediction, &RARE_CLASSES_19),
    ];
    assert_eq!(k, [0, 3]);
    let norm = [
        normalized_score(raw[0], k[0]),
        normalized_score(raw[1], k[1]),
    ];
    assert!((norm[0] - raw[0] * 1.5).abs() < 1e-12);
    assert!((norm[1] - raw[1] * (8.0 / 11.0 + 0.5)).abs() < 1e-12);
    assert_eq!(rank_and_split(&norm, 0.5), (vec![1, 0], 1));
}
