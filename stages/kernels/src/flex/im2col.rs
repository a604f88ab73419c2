//! Convolution forward and backward on host memory as im2col + one matrix product per image.
//!
//! The layout is NCHW, row-major, `f32`. An image's column matrix has one row per weight tap
//! `(input channel, ky, kx)` and one column per output pixel, so the forward pass is
//! `weight [Cout, K] x columns [K, P]`, the weight gradient is `dY [Cout, P] x columns^T`,
//! and the input gradient is `weight^T x dY` scattered back through the same taps. Each is a
//! single well-shaped product for the `gemm` crate (AVX-512 where the CPU has it), unlike Burn
//! 0.22's generic backward, which derives the weight gradient as a convolution whose kernel is
//! the whole output-gradient map (see `conv`'s module docs).

use gemm::Parallelism;
use rayon::prelude::*;

/// Output pixels from which the weight gradient is computed transposed (see `backward_into`).
const TRANSPOSED_WEIGHT_GRADIENT_PIXELS: usize = 1024;

/// Shapes and options of one 2-D convolution (groups 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    /// Batch size.
    pub batch: usize,
    /// Input channels.
    pub channels_in: usize,
    /// Input height and width.
    pub input: [usize; 2],
    /// Output channels.
    pub channels_out: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Stride (rows, columns).
    pub stride: [usize; 2],
    /// Zero padding before the first row and column; the output size decides the end.
    pub padding: [usize; 2],
    /// Dilation (rows, columns).
    pub dilation: [usize; 2],
    /// Output height and width.
    pub output: [usize; 2],
}

impl ConvShape {
    /// Weight taps per output channel: `channels_in * kh * kw`.
    pub fn taps(&self) -> usize {
        self.channels_in * self.kernel[0] * self.kernel[1]
    }

    /// Output pixels per channel.
    pub fn pixels(&self) -> usize {
        self.output[0] * self.output[1]
    }

    fn input_plane(&self) -> usize {
        self.input[0] * self.input[1]
    }

    /// A 1x1 conv with stride 1 and no padding reads the input as its own column matrix.
    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0, 0]
    }

    /// The kernel positions `ky * kw + kx` that read at least one input pixel. With a dilation
    /// as large as the map (DeepLabV2's classifier at dilation 24 on a 17-row map), most
    /// positions read only padding: their column rows would be all zeros.
    fn live_kernel_taps(&self) -> Vec<usize> {
        let [kh, kw] = self.kernel;
        (0..kh * kw)
            .filter(|&tap| {
                let (dy, dx) = tap_offsets(self, tap / kw, tap % kw);
                !valid_outputs(dy, self.stride[0], self.input[0], self.output[0]).is_empty()
                    && !valid_outputs(dx, self.stride[1], self.input[1], self.output[1]).is_empty()
            })
            .collect()
    }
}

/// The rows of the column matrix that are computed: every input channel times the live kernel
/// positions (all of them for most convs).
struct TapRows {
    live: Vec<usize>,
    all: bool,
}

impl TapRows {
    fn new(shape: &ConvShape) -> Self {
        let live = shape.live_kernel_taps();
        let all = live.len() == shape.kernel[0] * shape.kernel[1];
        Self { live, all }
    }

    /// Rows per input channel.
    fn per_channel(&self) -> usize {
        self.live.len()
    }

    /// `(input channel, kernel position)` of compact row `row`.
    fn tap_of(&self, row: usize) -> (usize, usize) {
        (row / self.live.len(), self.live[row % self.live.len()])
    }

    /// `weight [Cout, Cin * kh * kw]` restricted to the live rows, `[Cout, Cin * live]`; the
    /// weight itself when every position is live.
    fn compact_weight<'a>(
        &self,
        shape: &ConvShape,
        weight: &'a [f32],
    ) -> std::borrow::Cow<'a, [f32]> {
        if self.all {
            return std::borrow::Cow::Borrowed(weight);
        }
        let kk = shape.kernel[0] * shape.kernel[1];
        let mut compact =
            Vec::with_capacity(shape.channels_out * shape.channels_in * self.live.len());
        for filter in weight.chunks_exact(shape.taps()) {
            for channel in filter.chunks_exact(kk) {
                compact.extend(self.live.iter().map(|&tap| channel[tap]));
            }
        }
        std::borrow::Cow::Owned(compact)
    }
}

