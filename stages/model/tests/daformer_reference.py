"""An independent PyTorch MiT encoder and DAFormer decoder, and the fixtures of
stages/model/tests/daformer.rs that it writes.

Written from SegFormer's and DAFormer's published architecture (mix_transformer.py,
daformer_head.py) with their parameter names, so that its state dicts are the files dag must
read. CI has no PyTorch (its wheels bring gigabytes of CUDA libraries), so the outputs are
committed; regenerate them with

  python stages/model/tests/daformer_reference.py stages/model/tests/fixtures/daformer

which writes, per decoder fusion (`sep_aspp`, `conv1x1`), `parity_FUSION/model.pth` (a MiT-B0
DAFormer in DAFormer's naming), and `tensors.json` with `*.bin` (little-endian f32): the input,
the eval-mode logits, the train-mode logits, the loss weights and the gradients of
sum(weights * train logits) with respect to a few parameters; and `mit_b0.pth`, `mit_b5.pth`
(SegFormer's ImageNet naming with the 1000-class `head.*`, every tensor filled with its index)
with their key lists `mit_bN.keys.json`.

Every tensor is saved as a view: the weights as strided windows of a few random storages (one
per fan-in octave, so activations keep their scale), the ImageNet files as expanded scalars. A
full MiT-B0 (and B5) thus fits in a few hundred kilobytes, and dag's reader sees the strided
and zero-stride views PyTorch writes.
"""

import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = {
    0: ([32, 64, 160, 256], [2, 2, 2, 2]),
    1: ([64, 128, 320, 512], [2, 2, 2, 2]),
    2: ([64, 128, 320, 512], [3, 4, 6, 3]),
    3: ([64, 128, 320, 512], [3, 4, 18, 3]),
    4: ([64, 128, 320, 512], [3, 8, 27, 3]),
    5: ([64, 128, 320, 512], [3, 6, 40, 3]),
}
HEADS = [1, 2, 5, 8]
SR = [8, 4, 2, 1]


