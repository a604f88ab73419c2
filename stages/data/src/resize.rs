//! Resizing as ADVENT does it: bicubic for images, nearest neighbour for labels.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use crate::DataError;

/// Resizes an 8-bit RGB (HWC) image with a bicubic (Catmull-Rom, a = -0.5) convolution. Like
/// PIL's `BICUBIC`, the kernel widens when shrinking, so downscaling is antialiased.
pub fn resize_rgb_bicubic(
    src: &[u8],
    src_w: u32,
    src_h: u32,
    dst_w: u32,
    dst_h: u32,
) -> Result<Vec<u8>, DataError> {
    resize_rgb_bicubic_with(&mut Resizer::new(), src, src_w, src_h, dst_w, dst_h)
}

/// [`resize_rgb_bicubic`] with a caller-owned [`Resizer`], whose temporary buffer is then reused
/// from one image to the next instead of being allocated and zeroed every time.
pub(crate) fn resize_rgb_bicubic_with(
    resizer: &mut Resizer,
    src: &[u8],
    src_w: u32,
    src_h: u32,
    dst_w: u32,
    dst_h: u32,
) -> Result<Vec<u8>, DataError> {
    if (src_w, src_h) == (dst_w, dst_h) {
        return Ok(src.to_vec());
    }
    let fail = |e: &dyn std::fmt::Display| DataError::Config(format!("resize failed: {e}"));
    let src_img = ImageRef::new(src_w, src_h, src, PixelType::U8x3).map_err(|e| fail(&e))?;
    let mut dst_img = Image::new(dst_w, dst_h, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
    resizer
        .resize(&src_img, &mut dst_img, &options)
        .map_err(|e| fail(&e))?;
    Ok(dst_img.into_vec())
}

/// Resizes a single-channel label image by nearest neighbour, sampling at pixel centres (the
/// convention of PIL's `NEAREST`), so class ids are never blended.
pub fn resize_nearest(src: &[u8], src_w: u32, src_h: u32, dst_w: u32, dst_h: u32) -> Vec<u8> {
    if (src_w, src_h) == (dst_w, dst_h) {
        return src.to_vec();
    }
    let cols: Vec<usize> = (0..dst_w)
        .map(|x| nearest_source(x, src_w, dst_w))
        .collect();
    let mut out = Vec::with_capacity(dst_w as usize * dst_h as usize);
    for y in 0..dst_h {
        let row = &src[nearest_source(y, src_h, dst_h) * src_w as usize..][..src_w as usize];
        out.extend(cols.iter().map(|&x| row[x]));
    }
    out
}

/// The source row (or column) that [`resize_nearest`] samples for output row (column) `dst`.
pub(crate) fn nearest_source(dst: u32, src_len: u32, dst_len: u32) -> usize {
    let s = ((2 * dst as u64 + 1) * src_len as u64) / (2 * dst_len as u64);
    s.min(src_len as u64 - 1) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_halving_takes_one_pixel_of_each_block() {
        // 4x2 -> 2x1: centres at x = 1 and 3 of row 1.
        let src = [0, 1, 2, 3, 4, 5, 6, 7];
        assert_eq!(resize_nearest(&src, 4, 2, 2, 1), vec![5, 7]);
        // Upscaling repeats.
        assert_eq!(resize_nearest(&[9, 8], 2, 1, 4, 1), vec![9, 9, 8, 8]);
    }

    #[test]
    fn bicubic_keeps_flat_colour_and_shape() {
        let src: Vec<u8> = [10u8, 200, 30].repeat(64 * 32);
        let out = resize_rgb_bicubic(&src, 64, 32, 16, 8).unwrap();
        assert_eq!(out.len(), 16 * 8 * 3);
        assert!(out.chunks(3).all(|p| p == [10, 200, 30]));
    }
}