/// For output index `o` along one axis, the input index is `o * stride + offset`; returns the
/// range of `o` in `0..out` whose input index lies in `0..len`.
fn valid_outputs(offset: isize, stride: usize, len: usize, out: usize) -> std::ops::Range<usize> {
    let stride = stride as isize;
    // Smallest o with o * stride + offset >= 0.
    let lo = if offset >= 0 {
        0
    } else {
        (-offset + stride - 1) / stride
    };
    // Smallest o with o * stride + offset >= len.
    let hi = (len as isize - offset + stride - 1)
        .div_euclid(stride)
        .max(0);
    let lo = (lo as usize).min(out);
    let hi = (hi as usize).clamp(lo, out);
    lo..hi
}

/// The tap `(ky, kx)`'s input offsets along rows and columns.
fn tap_offsets(shape: &ConvShape, ky: usize, kx: usize) -> (isize, isize) {
    (
        (ky * shape.dilation[0]) as isize - shape.padding[0] as isize,
        (kx * shape.dilation[1]) as isize - shape.padding[1] as isize,
    )
}

/// Fills `columns` (`[rows, pixels]`, the rows of `rows`) from one image (`[channels_in, H, W]`).
fn im2col(shape: &ConvShape, rows_of: &TapRows, image: &[f32], columns: &mut [f32]) {
    let kw = shape.kernel[1];
    let [ho, wo] = shape.output;
    let [h, w] = shape.input;
    let [sh, sw] = shape.stride;
    let plane = shape.input_plane();
    columns
        .par_chunks_mut(ho * wo)
        .enumerate()
        .for_each(|(row, out)| {
            let (channel, tap) = rows_of.tap_of(row);
            let (dy, dx) = tap_offsets(shape, tap / kw, tap % kw);
            let input = &image[channel * plane..(channel + 1) * plane];
            let rows = valid_outputs(dy, sh, h, ho);
            let cols = valid_outputs(dx, sw, w, wo);
            for (oy, out_row) in out.chunks_exact_mut(wo).enumerate() {
                if !rows.contains(&oy) || cols.is_empty() {
                    out_row.fill(0.0);
                    continue;
                }
                let iy = (oy * sh) as isize + dy;
                let in_row = &input[iy as usize * w..(iy as usize + 1) * w];
                out_row[..cols.start].fill(0.0);
                out_row[cols.end..].fill(0.0);
                let first = ((cols.start * sw) as isize + dx) as usize;
                if sw == 1 {
                    out_row[cols.clone()].copy_from_slice(&in_row[first..first + cols.len()]);
                } else {
                    for (o, value) in out_row[cols.clone()].iter_mut().enumerate() {
                        *value = in_row[first + o * sw];
                    }
                }
            }
        });
}

/// Adds `columns` (`[rows, pixels]`, the rows of `rows`) back into one image's gradient
/// (`[channels_in, H, W]`).
fn col2im_add(shape: &ConvShape, rows_of: &TapRows, columns: &[f32], image: &mut [f32]) {
    let kw = shape.kernel[1];
    let [ho, wo] = shape.output;
    let [h, w] = shape.input;
    let [sh, sw] = shape.stride;
    let taps = rows_of.per_channel();
    image
        .par_chunks_mut(shape.input_plane())
        .enumerate()
        .for_each(|(channel, input)| {
            for (slot, &tap) in rows_of.live.iter().enumerate() {
                let (dy, dx) = tap_offsets(shape, tap / kw, tap % kw);
                let rows = valid_outputs(dy, sh, h, ho);
                let cols = valid_outputs(dx, sw, w, wo);
                if cols.is_empty() {
                    continue;
                }
                let column = &columns[(channel * taps + slot) * ho * wo..][..ho * wo];
                for oy in rows {
                    let iy = ((oy * sh) as isize + dy) as usize;
                    let in_row = &mut input[iy * w..(iy + 1) * w];
                    let first = ((cols.start * sw) as isize + dx) as usize;
                    let src = &column[oy * wo + cols.start..oy * wo + cols.end];
                    if sw == 1 {
                        for (d, s) in in_row[first..first + src.len()].iter_mut().zip(src) {
                            *d += s;
                        }
                    } else {
                        for (o, s) in src.iter().enumerate() {
                            in_row[first + o * sw] += s;
                        }
                    }
                }
            }
        });
}