class EfficientAttention(nn.Module):
    def __init__(self, dim, heads, sr):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.reduce = sr > 1
        if self.reduce:
            self.sr = nn.Conv2d(dim, dim, sr, stride=sr)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        d = c // self.heads
        q = self.q(x).view(b, n, self.heads, d).transpose(1, 2)
        src = x
        if self.reduce:
            grid = x.transpose(1, 2).reshape(b, c, h, w)
            src = self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        k, v = self.kv(src).view(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class DepthwiseConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class MixFfn(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, h, w):
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    def __init__(self, dim, heads, sr, drop):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientAttention(dim, heads, sr)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFfn(dim, 4 * dim)
        self.drop = drop

    def drop_path(self, x):
        if not self.training or self.drop == 0.0:
            return x
        keep = 1 - self.drop
        mask = torch.rand(x.shape[0], 1, 1).lt(keep).to(x.dtype)
        return x * mask / keep

    def forward(self, x, h, w):
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class PatchEmbed(nn.Module):
    def __init__(self, cin, dim, kernel, stride):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj(x)
        _, _, h, w = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class MiT(nn.Module):
    def __init__(self, variant, drop_path):
        super().__init__()
        dims, depths = VARIANTS[variant]
        self.dims = dims
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        cin, j = 3, 0
        for s in range(4):
            kernel, stride = (7, 4) if s == 0 else (3, 2)
            setattr(self, f"patch_embed{s + 1}", PatchEmbed(cin, dims[s], kernel, stride))
            blocks = []
            for _ in range(depths[s]):
                blocks.append(Block(dims[s], HEADS[s], SR[s], rates[j]))
                j += 1
            setattr(self, f"block{s + 1}", nn.ModuleList(blocks))
            setattr(self, f"norm{s + 1}", nn.LayerNorm(dims[s], eps=1e-6))
            cin = dims[s]

    def forward(self, x):
        outs = []
        for s in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{s}")(x)
            for block in getattr(self, f"block{s}"):
                x = block(x, h, w)
            x = getattr(self, f"norm{s}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
            outs.append(x)
        return outs


class ConvModule(nn.Module):
    def __init__(self, cin, cout, kernel, dilation=1, groups=1):
        super().__init__()
        pad = dilation * (kernel // 2)
        self.conv = nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class SeparableConv(nn.Module):
    def __init__(self, cin, cout, dilation):
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, 3, dilation, groups=cin)
        self.pointwise_conv = ConvModule(cin, cout, 1)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class SepAspp(nn.Module):
    def __init__(self, cin, channels, dilations):
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvModule(cin, channels, 1) if d == 1 else SeparableConv(cin, channels, d)
            for d in dilations)
        self.bottleneck = ConvModule(len(dilations) * channels, channels, 3)

    def forward(self, x):
        return self.bottleneck(torch.cat([m(x) for m in self.aspp_modules], dim=1))


class Embed(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.proj = nn.Linear(cin, cout)

    def forward(self, x):
        b, c, h, w = x.shape
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)


class Head(nn.Module):
    def __init__(self, dims, embed, channels, classes, fusion, dropout):
        super().__init__()
        self.embed_layers = nn.ModuleList(Embed(c, embed) for c in dims)
        if fusion == "sep_aspp":
            self.fuse_layer = SepAspp(4 * embed, channels, [1, 6, 12, 18])
        else:
            self.fuse_layer = ConvModule(4 * embed, channels, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, classes, 1)

    def forward(self, feats):
        size = feats[0].shape[2:]
        embedded = [
            F.interpolate(e(f), size=size, mode="bilinear", align_corners=False)
            if f.shape[2:] != size else e(f)
            for e, f in zip(self.embed_layers, feats)
        ]
        return self.conv_seg(self.dropout(self.fuse_layer(torch.cat(embedded, dim=1))))


class DAFormer(nn.Module):
    def __init__(self, variant, fusion, classes, embed=256, channels=256, dropout=0.0,
                 drop_path=0.0):
        super().__init__()
        self.backbone = MiT(variant, drop_path)
        self.decode_head = Head(self.backbone.dims, embed, channels, classes, fusion, dropout)

    def forward(self, x):
        return self.decode_head(self.backbone(x))


def write(out, tensors):
    meta = {}
    for name, t in tensors.items():
        t = t.detach().contiguous().float()
        with open(os.path.join(out, name + ".bin"), "wb") as f:
            f.write(t.numpy().astype("<f4").tobytes())
        meta[name] = list(t.shape)
    with open(os.path.join(out, "tensors.json"), "w") as f:
        json.dump(meta, f, indent=1)


# Parameters whose gradients the parity test compares, one of each kind of layer.
GRAD_PARAMS = [
    "backbone.patch_embed1.proj.weight",
    "backbone.patch_embed2.norm.weight",
    "backbone.block1.0.attn.q.weight",
    "backbone.block1.1.attn.sr.bias",
    "backbone.block1.1.attn.norm.bias",
    "backbone.block2.0.attn.kv.bias",
    "backbone.block3.1.mlp.dwconv.dwconv.weight",
    "backbone.block4.1.mlp.fc2.bias",
    "backbone.norm4.weight",
    "decode_head.embed_layers.0.proj.weight",
    "decode_head.conv_seg.weight",
]
ASPP_GRAD_PARAMS = [
    "decode_head.fuse_layer.aspp_modules.0.bn.weight",
    "decode_head.fuse_layer.aspp_modules.2.depthwise_conv.conv.weight",
    "decode_head.fuse_layer.aspp_modules.3.pointwise_conv.bn.weight",
    "decode_head.fuse_layer.bottleneck.bn.bias",
]


STORAGE = 4096


class Views:
    """Parameters as strided views of shared random storages."""

    def __init__(self, generator):
        self.generator = generator
        self.storages = {}

    def storage(self, key, make):
        if key not in self.storages:
            self.storages[key] = make(torch.empty(STORAGE)).contiguous()
        return self.storages[key]

    def view(self, base, shape):
        strides = {1: (1,), 2: (3, 1), 4: (3, 2, 5, 1)}[len(shape)]
        reach = sum((n - 1) * st for n, st in zip(shape, strides)) + 1
        offset = int(torch.randint(0, STORAGE - reach, (1,), generator=self.generator))
        return base.as_strided(shape, strides, offset)

    def parameter(self, name, p):
        g = self.generator
        if name.endswith("running_var"):
            base = self.storage("var", lambda t: t.uniform_(0.5, 2.0, generator=g))
        elif name.endswith("running_mean") or name.endswith("bias"):
            base = self.storage("bias", lambda t: t.uniform_(-0.2, 0.2, generator=g))
        elif p.dim() == 1:
            base = self.storage("gain", lambda t: t.uniform_(0.5, 1.5, generator=g))
        else:
            octave = round(math.log2(p[0].numel()))
            base = self.storage(octave, lambda t: t.normal_(0.0, 2.0 ** (-octave / 2),
                                                             generator=g))
        return self.view(base, tuple(p.shape))


def parity(out, variant, fusion):
    torch.manual_seed(0)
    model = DAFormer(variant, fusion, classes=7, embed=64, channels=48)
    views = Views(torch.Generator().manual_seed(0))
    state = {}
    for name, t in model.state_dict().items():
        state[name] = t if name.endswith("num_batches_tracked") else views.parameter(name, t)
    model.load_state_dict(state)
    os.makedirs(out, exist_ok=True)
    torch.save(state, os.path.join(out, "model.pth"))
    # 40x40 at stride 4, so that every tap of the dilation-18 branch reads the map.
    x = torch.randn(1, 3, 160, 160)
    model.eval()
    with torch.no_grad():
        eval_logits = model(x)
    model.train()
    train_logits = model(x)
    loss_weights = torch.randn_like(train_logits)
    (train_logits * loss_weights).sum().backward()
    params = dict(model.named_parameters())
    names = GRAD_PARAMS + (ASPP_GRAD_PARAMS if fusion == "sep_aspp" else [
        "decode_head.fuse_layer.conv.weight", "decode_head.fuse_layer.bn.weight"])
    tensors = {
        "input": x,
        "eval_logits": eval_logits,
        "train_logits": train_logits,
        "loss_weights": loss_weights,
    }
    for name in names:
        tensors["grad_" + name] = params[name].grad
    write(out, tensors)


def imagenet(out, variant):
    encoder = MiT(variant, 0.1)
    state = dict(encoder.state_dict())
    state["head.weight"] = torch.zeros(1000, encoder.dims[3])
    state["head.bias"] = torch.zeros(1000)
    state = {k: torch.full((1,), float(i)).expand(t.shape) if t.dim() else t
             for i, (k, t) in enumerate(state.items())}
    torch.save(state, os.path.join(out, f"mit_b{variant}.pth"))
    with open(os.path.join(out, f"mit_b{variant}.keys.json"), "w") as f:
        json.dump(list(state.keys()), f, indent=0)


if __name__ == "__main__":
    out = sys.argv[1]
    for fusion in ["sep_aspp", "conv1x1"]:
        parity(os.path.join(out, f"parity_{fusion}"), 0, fusion)
    for variant in [0, 5]:
        imagenet(out, variant)
