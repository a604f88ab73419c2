//! SegFormer's Mix Transformer (MiT-B0 ... MiT-B5), the encoder of DAFormer, HRDA and MIC.
//!
//! Four stages at strides 4, 8, 16 and 32. Each starts with an overlapping patch embedding (a
//! strided conv and a LayerNorm), runs transformer blocks whose self-attention reads keys and
//! values from a spatially reduced copy of the map, and ends with a LayerNorm. The Mix-FFN puts
//! a 3x3 depthwise conv between its two linear layers, which is what lets MiT work without
//! position embeddings. Module names follow SegFormer's checkpoints after
//! [`crate::load_mit_weights`]' renaming, so every tensor of `mit_b*.pth` has one home.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::conv::conv_forward;
use crate::noise::Noise;
use crate::ModelError;

/// LayerNorm epsilon of the blocks and of the stage-final norms (`partial(nn.LayerNorm,
/// eps=1e-6)` in the reference).
const BLOCK_NORM_EPS: f64 = 1e-6;
/// LayerNorm epsilon of the patch embeddings and of the attention's reduction norm, which the
/// reference builds with `nn.LayerNorm`'s default.
const DEFAULT_NORM_EPS: f64 = 1e-5;

/// The MiT variants of SegFormer (`mit_b0` ... `mit_b5`): `(embed dims, heads, depths)`. All
/// share the spatial-reduction ratios 8/4/2/1, MLP ratio 4 and a drop-path rate of 0.1.
const VARIANTS: [([usize; 4], [usize; 4], [usize; 4]); 6] = [
    ([32, 64, 160, 256], [1, 2, 5, 8], [2, 2, 2, 2]),
    ([64, 128, 320, 512], [1, 2, 5, 8], [2, 2, 2, 2]),
    ([64, 128, 320, 512], [1, 2, 5, 8], [3, 4, 6, 3]),
    ([64, 128, 320, 512], [1, 2, 5, 8], [3, 4, 18, 3]),
    ([64, 128, 320, 512], [1, 2, 5, 8], [3, 8, 27, 3]),
    ([64, 128, 320, 512], [1, 2, 5, 8], [3, 6, 40, 3]),
];

/// Architecture of a [`MixTransformer`]; part of `model.json`, so new fields need serde
/// defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MitConfig {
    /// Channels of stages 1-4 (`[64, 128, 320, 512]` for B1-B5).
    pub embed_dims: [usize; 4],
    /// Attention heads of stages 1-4; each must divide its stage's channels.
    pub heads: [usize; 4],
    /// Transformer blocks of stages 1-4 (`[3, 6, 40, 3]` for B5).
    pub depths: [usize; 4],
    /// Spatial-reduction ratio of the keys and values of stages 1-4.
    #[serde(default = "default_sr_ratios")]
    pub sr_ratios: [usize; 4],
    /// Hidden width of the Mix-FFN over the stage's channels.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: usize,
    /// Stochastic-depth rate of the last block; block `i` of `n` drops its residual branches with
    /// probability `rate * i / (n - 1)` during training (`torch.linspace(0, rate, n)`).
    #[serde(default = "default_drop_path")]
    pub drop_path: f64,
}

fn default_sr_ratios() -> [usize; 4] {
    [8, 4, 2, 1]
}

fn default_mlp_ratio() -> usize {
    4
}

fn default_drop_path() -> f64 {
    0.1
}

impl MitConfig {
    /// SegFormer's MiT-B`variant` (0 to 5), as in its `mit_b*.pth` ImageNet checkpoints.
    pub fn variant(variant: usize) -> Result<Self, ModelError> {
        let (embed_dims, heads, depths) = *VARIANTS.get(variant).ok_or_else(|| {
            ModelError::InvalidConfig(format!(
                "there is no MiT-B{variant}; SegFormer's variants are B0 to B5"
            ))
        })?;
        Ok(Self {
            embed_dims,
            heads,
            depths,
            sr_ratios: default_sr_ratios(),
            mlp_ratio: default_mlp_ratio(),
            drop_path: default_drop_path(),
        })
    }

    /// The stage widths times `width`, each rounded to a multiple of its heads (at least one
    /// channel per head): narrow encoders for tests and the synthetic benchmark.
    pub fn with_width(mut self, width: f64) -> Self {
        for (dim, &heads) in self.embed_dims.iter_mut().zip(&self.heads) {
            let per_head = (*dim as f64 * width / heads as f64).round().max(1.0) as usize;
            *dim = per_head * heads;
        }
        self
    }