/// A row-major matrix operand: its data and its row and column strides.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Operand<'a> {
    /// A row-major matrix with `cols` columns.
    fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: cols,
        }
    }
}

/// `dst [m, n] (+)= lhs [m, k] x rhs [k, n]`, `dst` row-major; adds to `dst` when `accumulate`.
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: Operand,
    rhs: Operand,
    accumulate: bool,
) {
    matmul_strided(m, n, k, dst, [n, 1], lhs, rhs, accumulate);
}

/// `dst [m, n] (+)= lhs [m, k] x rhs [k, n]` with `dst`'s row and column strides; adds to
/// `dst` when `accumulate`.
#[allow(clippy::too_many_arguments)]
fn matmul_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    [dst_row_stride, dst_col_stride]: [usize; 2],
    lhs: Operand,
    rhs: Operand,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() > (m - 1) * dst_row_stride + (n - 1) * dst_col_stride);
    assert!(k == 0 || lhs.data.len() > (m - 1) * lhs.row_stride + (k - 1) * lhs.col_stride);
    assert!(k == 0 || rhs.data.len() > (k - 1) * rhs.row_stride + (n - 1) * rhs.col_stride);
    // Same threshold as burn-flex's own matmul: below it, threads cost more than they save.
    let parallelism = if m * n * k >= 192 * 192 * 192 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above keep every element the product reads inside `lhs` and `rhs`
    // and every element it writes inside `dst`, which does not overlap them (it is a unique
    // borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_col_stride as isize,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The column matrix of image `n` of `x`: `x` itself for a pointwise conv, else built in
/// `scratch`.
fn columns_of<'a>(
    shape: &ConvShape,
    rows_of: &TapRows,
    x: &'a [f32],
    n: usize,
    scratch: &'a mut Vec<f32>,
) -> &'a [f32] {
    let image_len = shape.channels_in * shape.input_plane();
    let image = &x[n * image_len..][..image_len];
    if shape.is_pointwise() {
        return image;
    }
    let rows = shape.channels_in * rows_of.per_channel();
    let columns = scratch_of(scratch, rows * shape.pixels());
    im2col(shape, rows_of, image, columns);
    columns
}

thread_local! {
    /// Column matrices are rebuilt for every conv; keeping one buffer per thread saves
    /// zero-filling (and page-faulting) a fresh one each time. Every use overwrites all of it.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The first `len` elements of `buffer`, grown (with zeros) as needed; their old contents are
/// left for the caller to overwrite.
fn scratch_of(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// Runs `f` with this thread's scratch buffer (or a fresh one if it is already in use).
fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => f(&mut buffer),
        Err(_) => f(&mut Vec::new()),
    })
}

/// The convolution of `x` (`[N, Cin, H, W]`) with `weight` (`[Cout, Cin, kh, kw]`) plus `bias`.
pub fn forward(shape: &ConvShape, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let mut y = vec![0.0; shape.batch * shape.channels_out * shape.pixels()];
    if shifted::applies(shape) {
        shifted::forward_into(shape, x, weight, &mut y);
    } else {
        with_scratch(|scratch| forward_into(shape, x, weight, &mut y, scratch));
    }
    if let Some(bias) = bias {
        add_bias(shape, bias, &mut y);
    }
    y
}

fn add_bias(shape: &ConvShape, bias: &[f32], y: &mut [f32]) {
    for y_n in y.chunks_exact_mut(shape.channels_out * shape.pixels()) {
        for (channel, b) in y_n.chunks_exact_mut(shape.pixels()).zip(bias) {
            channel.iter_mut().for_each(|v| *v += b);
        }
    }
}

