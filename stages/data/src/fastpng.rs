//! A PNG decoder for the formats that preprocessing meets almost always: non-interlaced 8-bit
//! grayscale, RGB and palette images, decoded into buffers that a worker reuses from one sample
//! to the next.
//!
//! It is an accelerator only. It returns `None` for anything else, and for anything it does not
//! fully understand (a bad CRC, a truncated stream, an unknown critical chunk, an I/O error), and
//! the caller then decodes with [`crate::pngio`], which gives the same pixels or the real error.
//! Compared with the general decoders it avoids zeroing and page-faulting fresh buffers for every
//! image, and its Paeth unfiltering skips runs where a row repeats the one above (most of a label
//! image), which the general decoders compute byte by byte.

use std::io::Read;
use std::path::Path;

/// PNG colour types handled here.
pub(crate) const GRAY: u8 = 0;
pub(crate) const RGB: u8 = 2;
pub(crate) const INDEXED: u8 = 3;

/// Larger images go through the general decoders (and their limits).
const MAX_BYTES: usize = 1 << 29;

/// Inflated bytes per call of the decompressor.
const STEP: usize = 1 << 18;

/// The header of a decoded image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub width: usize,
    pub height: usize,
    /// One of [`GRAY`], [`RGB`], [`INDEXED`].
    pub color: u8,
}

impl Header {
    /// Bytes per pixel (the depth is always 8 bits).
    pub fn bpp(&self) -> usize {
        if self.color == RGB {
            3
        } else {
            1
        }
    }

    /// Bytes per row, without the filter byte.
    pub fn stride(&self) -> usize {
        self.width * self.bpp()
    }

    /// Bytes of filtered image data (a filter byte and `stride` bytes per row).
    fn filtered_len(&self) -> usize {
        (self.stride() + 1) * self.height
    }
}

/// Buffers reused from one image to the next.
#[derive(Default)]
pub(crate) struct PngBuffers {
    file: Vec<u8>,
    idat: Vec<(usize, usize)>,
    /// The inflated, still filtered rows (one filter byte + `stride` bytes each).
    filtered: Vec<u8>,
    rows: [Vec<u8>; 2],
}

fn be32(b: &[u8]) -> usize {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
}

/// Reads `path` and inflates its image data into `buf.filtered`, if it is a non-interlaced 8-bit
/// image of a colour type that `accept` takes.
fn inflate(path: &Path, buf: &mut PngBuffers, accept: &dyn Fn(u8) -> bool) -> Option<Header> {
    buf.file.clear();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf.file))
        .ok()?;
    let bytes = &buf.file[..];
    if bytes.len() < 8 || bytes[..8] != [137, 80, 78, 71, 13, 10, 26, 10] {
        return None;
    }
    buf.idat.clear();
    let mut header = None;
    let mut palette = false;
    let mut p = 8;
    loop {
        let len = be32(bytes.get(p..p + 4)?);
        let end = p.checked_add(12)?.checked_add(len)?;
        let chunk = bytes.get(p + 4..end)?;
        let (kind, data, crc) = (&chunk[..4], &chunk[4..4 + len], &chunk[4 + len..]);
        if crc32fast::hash(&chunk[..4 + len]) != be32(crc) as u32 {
            return None;
        }
        match kind {
            b"IHDR" if header.is_none() && len == 13 => {
                let (w, h) = (be32(&data[0..4]), be32(&data[4..8]));
                let (depth, color) = (data[8], data[9]);
                // compression, filter method, interlace
                if depth != 8 || !accept(color) || data[10..13] != [0, 0, 0] || w == 0 || h == 0 {
                    return None;
                }
                header = Some(Header {
                    width: w,
                    height: h,
                    color,
                });
            }
            _ if header.is_none() => return None,
            b"PLTE" => palette = true,
            b"IDAT" => buf.idat.push((p + 8, p + 8 + len)),
            b"IEND" => break,
            // Image data must be consecutive: the first other chunk ends it.
            _ if !buf.idat.is_empty() => break,
            b"IHDR" => return None,
            // An unknown critical chunk.
            k if k[0].is_ascii_uppercase() => return None,
            _ => {}
        }
        p = end;
    }
    let header = header?;
    if buf.idat.is_empty() || (header.color == INDEXED && !palette) {
        return None;
    }
    let size = header
        .stride()
        .checked_add(1)?
        .checked_mul(header.height)
        .filter(|&s| s <= MAX_BYTES)?;
    // Every byte up to `size` is written by the inflater below, so stale contents do not
    // matter; the buffer never shrinks, as images and labels of different sizes take turns.
    if buf.filtered.len() < size {
        buf.filtered.resize(size, 0);
    }
    let filtered = &mut buf.filtered[..size];
    let mut d = fdeflate::Decompressor::new();
    d.ignore_adler32();
    let mut pos = 0;
    for &(start, end) in &buf.idat {
        let mut input = &bytes[start..end];
        while !input.is_empty() && pos < size && !d.is_done() {
            // At most `STEP` bytes per call: fdeflate hashes the output of the call that reaches
            // the end of the stream even when told to ignore the checksum.
            let limit = (pos + STEP).min(size);
            let (used, made) = d.read(input, &mut filtered[..limit], pos, false).ok()?;
            input = &input[used..];
            pos += made;
            if used == 0 && made == 0 {
                break;
            }
        }
    }
    if pos < size && !d.is_done() {
        pos += d.read(&[], filtered, pos, true).ok()?.1;
    }
    (pos == size).then_some(header)
}

