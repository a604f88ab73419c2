//! IntraDA's entropy ranking: the optional rare-class normalisation of an image's score and the
//! easy/hard split (methods.md §2).

/// Rare classes (19-class trainIds) whose presence in an image's argmax map lowers the
/// normalised score: wall, fence, pole, light, sign, terrain, rider, truck, bus, train, motorcycle.
pub const RARE_CLASSES_19: [u8; 11] = [3, 4, 5, 6, 7, 9, 12, 14, 15, 16, 17];

/// The same rare classes in the 16-class SYNTHIA protocol (terrain, truck and train do not exist
/// there): wall, fence, pole, light, sign, rider, bus, motorcycle.
pub const RARE_CLASSES_16: [u8; 8] = [3, 4, 5, 6, 7, 11, 13, 14];

/// The rare classes of a protocol of `classes` classes (19 or 16); `None` for any other protocol.
pub fn rare_classes(classes: usize) -> Option<&'static [u8]> {
    match classes {
        19 => Some(&RARE_CLASSES_19),
        16 => Some(&RARE_CLASSES_16),
        _ => None,
    }
}

/// `R * ((11 - k) / 11 + 0.5)` where `k` is the number of distinct rare classes present.
/// The constant 11 is the size of the 19-class rare set, kept for every protocol as in the paper.
pub fn normalized_score(score: f64, rare_present: usize) -> f64 {
    score * ((11.0 - rare_present as f64) / 11.0 + 0.5)
}

/// Number of distinct rare classes that occur in an argmax map.
pub fn count_rare_present(prediction: &[u8], rare: &[u8]) -> usize {
    let mut seen = [false; 256];
    for &p in prediction {
        seen[p as usize] = true;
    }
    rare.iter().filter(|&&c| seen[c as usize]).count()
}

/// Ranks images by ascending score (ties keep input order) and splits them: the first
/// `floor(N * lambda)` are easy, the rest hard. Returns `(ranked, easy_count)` where `ranked`
/// holds input indices in rank order.
///
/// # Panics
/// If a score is NaN: the caller must reject NaN scores with a message naming the image.
pub fn rank_and_split(scores: &[f64], lambda: f64) -> (Vec<usize>, usize) {
    let mut ranked: Vec<usize> = (0..scores.len()).collect();
    ranked.sort_by(|&a, &b| {
        scores[a]
            .partial_cmp(&scores[b])
            .expect("NaN entropy score")
    });
    // `int(N * lambda)` as the reference does, computed in f64 like Python's float.
    let easy = ((scores.len() as f64) * lambda).floor() as usize;
    (ranked, easy.min(scores.len()))
}

/// Ranks from 1 in ascending order, ties sharing the mean of their positions (as SciPy's
/// `rankdata`). NaN values are not allowed.
pub fn average_ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        // Positions i..=j (0-based) share the rank (i + j) / 2 + 1.
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        i = j + 1;
    }
    ranks
}

/// Spearman's rank correlation of two equally long samples: Pearson's correlation of their
/// average ranks. `None` with fewer than two pairs or when either sample is constant.
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    assert_eq!(a.len(), b.len(), "spearman needs pairs");
    if a.len() < 2 {
        return None;
    }
    let (ra, rb) = (average_ranks(a), average_ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in ra.iter().zip(&rb) {
        cov += (x - ma) * (y - mb);
        va += (x - ma) * (x - ma);
        vb += (y - mb) * (y - mb);
    }
    if va == 0.0 || vb == 0.0 {
        return None;
    }
    Some(cov / (va * vb).sqrt())
}

#[cfg(test)]
mod tests {
    #[test]
    fn spearman_matches_hand_computed_values() {
        // Perfectly monotone (not linear) -> 1; reversed -> -1.
        let a = [1.0, 2.0, 3.0, 4.0];
        assert!((spearman(&a, &[1.0, 4.0, 9.0, 100.0]).unwrap() - 1.0).abs() < 1e-12);
        assert!((spearman(&a, &[4.0, 3.0, 2.0, 1.0]).unwrap() + 1.0).abs() < 1e-12);
        // Ties: ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]; against [1, 2, 3, 4] that is
        // cov 4.5 / sqrt(4.5 * 5) = 0.9486832980505138 (computed by hand).
        let r = spearman(&[1.0, 2.0, 2.0, 3.0], &a).unwrap();
        assert!((r - 0.948_683_298_050_513_8).abs() < 1e-12, "{r}");
        assert_eq!(average_ranks(&[3.0, 1.0, 3.0]), vec![2.5, 1.0, 2.5]);
        assert!(spearman(&[1.0, 1.0], &[1.0, 2.0]).is_none());
    }

    use super::*;

    #[test]
    fn split_count_is_int_of_n_times_lambda() {
        // GTA5 -> Cityscapes: 2975 train images at lambda 0.67 give 1993 easy / 982 hard.
        let scores: Vec<f64> = (0..2975).map(|i| (i * 7919 % 2975) as f64).collect();
        let (ranked, easy) = rank_and_split(&scores, 0.67);
        assert_eq!(easy, 1993);
        assert_eq!(ranked.len() - easy, 982);
        assert!(ranked.windows(2).all(|w| scores[w[0]] <= scores[w[1]]));
        assert_eq!(rank_and_split(&[1.0, 2.0, 3.0], 1.0).1, 3);
        assert_eq!(rank_and_split(&[1.0, 2.0, 3.0], 0.5).1, 1);
    }

    #[test]
    fn ties_keep_input_order() {
        let (ranked, _) = rank_and_split(&[0.5, 0.1, 0.5, 0.1], 0.5);
        assert_eq!(ranked, vec![1, 3, 0, 2]);
    }

    #[test]
    fn normalisation_follows_the_formula_and_can_reorder() {
        assert!((normalized_score(1.0, 0) - 1.5).abs() < 1e-12);
        assert!((normalized_score(1.0, 11) - 0.5).abs() < 1e-12);
        // Image A is more certain than B, but B shows three rare classes: normalised, B is easier.
        let a = 0.40;
        let b = 0.45;
        let pred_a = [0u8, 1, 2, 8, 10];
        let pred_b = [0u8, 3, 4, 5, 10];
        let ka = count_rare_present(&pred_a, &RARE_CLASSES_19);
        let kb = count_rare_present(&pred_b, &RARE_CLASSES_19);
        assert_eq!((ka, kb), (0, 3));
        let raw = rank_and_split(&[a, b], 0.5).0;
        let norm = rank_and_split(&[normalized_score(a, ka), normalized_score(b, kb)], 0.5).0;
        assert_eq!(raw, vec![0, 1]);
        assert_eq!(norm, vec![1, 0]);
    }

    #[test]
    fn rare_sets_by_protocol() {
        assert_eq!(rare_classes(19).unwrap().len(), 11);
        assert_eq!(rare_classes(16).unwrap(), &RARE_CLASSES_16);
        assert!(rare_classes(13).is_none());
    }
}