fn forward_into(
    shape: &ConvShape,
    x: &[f32],
    weight: &[f32],
    y: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (pixels, cout) = (shape.pixels(), shape.channels_out);
    let rows_of = TapRows::new(shape);
    let rows = shape.channels_in * rows_of.per_channel();
    let weight = rows_of.compact_weight(shape, weight);
    for (n, y_n) in y.chunks_exact_mut(cout * pixels).enumerate() {
        let columns = columns_of(shape, &rows_of, x, n, scratch);
        matmul(
            cout,
            pixels,
            rows,
            y_n,
            Operand::rows(&weight, rows),
            Operand::rows(columns, pixels),
            false,
        );
    }
}

/// Gradients of the convolution with respect to its input and weight, each computed only when
/// asked for, given the output gradient `dy` (`[N, Cout, Ho, Wo]`).
pub fn backward(
    shape: &ConvShape,
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
    want_input: bool,
    want_weight: bool,
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let image_len = shape.channels_in * shape.input_plane();
    let mut dx = want_input.then(|| vec![0.0; shape.batch * image_len]);
    let mut dw = want_weight.then(|| vec![0.0; shape.channels_out * shape.taps()]);
    if shifted::applies(shape) {
        shifted::backward_into(shape, x, weight, dy, dx.as_deref_mut(), dw.as_deref_mut());
        return (dx, dw);
    }
    with_scratch(|scratch| {
        backward_into(
            shape,
            x,
            weight,
            dy,
            dx.as_deref_mut(),
            dw.as_deref_mut(),
            scratch,
        )
    });
    (dx, dw)
}

fn backward_into(
    shape: &ConvShape,
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
    mut dx: Option<&mut [f32]>,
    mut dw: Option<&mut [f32]>,
    scratch: &mut Vec<f32>,
) {
    let (taps, pixels, cout) = (shape.taps(), shape.pixels(), shape.channels_out);
    let image_len = shape.channels_in * shape.input_plane();
    let rows_of = TapRows::new(shape);
    let rows = shape.channels_in * rows_of.per_channel();
    let weight = rows_of.compact_weight(shape, weight);
    // Both factors of the weight gradient run along the pixels, so the GEMM repacks one of
    // them. Over many pixels it is cheaper to repack the small dY, computing dW^T
    // [rows, Cout] = columns [rows, P] x dY^T [P, Cout]; over few, the column matrix is small
    // and dW [Cout, rows] = dY x columns^T is faster (bench/conv_ops).
    let transposed = pixels >= TRANSPOSED_WEIGHT_GRADIENT_PIXELS;
    // The live rows' gradient, when it cannot be written into `dw` directly; kernel
    // positions that read only padding get none.
    let mut staged_dw = dw
        .as_ref()
        .filter(|_| transposed || !rows_of.all)
        .map(|_| vec![0.0f32; rows * cout]);
    for n in 0..shape.batch {
        let dy_n = &dy[n * cout * pixels..][..cout * pixels];
        if let Some(target) = staged_dw.as_deref_mut().or(dw.as_deref_mut()) {
            let columns = columns_of(shape, &rows_of, x, n, scratch);
            if transposed {
                matmul(
                    rows,
                    cout,
                    pixels,
                    target,
                    Operand::rows(columns, pixels),
                    Operand::transposed(dy_n, pixels),
                    n > 0,
                );
            } else {
                matmul(
                    cout,
                    rows,
                    pixels,
                    target,
                    Operand::rows(dy_n, pixels),
                    Operand::transposed(columns, pixels),
                    n > 0,
                );
            }
        }
        if let Some(dx) = dx.as_deref_mut() {
            let dx_n = &mut dx[n * image_len..][..image_len];
            let lhs = Operand::transposed(&weight, rows);
            if shape.is_pointwise() {
                matmul(
                    rows,
                    pixels,
                    cout,
                    dx_n,
                    lhs,
                    Operand::rows(dy_n, pixels),
                    false,
                );
            } else {
                let columns = scratch_of(scratch, rows * pixels);
                matmul(
                    rows,
                    pixels,
                    cout,
                    columns,
                    lhs,
                    Operand::rows(dy_n, pixels),
                    false,
                );
                col2im_add(shape, &rows_of, columns, dx_n);
            }
        }
    }
    if let (Some(dw), Some(staged)) = (dw, staged_dw) {
        let kk = shape.kernel[0] * shape.kernel[1];
        let per_channel = rows_of.per_channel();
        // Row `row` of the live rows is `dw`'s column `channel * kk + live position`.
        let column = |row: usize| (row / per_channel) * kk + rows_of.live[row % per_channel];
        if transposed {
            for (row, values) in staged.chunks_exact(cout).enumerate() {
                let column = column(row);
                for (o, &value) in values.iter().enumerate() {
                    dw[o * taps + column] = value;
                }
            }
        } else {
            for (filter, values) in dw.chunks_exact_mut(taps).zip(staged.chunks_exact(rows)) {
                for (row, &value) in values.iter().enumerate() {
                    filter[column(row)] = value;
                }
            }
        }
    }
}