    /// The variant named `mit_b0` ... `mit_b5`.
    pub fn from_name(name: &str) -> Result<Self, ModelError> {
        name.strip_prefix("mit_b")
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|v| *v < VARIANTS.len())
            .map(Self::variant)
            .unwrap_or_else(|| {
                Err(ModelError::InvalidConfig(format!(
                    "unknown encoder `{name}`; use mit_b0 ... mit_b5"
                )))
            })
    }

    /// The smallest image side the encoder takes: its first stage's map (stride 4) must hold
    /// at least one cell of its spatial reduction.
    pub fn min_input(&self) -> usize {
        4 * self.sr_ratios[0]
    }

    /// The name of the SegFormer variant this config is, if it is one.
    pub fn variant_name(&self) -> Option<String> {
        (0..VARIANTS.len())
            .find(|&v| Self::variant(v).is_ok_and(|c| &c == self))
            .map(|v| format!("mit_b{v}"))
    }

    /// Checks the config before anything is allocated.
    pub fn validate(&self) -> Result<(), ModelError> {
        for s in 0..4 {
            let (c, h) = (self.embed_dims[s], self.heads[s]);
            if c == 0 || h == 0 || c % h != 0 {
                return Err(ModelError::InvalidConfig(format!(
                    "stage {} has {c} channels and {h} heads; the heads must divide the channels",
                    s + 1
                )));
            }
        }
        if self.depths.contains(&0) || self.sr_ratios.contains(&0) || self.mlp_ratio == 0 {
            return Err(ModelError::InvalidConfig(format!(
                "every MiT stage needs a block, a reduction ratio and an MLP ratio of at least \
                 1, got depths {:?}, sr_ratios {:?}, mlp_ratio {}",
                self.depths, self.sr_ratios, self.mlp_ratio
            )));
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            return Err(ModelError::InvalidConfig(format!(
                "drop_path must be in [0, 1), got {}",
                self.drop_path
            )));
        }
        Ok(())
    }

    /// Channels of the stage-4 features (the input of DAFormer's feature distance).
    pub fn out_channels(&self) -> usize {
        self.embed_dims[3]
    }

    /// Builds the encoder with the reference's random initialisation: truncated-normal-like
    /// N(0, 0.02) linear weights with zero biases, LayerNorms at 1 and 0, convs N(0,
    /// sqrt(2 / fan_out)) with zero biases.
    pub fn init(&self, device: &Device) -> Result<MixTransformer, ModelError> {
        self.validate()?;
        let total: usize = self.depths.iter().sum();
        let rate = |i: usize| {
            if total > 1 {
                self.drop_path * i as f64 / (total - 1) as f64
            } else {
                0.0
            }
        };
        let mut block_index = 0;
        let mut stages = Vec::with_capacity(4);
        let mut cin = 3;
        for s in 0..4 {
            let c = self.embed_dims[s];
            let (kernel, stride) = if s == 0 { (7, 4) } else { (3, 2) };
            let patch_embed = PatchEmbed {
                proj: conv(cin, c, kernel, stride, kernel / 2, 1, device),
                norm: LayerNormConfig::new(c)
                    .with_epsilon(DEFAULT_NORM_EPS)
                    .init(device),
            };
            let blocks = (0..self.depths[s])
                .map(|_| {
                    let block = Block::new(
                        c,
                        self.heads[s],
                        self.sr_ratios[s],
                        c * self.mlp_ratio,
                        rate(block_index),
                        device,
                    );
                    block_index += 1;
                    block
                })
                .collect();
            stages.push(MitStage {
                patch_embed,
                blocks,
                norm: LayerNormConfig::new(c)
                    .with_epsilon(BLOCK_NORM_EPS)
                    .init(device),
            });
            cin = c;
        }
        Ok(MixTransformer { stages })
    }
}

/// SegFormer's encoder: four maps `[N, C_s, H/2^(s+2), W/2^(s+2)]` per image batch.
#[derive(Module, Debug)]
pub struct MixTransformer {
    /// Stages 1-4.
    pub stages: Vec<MitStage>,
}