/// Decodes an RGB PNG into `rgb` (HWC, resized to fit), or `None` (see the module docs).
pub(crate) fn decode_rgb(path: &Path, buf: &mut PngBuffers, rgb: &mut Vec<u8>) -> Option<Header> {
    let h = inflate(path, buf, &|c| c == RGB)?;
    let stride = h.stride();
    rgb.resize(stride * h.height, 0);
    let zero = vec![0u8; stride];
    let filtered = &buf.filtered[..h.filtered_len()];
    for (y, row) in filtered.chunks_exact(stride + 1).enumerate() {
        let (done, rest) = rgb.split_at_mut(y * stride);
        let prev = if y == 0 {
            &zero[..]
        } else {
            &done[(y - 1) * stride..]
        };
        unfilter::<3>(row[0], prev, &row[1..], &mut rest[..stride])?;
    }
    Some(h)
}

/// Decodes a grayscale or palette PNG and calls `row(header, y, ids)` for every row, top to
/// bottom, with the raw ids (palette indices, not colours), or returns `None` (see the module
/// docs) before calling it at all.
pub(crate) fn decode_ids(
    path: &Path,
    buf: &mut PngBuffers,
    mut row: impl FnMut(&Header, usize, &[u8]),
) -> Option<Header> {
    let h = inflate(path, buf, &|c| c == GRAY || c == INDEXED)?;
    let w = h.width;
    // Check every filter type first, so that `row` sees a complete image or nothing.
    let filtered = &buf.filtered[..h.filtered_len()];
    if filtered.chunks_exact(w + 1).any(|r| r[0] > 4) {
        return None;
    }
    let [prev, cur] = &mut buf.rows;
    prev.clear();
    prev.resize(w, 0);
    cur.resize(w, 0);
    for (y, f) in filtered.chunks_exact(w + 1).enumerate() {
        unfilter::<1>(f[0], prev, &f[1..], cur).expect("filter types checked above");
        row(&h, y, cur);
        std::mem::swap(prev, cur);
    }
    Some(h)
}

#[inline(always)]
fn paeth(a: u8, b: u8, c: u8) -> u8 {
    let (ia, ib, ic) = (a as i16, b as i16, c as i16);
    let pa = (ib - ic).abs();
    let pb = (ia - ic).abs();
    let pc = (ia + ib - 2 * ic).abs();
    if pa <= pb && pa <= pc {
        a
    } else if pb <= pc {
        b
    } else {
        c
    }
}

