//! PNG reading and writing.
//!
//! Labels are read with the `png` crate and no transformation at all, because the `image` crate
//! expands palette PNGs to RGB (GTA5 labels are palette PNGs whose *indices* are the ids) and
//! reduces 16-bit channels (SYNTHIA labels are 16-bit multi-channel PNGs whose *first* channel is
//! the class id). RGB images go through `image`, which handles every PNG pixel format.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use png::{BitDepth, ColorType};

use crate::protocol::{LabelLut, Protocol};
use crate::DataError;

/// An 8-bit RGB image, rows top to bottom, pixels interleaved (HWC).
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `height * width * 3` bytes, R, G, B per pixel.
    pub data: Vec<u8>,
}

/// A single-channel 8-bit image (class ids after mapping).
#[derive(Debug, Clone, PartialEq)]
pub struct LabelImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `height * width` class ids, 255 = ignore.
    pub data: Vec<u8>,
}

/// How a label file stores its ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelEncoding {
    /// One id per pixel: a grayscale PNG (Cityscapes `labelIds`) or the indices of a palette
    /// PNG (GTA5). Colour PNGs are refused: they hold colours, not ids.
    Ids,
    /// The first channel of a (typically 16-bit, multi-channel) PNG (SYNTHIA `GT/LABELS`).
    FirstChannel,
}

fn decode_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Decode {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Decodes any PNG to 8-bit RGB.
pub fn read_rgb(path: &Path) -> Result<RgbImage, DataError> {
    let reader = image::ImageReader::open(path).map_err(|e| DataError::io(path, e))?;
    let reader = reader
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?;
    let img = reader
        .decode()
        .map_err(|e| decode_err(path, e))?
        .into_rgb8();
    let (width, height) = img.dimensions();
    Ok(RgbImage {
        width,
        height,
        data: img.into_raw(),
    })
}

/// The raw samples of a PNG, exactly as stored.
struct RawPng {
    width: u32,
    height: u32,
    color: ColorType,
    depth: BitDepth,
    line_size: usize,
    data: Vec<u8>,
}

fn read_raw(path: &Path) -> Result<RawPng, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut decoder = png::Decoder::new(BufReader::new(file));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(|e| decode_err(path, e))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| decode_err(path, "image too large"))?;
    let mut data = vec![0; size];
    let info = reader
        .next_frame(&mut data)
        .map_err(|e| decode_err(path, e))?;
    data.truncate(info.buffer_size());
    Ok(RawPng {
        width: info.width,
        height: info.height,
        color: info.color_type,
        depth: info.bit_depth,
        line_size: info.line_size,
        data,
    })
}

/// Reads a label PNG and maps its raw ids through `lut`.
pub fn read_label(
    path: &Path,
    encoding: LabelEncoding,
    lut: &LabelLut,
) -> Result<LabelImage, DataError> {
    let raw = read_raw(path)?;
    let refuse = |reason: String| DataError::LabelFormat {
        path: path.to_path_buf(),
        reason,
    };
    match (encoding, raw.color) {
        (LabelEncoding::Ids, ColorType::Grayscale | ColorType::Indexed) => {}
        (LabelEncoding::Ids, other) => {
            return Err(refuse(format!(
                "it is a {other:?} PNG, expected grayscale or palette ids (Cityscapes: use \
                 *_gtFine_labelIds.png, not *_color.png)"
            )))
        }
        (LabelEncoding::FirstChannel, ColorType::Indexed) => {
            return Err(refuse(
                "it is a palette PNG, expected the 16-bit multi-channel SYNTHIA GT/LABELS format"
                    .into(),
            ))
        }
        (LabelEncoding::FirstChannel, _) => {}
    }
    let samples = raw.color.samples();
    let (w, h) = (raw.width as usize, raw.height as usize);
    let mut data = vec![0u8; w * h];
    for (y, out_row) in data.chunks_exact_mut(w.max(1)).enumerate().take(h) {
        let row = &raw.data[y * raw.line_size..(y + 1) * raw.line_size];
        match raw.depth {
            BitDepth::Sixteen => {
                for (x, o) in out_row.iter_mut().enumerate() {
                    let i = x * samples * 2;
                    *o = lut.map(u16::from_be_bytes([row[i], row[i + 1]]));
                }
            }
            BitDepth::Eight => {
                for (x, o) in out_row.iter_mut().enumerate() {
                    *o = lut.map(row[x * samples] as u16);
                }
            }
            // Sub-byte depths exist only for single-sample pixels (gray or palette).
            depth => {
                let bits = depth as usize;
                let per_byte = 8 / bits;
                let mask = (1u16 << bits) - 1;
                for (x, o) in out_row.iter_mut().enumerate() {
                    let byte = row[x / per_byte] as u16;
                    let shift = 8 - bits * (x % per_byte + 1);
                    *o = lut.map((byte >> shift) & mask);
                }
            }
        }
    }
    Ok(LabelImage {
        width: raw.width,
        height: raw.height,
        data,
    })
}

/// Writes a PNG with fixed encoder settings, so equal pixels give equal bytes.
pub fn write_png(
    path: &Path,
    width: u32,
    height: u32,
    color: ColorType,
    depth: BitDepth,
    data: &[u8],
) -> Result<(), DataError> {
    let file = File::create(path).map_err(|e| DataError::io(path, e))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), width, height);
    encoder.set_color(color);
    encoder.set_depth(depth);
    encoder.set_compression(png::Compression::Fast);
    let enc_err = |e: png::EncodingError| match e {
        png::EncodingError::IoError(source) => DataError::io(path, source),
        other => DataError::Config(format!("cannot encode {}: {other}", path.display())),
    };
    let mut writer = encoder.write_header().map_err(enc_err)?;
    writer.write_image_data(data).map_err(enc_err)?;
    writer.finish().map_err(enc_err)
}

/// Writes an 8-bit RGB PNG (HWC data).
pub fn write_rgb_png(path: &Path, width: u32, height: u32, rgb: &[u8]) -> Result<(), DataError> {
    write_png(path, width, height, ColorType::Rgb, BitDepth::Eight, rgb)
}

/// Writes class ids (or predictions) as an 8-bit grayscale PNG, the format of pseudo-labels.
pub fn write_label_png(
    path: &Path,
    width: u32,
    height: u32,
    labels: &[u8],
) -> Result<(), DataError> {
    write_png(
        path,
        width,
        height,
        ColorType::Grayscale,
        BitDepth::Eight,
        labels,
    )
}

/// Colours class ids with the Cityscapes palette of `protocol` (ignored pixels black).
pub fn colorize(labels: &[u8], protocol: Protocol) -> Vec<u8> {
    let lut = protocol.color_lut();
    labels.iter().flat_map(|&c| lut[c as usize]).collect()
}

/// Writes class ids (or predictions) as a Cityscapes-coloured RGB PNG, for people to look at.
pub fn write_color_png(
    path: &Path,
    width: u32,
    height: u32,
    labels: &[u8],
    protocol: Protocol,
) -> Result<(), DataError> {
    write_rgb_png(path, width, height, &colorize(labels, protocol))
}