/// The bias gradient: `dy` (`[N, Cout, Ho, Wo]`) summed over images and pixels.
pub fn bias_gradient(shape: &ConvShape, dy: &[f32]) -> Vec<f32> {
    let pixels = shape.pixels();
    let mut db = vec![0.0f32; shape.channels_out];
    for image in dy
        .chunks_exact(shape.channels_out * pixels)
        .take(shape.batch)
    {
        for (sum, channel) in db.iter_mut().zip(image.chunks_exact(pixels)) {
            *sum += channel.iter().sum::<f32>();
        }
    }
    db
}

/// Stride-1 convs that keep the map's size, without a column matrix.
///
/// In an image flattened to `[C, H * W]`, kernel position `(ky, kx)` reads input pixel
/// `p + dy * W + dx` for output pixel `p`: the input shifted by a constant. So the conv is a sum
/// of one product per live kernel position, `Y[:, range] += W_pos [Cout, Cin] x X[:, range +
/// shift]`, over the contiguous range from its first to its last valid output pixel. The range
/// also covers pixels whose row neighbour the shift wraps into (left or right of the valid
/// columns): the forward pass computes those into a small `[Cout, range]` buffer and adds only
/// the valid columns; the backward pass zeroes them in a copy of `dY` first. This reads the
/// input in place where im2col writes and rereads `Cin * kh * kw` rows: DeepLabV2's 3x3 convs
/// and its classifier's (dilated up to 24, 4608 rows at 512 input channels).
mod shifted {
    use super::{matmul_strided, tap_offsets, valid_outputs, ConvShape, Operand};
    use rayon::prelude::*;
    use std::ops::Range;

    /// Whether a conv runs here: stride 1, output as large as the input, not pointwise.
    pub(super) fn applies(shape: &ConvShape) -> bool {
        shape.stride == [1, 1] && shape.output == shape.input && shape.kernel != [1, 1]
    }

    /// One live kernel position.
    struct Position {
        /// `ky * kw + kx`: the weight's innermost index.
        index: usize,
        /// Valid output rows and columns.
        rows: Range<usize>,
        cols: Range<usize>,
        /// The output pixels from the first valid to the last valid one.
        span: Range<usize>,
        /// Where the input pixels for `span` start.
        input_start: usize,
    }

    impl Position {
        fn full_width(&self, width: usize) -> bool {
            self.cols == (0..width)
        }
    }

    fn positions(shape: &ConvShape) -> Vec<Position> {
        let [h, w] = shape.input;
        let [kh, kw] = shape.kernel;
        (0..kh * kw)
            .filter_map(|index| {
                let (dy, dx) = tap_offsets(shape, index / kw, index % kw);
                let rows = valid_outputs(dy, 1, h, h);
                let cols = valid_outputs(dx, 1, w, w);
                if rows.is_empty() || cols.is_empty() {
                    return None;
                }
                let span = rows.start * w + cols.start..(rows.end - 1) * w + cols.end;
                let input_start = (span.start as isize + dy * w as isize + dx) as usize;
                Some(Position {
                    index,
                    rows,
                    cols,
                    span,
                    input_start,
                })
            })
            .collect()
    }