/// One encoder stage: patch embedding, blocks, final LayerNorm.
#[derive(Module, Debug)]
pub struct MitStage {
    /// The overlapping patch embedding (`patch_embed{s}`).
    pub patch_embed: PatchEmbed,
    /// The transformer blocks (`block{s}.{j}`).
    pub blocks: Vec<Block>,
    /// The stage's final LayerNorm (`norm{s}`).
    pub norm: LayerNorm,
}

/// A strided conv whose kernel overlaps its neighbours, then a LayerNorm over channels.
#[derive(Module, Debug)]
pub struct PatchEmbed {
    /// 7x7 stride 4 (stage 1) or 3x3 stride 2 (stages 2-4), padding half the kernel.
    pub proj: Conv2d,
    /// LayerNorm with eps 1e-5.
    pub norm: LayerNorm,
}

/// `x + DropPath(Attn(LN(x)))`, then `x + DropPath(MixFFN(LN(x)))`.
#[derive(Module, Debug)]
pub struct Block {
    /// LayerNorm before the attention.
    pub norm1: LayerNorm,
    /// Efficient self-attention.
    pub attn: Attention,
    /// LayerNorm before the Mix-FFN.
    pub norm2: LayerNorm,
    /// The Mix-FFN.
    pub mlp: MixFfn,
    /// Probability of dropping this block's residual branches per sample in training.
    #[module(skip)]
    drop_path: f64,
}

/// Multi-head self-attention whose keys and values come from the map reduced by a strided conv
/// (`sr`, stride `sr_ratio`) and a LayerNorm (absent when the ratio is 1).
#[derive(Module, Debug)]
pub struct Attention {
    /// Queries.
    pub q: Linear,
    /// Keys then values, `C -> 2C`.
    pub kv: Linear,
    /// Output projection.
    pub proj: Linear,
    /// The spatial reduction, `Conv2d(C, C, sr, stride sr)`.
    pub sr: Option<Conv2d>,
    /// LayerNorm after the reduction (eps 1e-5).
    pub norm: Option<LayerNorm>,
    #[module(skip)]
    heads: usize,
}

/// `fc1 -> depthwise 3x3 conv -> GELU -> fc2`.
#[derive(Module, Debug)]
pub struct MixFfn {
    /// `C -> hidden`.
    pub fc1: Linear,
    /// Depthwise 3x3 conv with bias over the hidden channels (`mlp.dwconv.dwconv`).
    pub dwconv: Conv2d,
    /// `hidden -> C`.
    pub fc2: Linear,
}

fn conv(
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    groups: usize,
    device: &Device,
) -> Conv2d {
    let fan_out = kernel * kernel * cout / groups;
    let config = Conv2dConfig::new([cin, cout], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(
            padding, padding, padding, padding,
        ))
        .with_groups(groups)
        .with_initializer(Initializer::Normal {
            mean: 0.0,
            std: (2.0 / fan_out as f64).sqrt(),
        });
    let mut conv = config.init(device);
    conv.bias = Some(Param::from_tensor(Tensor::zeros([cout], device)));
    conv
}

fn linear(cin: usize, cout: usize, device: &Device) -> Linear {
    let mut linear = LinearConfig::new(cin, cout)
        .with_initializer(Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        })
        .init(device);
    linear.bias = Some(Param::from_tensor(Tensor::zeros([cout], device)));
    linear
}

impl Block {
    fn new(
        channels: usize,
        heads: usize,
        sr_ratio: usize,
        hidden: usize,
        drop_path: f64,
        device: &Device,
    ) -> Self {
        let block_norm = || {
            LayerNormConfig::new(channels)
                .with_epsilon(BLOCK_NORM_EPS)
                .init(device)
        };
        let reduced = sr_ratio > 1;
        Self {
            norm1: block_norm(),
            attn: Attention {
                q: linear(channels, channels, device),
                kv: linear(channels, 2 * channels, device),
                proj: linear(channels, channels, device),
                sr: reduced.then(|| conv(channels, channels, sr_ratio, sr_ratio, 0, 1, device)),
                norm: reduced.then(|| {
                    LayerNormConfig::new(channels)
                        .with_epsilon(DEFAULT_NORM_EPS)
                        .init(device)
                }),
                heads,
            },
            norm2: block_norm(),
            mlp: MixFfn {
                fc1: linear(channels, hidden, device),
                dwconv: conv(hidden, hidden, 3, 1, 1, hidden, device),
                fc2: linear(hidden, channels, device),
            },
            drop_path,
        }
    }