/// Reverses the PNG row filter `filter` of one row: `cur` is the filtered row, `prev` the
/// previous unfiltered row (zeros for the first one), `out` receives the unfiltered row. All
/// three have the same length, a multiple of `BPP` (bytes per pixel). `None` for a filter type
/// that does not exist.
pub(crate) fn unfilter<const BPP: usize>(
    filter: u8,
    prev: &[u8],
    cur: &[u8],
    out: &mut [u8],
) -> Option<()> {
    let n = out.len();
    let (prev, cur) = (&prev[..n], &cur[..n]);
    match filter {
        0 => out.copy_from_slice(cur),
        1 => {
            let mut a = [0u8; BPP];
            for (o, c) in out.chunks_exact_mut(BPP).zip(cur.chunks_exact(BPP)) {
                for k in 0..BPP {
                    a[k] = c[k].wrapping_add(a[k]);
                    o[k] = a[k];
                }
            }
        }
        2 => {
            for ((o, &c), &b) in out.iter_mut().zip(cur).zip(prev) {
                *o = c.wrapping_add(b);
            }
        }
        3 => {
            let mut a = [0u8; BPP];
            for ((o, c), b) in out
                .chunks_exact_mut(BPP)
                .zip(cur.chunks_exact(BPP))
                .zip(prev.chunks_exact(BPP))
            {
                for k in 0..BPP {
                    a[k] = c[k].wrapping_add(((a[k] as u16 + b[k] as u16) >> 1) as u8);
                    o[k] = a[k];
                }
            }
        }
        4 => paeth_row::<BPP>(prev, cur, out),
        _ => return None,
    }
    Some(())
}