    /// `W_pos`, `[Cout, Cin]`, inside the weight `[Cout, Cin, kh, kw]`.
    fn weight_at<'a>(shape: &ConvShape, weight: &'a [f32], pos: &Position) -> Operand<'a> {
        let kk = shape.kernel[0] * shape.kernel[1];
        Operand {
            data: &weight[pos.index..],
            row_stride: shape.channels_in * kk,
            col_stride: kk,
        }
    }

    /// `W_pos^T`, `[Cin, Cout]`.
    fn weight_at_transposed<'a>(
        shape: &ConvShape,
        weight: &'a [f32],
        pos: &Position,
    ) -> Operand<'a> {
        let w = weight_at(shape, weight, pos);
        Operand {
            data: w.data,
            row_stride: w.col_stride,
            col_stride: w.row_stride,
        }
    }

    /// `dY[:, span]` of one image (`[Cout, H * W]`) with the columns outside `cols` zeroed, as
    /// a `[Cout, span]` buffer; `None` where every column is valid (`dY` itself serves).
    fn masked_output_gradient(shape: &ConvShape, dy: &[f32], pos: &Position) -> Option<Vec<f32>> {
        let (plane, width) = (shape.pixels(), shape.input[1]);
        if pos.full_width(width) {
            return None;
        }
        let len = pos.span.len();
        let mut buffer = vec![0.0; shape.channels_out * len];
        for (channel, out) in buffer.chunks_exact_mut(len).enumerate() {
            let src = &dy[channel * plane..][..plane];
            for row in pos.rows.clone() {
                let valid = row * width + pos.cols.start..row * width + pos.cols.end;
                out[valid.start - pos.span.start..valid.end - pos.span.start]
                    .copy_from_slice(&src[valid]);
            }
        }
        Some(buffer)
    }

    /// Rows `from..` of `dY[:, span]`, `[Cout - from, span]`: the masked copy when there is one.
    fn output_gradient_rows<'a>(
        shape: &ConvShape,
        dy: &'a [f32],
        masked: Option<&'a [f32]>,
        pos: &Position,
        from: usize,
    ) -> Operand<'a> {
        match masked {
            Some(buffer) => {
                let len = pos.span.len();
                Operand::rows(&buffer[from * len..], len)
            }
            None => Operand {
                data: &dy[from * shape.pixels() + pos.span.start..],
                row_stride: shape.pixels(),
                col_stride: 1,
            },
        }
    }

    /// Channels per parallel task when splitting `channels` rows of a conv with `work`
    /// multiply-adds: one task per thread for a large conv, else a single task. Each task's
    /// products are then below the GEMM's own threading threshold, so a conv forks once rather
    /// than once per kernel position.
    fn rows_per_task(channels: usize, work: usize) -> usize {
        const PARALLEL_WORK: usize = 1 << 21;
        if work < PARALLEL_WORK {
            return channels.max(1);
        }
        channels.div_ceil(rayon::current_num_threads()).max(1)
    }

    fn work(shape: &ConvShape, positions: &[Position]) -> usize {
        let pixels: usize = positions.iter().map(|p| p.span.len()).sum();
        shape.channels_in * shape.channels_out * pixels
    }

    pub(super) fn forward_into(shape: &ConvShape, x: &[f32], weight: &[f32], y: &mut [f32]) {
        let (cin, cout) = (shape.channels_in, shape.channels_out);
        let (plane, width) = (shape.pixels(), shape.input[1]);
        let kk = shape.kernel[0] * shape.kernel[1];
        let positions = positions(shape);
        let per_task = rows_per_task(cout, work(shape, &positions));
        for (x_n, y_n) in x
            .chunks_exact(cin * plane)
            .zip(y.chunks_exact_mut(cout * plane))
        {
            // Each task computes its own output channels over every kernel position.
            y_n.par_chunks_mut(per_task * plane)
                .enumerate()
                .for_each(|(task, y_rows)| {
                    let (first, rows) = (task * per_task, y_rows.len() / plane);
                    let mut partial = Vec::new();
                    for pos in &positions {
                        let len = pos.span.len();
                        let mut lhs = weight_at(shape, weight, pos);
                        lhs.data = &lhs.data[first * cin * kk..];
                        let rhs = Operand {
                            data: &x_n[pos.input_start..],
                            row_stride: plane,
                            col_stride: 1,
                        };
                        if pos.full_width(width) {
                            let dst = &mut y_rows[pos.span.start..];
                            matmul_strided(rows, len, cin, dst, [plane, 1], lhs, rhs, true);
                            continue;
                        }
                        partial.resize(rows * len, 0.0);
                        matmul_strided(rows, len, cin, &mut partial, [len, 1], lhs, rhs, false);
                        for (channel, values) in partial.chunks_exact(len).enumerate() {
                            let out = &mut y_rows[channel * plane..][..plane];
                            for row in pos.rows.clone() {
                                let valid =
                                    row * width + pos.cols.start..row * width + pos.cols.end;
                                let from = &values[valid.start - pos.span.start..][..valid.len()];
                                for (o, v) in out[valid].iter_mut().zip(from) {
                                    *o += v;
                                }
                            }
                        }
                    }
                });
        }
    }

    pub(super) fn backward_into(
        shape: &ConvShape,
        x: &[f32],
        weight: &[f32],
        dy: &[f32],
        mut dx: Option<&mut [f32]>,
        mut dw: Option<&mut [f32]>,
    ) {
        let (cin, cout) = (shape.channels_in, shape.channels_out);
        let plane = shape.pixels();
        let kk = shape.kernel[0] * shape.kernel[1];
        let positions = positions(shape);
        let work = work(shape, &positions);
        for image in 0..shape.batch {
            let x_n = &x[image * cin * plane..][..cin * plane];
            let dy_n = &dy[image * cout * plane..][..cout * plane];
            let masked: Vec<Option<Vec<f32>>> = positions
                .par_iter()
                .map(|pos| masked_output_gradient(shape, dy_n, pos))
                .collect();
            if let Some(dw) = dw.as_deref_mut() {
                // dW_pos [Cout, Cin] (+)= dY [Cout, span] x X_shifted^T [span, Cin], each task
                // its own output channels (rows of dW).
                let per_task = rows_per_task(cout, work);
                dw.par_chunks_mut(per_task * cin * kk)
                    .enumerate()
                    .for_each(|(task, dw_rows)| {
                        let (first, rows) = (task * per_task, dw_rows.len() / (cin * kk));
                        for (pos, masked) in positions.iter().zip(&masked) {
                            let g =
                                output_gradient_rows(shape, dy_n, masked.as_deref(), pos, first);
                            let rhs = Operand {
                                data: &x_n[pos.input_start..],
                                row_stride: 1,
                                col_stride: plane,
                            };
                            let dst = &mut dw_rows[pos.index..];
                            let len = pos.span.len();
                            matmul_strided(rows, cin, len, dst, [cin * kk, kk], g, rhs, image > 0);
                        }
                    });
            }
            if let Some(dx) = dx.as_deref_mut() {
                // dX_shifted [Cin, span] += W_pos^T [Cin, Cout] x dY [Cout, span], each task its
                // own input channels; the wrapped columns of dY are zero, so they add nothing.
                let dx_n = &mut dx[image * cin * plane..][..cin * plane];
                let per_task = rows_per_task(cin, work);
                dx_n.par_chunks_mut(per_task * plane)
                    .enumerate()
                    .for_each(|(task, dx_rows)| {
                        let (first, rows) = (task * per_task, dx_rows.len() / plane);
                        for (pos, masked) in positions.iter().zip(&masked) {
                            let g = output_gradient_rows(shape, dy_n, masked.as_deref(), pos, 0);
                            let mut lhs = weight_at_transposed(shape, weight, pos);
                            lhs.data = &lhs.data[first * kk..];
                            let dst = &mut dx_rows[pos.input_start..];
                            let len = pos.span.len();
                            matmul_strided(rows, len, cout, dst, [plane, 1], lhs, g, true);
                        }
                    });
            }
        }
    }
}