    /// `x` is `[N, H*W, C]` of an `h x w` map.
    fn forward(&self, x: Tensor<3>, [h, w]: [usize; 2], noise: &mut Noise<'_>) -> Tensor<3> {
        let branch = self.attn.forward(self.norm1.forward(x.clone()), [h, w]);
        let x = x + drop_path(branch, self.drop_path, noise);
        let branch = self.mlp.forward(self.norm2.forward(x.clone()), [h, w]);
        x + drop_path(branch, self.drop_path, noise)
    }
}

impl Attention {
    fn forward(&self, x: Tensor<3>, [h, w]: [usize; 2]) -> Tensor<3> {
        let [n, tokens, c] = x.dims();
        let heads = self.heads;
        let d = c / heads;
        // [N, heads, tokens, d]
        let q = self
            .q
            .forward(x.clone())
            .reshape([n, tokens, heads, d])
            .swap_dims(1, 2);
        let source = match (&self.sr, &self.norm) {
            (Some(sr), Some(norm)) => {
                let map = tokens_to_map(x, [h, w]);
                let reduced = conv_forward(sr, map);
                norm.forward(map_to_tokens(reduced))
            }
            _ => x,
        };
        let [_, kv_tokens, _] = source.dims();
        // [N, kv_tokens, 2, heads, d]: keys are the first C outputs, values the next C.
        let kv = self.kv.forward(source).reshape([n, kv_tokens, 2, heads, d]);
        let k = kv
            .clone()
            .narrow(2, 0, 1)
            .reshape([n, kv_tokens, heads, d])
            .swap_dims(1, 2);
        let v = kv
            .narrow(2, 1, 1)
            .reshape([n, kv_tokens, heads, d])
            .swap_dims(1, 2);
        let scale = (d as f64).powf(-0.5);
        let attn = softmax(q.matmul(k.swap_dims(2, 3)).mul_scalar(scale), 3);
        let out = attn.matmul(v).swap_dims(1, 2).reshape([n, tokens, c]);
        self.proj.forward(out)
    }
}

impl MixFfn {
    fn forward(&self, x: Tensor<3>, [h, w]: [usize; 2]) -> Tensor<3> {
        let hidden = self.fc1.forward(x);
        let hidden = conv_forward(&self.dwconv, tokens_to_map(hidden, [h, w]));
        self.fc2.forward(gelu(map_to_tokens(hidden)))
    }
}

impl MixTransformer {
    /// The four stage outputs of `images` `[N, 3, H, W]`, as `[N, C_s, H_s, W_s]` maps;
    /// stochastic depth draws from `noise` when it has a source.
    pub fn forward(&self, images: Tensor<4>, noise: &mut Noise<'_>) -> Vec<Tensor<4>> {
        let mut x = images;
        let mut features = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            let map = conv_forward(&stage.patch_embed.proj, x);
            let [_, _, h, w] = map.dims();
            let mut tokens = stage.patch_embed.norm.forward(map_to_tokens(map));
            for block in &stage.blocks {
                tokens = block.forward(tokens, [h, w], noise);
            }
            x = tokens_to_map(stage.norm.forward(tokens), [h, w]);
            features.push(x.clone());
        }
        features
    }
}

/// `[N, C, H, W]` -> `[N, H*W, C]`.
fn map_to_tokens(map: Tensor<4>) -> Tensor<3> {
    let [n, c, h, w] = map.dims();
    map.reshape([n, c, h * w]).swap_dims(1, 2)
}

/// `[N, H*W, C]` -> `[N, C, H, W]`.
fn tokens_to_map(tokens: Tensor<3>, [h, w]: [usize; 2]) -> Tensor<4> {
    let [n, _, c] = tokens.dims();
    tokens.swap_dims(1, 2).reshape([n, c, h, w])
}

/// Stochastic depth (timm's `DropPath`): each sample's branch is zeroed with probability `p`
/// and the others scaled by `1 / (1 - p)`, when `noise` has a source (training); teachers and
/// inference keep every branch.
fn drop_path(branch: Tensor<3>, p: f64, noise: &mut Noise<'_>) -> Tensor<3> {
    let [n, _, _] = branch.dims();
    match noise.keep_mask(n, p) {
        Some(mask) => {
            let mask = Tensor::<3>::from_data(TensorData::new(mask, [n, 1, 1]), &branch.device());
            branch * mask
        }
        None => branch,
    }
}
