//! Pictures for people: a perceptual colormap for per-pixel values (entropy heat maps) and
//! overlays of a colour label map on an image.

/// Anchor colours of a viridis-like map at t = 0, 1/8, ..., 1: dark blue through teal to yellow.
/// Lightness rises monotonically, so the map reads correctly in grey scale and for colour-blind
/// readers, unlike a rainbow map; nine anchors interpolated linearly stay within a few levels of
/// the full 256-entry table.
const VIRIDIS_ANCHORS: [[u8; 3]; 9] = [
    [68, 1, 84],
    [71, 44, 122],
    [59, 81, 139],
    [44, 113, 142],
    [33, 144, 141],
    [39, 173, 129],
    [92, 200, 99],
    [170, 220, 50],
    [253, 231, 37],
];

/// The colour of `t` in [0, 1] (clamped; NaN maps to 0) on the viridis-like map.
pub fn viridis(t: f32) -> [u8; 3] {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let x = t * (VIRIDIS_ANCHORS.len() - 1) as f32;
    let i = (x.floor() as usize).min(VIRIDIS_ANCHORS.len() - 2);
    let f = x - i as f32;
    let (a, b) = (VIRIDIS_ANCHORS[i], VIRIDIS_ANCHORS[i + 1]);
    std::array::from_fn(|c| (a[c] as f32 + (b[c] as f32 - a[c] as f32) * f).round() as u8)
}

/// A 256-entry lookup table of [`viridis`], for colouring many pixels quickly.
pub fn viridis_lut() -> [[u8; 3]; 256] {
    std::array::from_fn(|k| viridis(k as f32 / 255.0))
}

/// Colours values in [0, 1] (e.g. normalised entropy) as RGB HWC bytes with [`viridis`].
pub fn heatmap(values: &[f32]) -> Vec<u8> {
    let lut = viridis_lut();
    values
        .iter()
        .flat_map(|&v| {
            let v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
            lut[(v * 255.0).round() as usize]
        })
        .collect()
}

/// Blends `top` over `base` (both RGB HWC of the same size): `alpha * top + (1 - alpha) * base`.
/// Pixels where `mask` (one per pixel, when given) is false keep the base, so ignored label
/// pixels do not darken the image.
pub fn blend(base: &[u8], top: &[u8], alpha: f32, mask: Option<&[bool]>) -> Vec<u8> {
    assert_eq!(base.len(), top.len(), "blend needs images of the same size");
    let a = alpha.clamp(0.0, 1.0);
    base.chunks_exact(3)
        .zip(top.chunks_exact(3))
        .enumerate()
        .flat_map(|(i, (b, t))| {
            let on = mask.is_none_or(|m| m[i]);
            let px: [u8; 3] = std::array::from_fn(|c| {
                if on {
                    (a * t[c] as f32 + (1.0 - a) * b[c] as f32).round() as u8
                } else {
                    b[c]
                }
            });
            px
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lightness(c: [u8; 3]) -> f32 {
        0.2126 * c[0] as f32 + 0.7152 * c[1] as f32 + 0.0722 * c[2] as f32
    }

    #[test]
    fn viridis_ends_and_rises_in_lightness() {
        assert_eq!(viridis(0.0), VIRIDIS_ANCHORS[0]);
        assert_eq!(viridis(1.0), VIRIDIS_ANCHORS[8]);
        assert_eq!(viridis(-3.0), viridis(0.0));
        assert_eq!(viridis(f32::NAN), viridis(0.0));
        let lut = viridis_lut();
        for k in 1..256 {
            assert!(
                lightness(lut[k]) >= lightness(lut[k - 1]) - 0.5,
                "lightness drops at {k}: {:?} -> {:?}",
                lut[k - 1],
                lut[k]
            );
        }
    }

    #[test]
    fn heatmap_and_blend() {
        let h = heatmap(&[0.0, 1.0, 2.0]);
        assert_eq!(&h[..3], &VIRIDIS_ANCHORS[0]);
        assert_eq!(&h[3..6], &VIRIDIS_ANCHORS[8]);
        assert_eq!(&h[6..9], &VIRIDIS_ANCHORS[8]);
        let base = [100u8, 100, 100, 0, 0, 0];
        let top = [200u8, 0, 100, 255, 255, 255];
        assert_eq!(
            blend(&base, &top, 0.5, None),
            vec![150, 50, 100, 128, 128, 128]
        );
        assert_eq!(
            blend(&base, &top, 0.5, Some(&[false, true])),
            vec![100, 100, 100, 128, 128, 128]
        );
    }
}