/// Paeth unfiltering, with two shortcuts for blocks of zero filter bytes (most of a label
/// image): where the pixel to the left equals the one above it (a == c), the predictor is the
/// pixel above (b) and the block repeats the row above; where the row above is constant and
/// equal to c (so b == c), the predictor is the pixel to the left (a) and the block repeats it.
/// Either way the state at the end of the block is known without computing each byte.
fn paeth_row<const BPP: usize>(prev: &[u8], cur: &[u8], out: &mut [u8]) {
    let block = 16 * BPP;
    let n = out.len();
    let mut a = [0u8; BPP];
    let mut c = [0u8; BPP];
    let mut i = 0;
    while i < n {
        let end = (i + block).min(n);
        let (p, f, o) = (&prev[i..end], &cur[i..end], &mut out[i..end]);
        let zero = f.iter().fold(0, |acc, &x| acc | x) == 0;
        if zero && a == c {
            o.copy_from_slice(p);
            a.copy_from_slice(&p[p.len() - BPP..]);
            c = a;
        } else if zero && p.chunks_exact(BPP).all(|b| b == c) {
            for px in o.chunks_exact_mut(BPP) {
                px.copy_from_slice(&a);
            }
        } else {
            for ((o, f), b) in o
                .chunks_exact_mut(BPP)
                .zip(f.chunks_exact(BPP))
                .zip(p.chunks_exact(BPP))
            {
                for k in 0..BPP {
                    a[k] = f[k].wrapping_add(paeth(a[k], b[k], c[k]));
                    o[k] = a[k];
                    c[k] = b[k];
                }
            }
        }
        i = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_paeth(a: u8, b: u8, c: u8) -> u8 {
        // The PNG specification's formulation.
        let p = a as i32 + b as i32 - c as i32;
        let (pa, pb, pc) = (
            (p - a as i32).abs(),
            (p - b as i32).abs(),
            (p - c as i32).abs(),
        );
        if pa <= pb && pa <= pc {
            a
        } else if pb <= pc {
            b
        } else {
            c
        }
    }

    fn reference_unfilter(filter: u8, bpp: usize, prev: &[u8], cur: &[u8]) -> Vec<u8> {
        let mut out = cur.to_vec();
        for i in 0..out.len() {
            let a = if i >= bpp { out[i - bpp] } else { 0 };
            let c = if i >= bpp { prev[i - bpp] } else { 0 };
            let b = prev[i];
            let pred = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => ((a as u16 + b as u16) / 2) as u8,
                _ => reference_paeth(a, b, c),
            };
            out[i] = cur[i].wrapping_add(pred);
        }
        out
    }

    #[test]
    fn paeth_matches_the_specification() {
        for a in (0..=255u8).step_by(3) {
            for b in (0..=255u8).step_by(5) {
                for c in 0..=255u8 {
                    assert_eq!(paeth(a, b, c), reference_paeth(a, b, c), "{a} {b} {c}");
                }
            }
        }
    }

    #[test]
    fn every_filter_matches_the_specification_with_and_without_zero_runs() {
        let mut state = 12345u32;
        let mut rnd = move || {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 24) as u8
        };
        for n in [3usize, 48, 51, 99, 300] {
            for trial in 0..40 {
                // Piecewise-constant rows with sparse filter bytes: the fast paths' case.
                let prev: Vec<u8> = (0..n)
                    .map(|i| match trial % 3 {
                        0 => rnd(),
                        1 => (i / 37) as u8,
                        _ => (i / 100) as u8 * 50,
                    })
                    .collect();
                let cur: Vec<u8> = (0..n)
                    .map(|_| if rnd() < 240 - trial * 5 { 0 } else { rnd() })
                    .collect();
                for filter in 0..5 {
                    let mut out = vec![0; n];
                    unfilter::<3>(filter, &prev, &cur, &mut out).unwrap();
                    assert_eq!(out, reference_unfilter(filter, 3, &prev, &cur));
                    unfilter::<1>(filter, &prev, &cur, &mut out).unwrap();
                    assert_eq!(out, reference_unfilter(filter, 1, &prev, &cur));
                }
                assert!(unfilter::<1>(5, &prev, &cur, &mut vec![0; n]).is_none());
            }
        }
    }

    /// Encodes `data` with `png` itself under a filter and compression, then checks that the
    /// fast path decodes it to what the general decoders give.
    fn roundtrip(color: png::ColorType, w: u32, h: u32, data: &[u8]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.png");
        let filters = [
            png::Filter::NoFilter,
            png::Filter::Sub,
            png::Filter::Up,
            png::Filter::Avg,
            png::Filter::Paeth,
            png::Filter::Adaptive,
        ];
        let compressions = [
            png::Compression::NoCompression,
            png::Compression::Fast,
            png::Compression::High,
        ];
        for filter in filters {
            for compression in compressions {
                let mut enc = png::Encoder::new(std::fs::File::create(&path).unwrap(), w, h);
                enc.set_color(color);
                enc.set_depth(png::BitDepth::Eight);
                if color == png::ColorType::Indexed {
                    enc.set_palette(vec![7u8; 256 * 3]);
                }
                enc.set_compression(compression);
                enc.set_filter(filter);
                let mut wr = enc.write_header().unwrap();
                wr.write_image_data(data).unwrap();
                wr.finish().unwrap();

                let mut buf = PngBuffers::default();
                let what = format!("{color:?} {filter:?} {compression:?}");
                if color == png::ColorType::Rgb {
                    let mut rgb = Vec::new();
                    let head = decode_rgb(&path, &mut buf, &mut rgb).expect(&what);
                    assert_eq!((head.width, head.height), (w as usize, h as usize));
                    let want = crate::pngio::read_rgb(&path).unwrap();
                    assert_eq!(rgb, want.data, "{what}");
                } else {
                    let mut ids = Vec::new();
                    decode_ids(&path, &mut buf, |_, _, row| ids.extend_from_slice(row))
                        .expect(&what);
                    let mut identity = [0u8; 256];
                    identity
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, v)| *v = i as u8);
                    let lut = crate::protocol::LabelLut(identity);
                    let enc = crate::pngio::LabelEncoding::Ids;
                    let want = crate::pngio::read_label(&path, enc, &lut).unwrap();
                    assert_eq!(ids, want.data, "{what}");
                }
            }
        }
    }

    #[test]
    fn decodes_like_the_general_decoders_for_every_filter_and_compression() {
        let (w, h) = (67u32, 41u32);
        let mut state = 99u32;
        let mut rnd = move || {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 24) as u8
        };
        // Smooth gradients with noise, and label-like blocks with moving boundaries.
        let rgb: Vec<u8> = (0..w * h * 3)
            .map(|i| ((i % (w * 3)) as u8).wrapping_mul(3) ^ (rnd() & 7))
            .collect();
        roundtrip(png::ColorType::Rgb, w, h, &rgb);
        let ids: Vec<u8> = (0..w * h)
            .map(|i| ((i % w + i / w / 3) / 9) as u8 * 7)
            .collect();
        roundtrip(png::ColorType::Grayscale, w, h, &ids);
        roundtrip(png::ColorType::Indexed, w, h, &ids);
        let noise: Vec<u8> = (0..w * h).map(|_| rnd()).collect();
        roundtrip(png::ColorType::Grayscale, w, h, &noise);
    }

    #[test]
    fn refuses_what_it_does_not_handle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.png");
        let mut buf = PngBuffers::default();
        let mut rgb = Vec::new();
        let data = vec![9u8; 8 * 4 * 3];
        crate::pngio::write_rgb_png(&path, 8, 4, &data).unwrap();
        assert!(decode_rgb(&path, &mut buf, &mut rgb).is_some());
        assert_eq!(rgb, data);
        // An RGB image is not an id image.
        assert!(decode_ids(&path, &mut buf, |_, _, _| panic!()).is_none());
        // Truncated, corrupted (CRC) and missing files.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 20]).unwrap();
        assert!(decode_rgb(&path, &mut buf, &mut rgb).is_none());
        let mut bad = bytes.clone();
        bad[40] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(decode_rgb(&path, &mut buf, &mut rgb).is_none());
        assert!(decode_rgb(&dir.path().join("none.png"), &mut buf, &mut rgb).is_none());
        // 16-bit images go to the general decoder.
        let wide = vec![1u8; 8 * 4 * 6];
        let (rgb16, d16) = (png::ColorType::Rgb, png::BitDepth::Sixteen);
        crate::pngio::write_png(&path, 8, 4, rgb16, d16, &wide).unwrap();
        assert!(decode_rgb(&path, &mut buf, &mut rgb).is_none());
    }

    #[test]
    fn large_images_split_over_many_idat_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.png");
        // More than `STEP` bytes of image data.
        let (w, h) = (700u32, 300u32);
        let data: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 / 5 % 251) as u8).collect();
        crate::pngio::write_rgb_png(&path, w, h, &data).unwrap();
        // Re-split the image data into IDAT chunks of 1000 bytes.
        let bytes = std::fs::read(&path).unwrap();
        let (mut head, mut idat, mut p) = (bytes[..8].to_vec(), Vec::new(), 8);
        while p < bytes.len() {
            let len = be32(&bytes[p..]);
            match &bytes[p + 4..p + 8] {
                b"IDAT" => idat.extend_from_slice(&bytes[p + 8..p + 8 + len]),
                b"IEND" => {}
                _ => head.extend_from_slice(&bytes[p..p + 12 + len]),
            }
            p += 12 + len;
        }
        let chunk = |out: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let start = out.len();
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            let crc = crc32fast::hash(&out[start..]);
            out.extend_from_slice(&crc.to_be_bytes());
        };
        for part in idat.chunks(1000) {
            chunk(&mut head, b"IDAT", part);
        }
        chunk(&mut head, b"IEND", &[]);
        assert!(idat.len() > 10_000);
        std::fs::write(&path, &head).unwrap();
        let (mut buf, mut rgb) = (PngBuffers::default(), Vec::new());
        assert!(decode_rgb(&path, &mut buf, &mut rgb).is_some());
        assert_eq!(rgb, data);
        assert_eq!(crate::pngio::read_rgb(&path).unwrap().data, data);
    }
}
