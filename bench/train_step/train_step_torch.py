"""PyTorch twin of bench/train_step/main.rs: the same DeepLabV2-small (Caffe-style bottlenecks
[2,2,2,2], width 0.25, dilation 2/4, ceil-mode stem pool, frozen-affine BatchNorm in training
mode, four-branch classifier heads on layer3/layer4), the same discriminators (ndf 64), losses,
optimisers (SGD 0.9/5e-4 with 10x heads, Adam 0.9/0.99/1e-8) and step structure, timed on CPU;
the DACS step follows DACS's trainUDA.py, with kornia 0.5.8's colour jitter and Gaussian blur
written out in torch ops (kornia is not needed).

    /var/tmp/torch-venv/bin/python bench/train_step/train_step_torch.py [--warmup 3] [--steps 10]

Benchmark only; never needed by CI.
"""

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

W, H, CLASSES, WIDTH, BLOCKS = 256, 128, 19, 0.25, [2, 2, 2, 2]


def scaled(c):
    return max(1, round(c * WIDTH))


def frozen_bn(c):
    bn = nn.BatchNorm2d(c)
    for p in bn.parameters():
        p.requires_grad = False
    return bn


class Bottleneck(nn.Module):
    def __init__(self, cin, planes, stride, dilation, first):
        super().__init__()
        out = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, stride=stride, bias=False)
        self.bn1 = frozen_bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = frozen_bn(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = frozen_bn(out)
        self.downsample = None
        # ADVENT's _make_layer: only a stage's first block projects its shortcut.
        if first and (stride != 1 or cin != out or dilation > 1):
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, out, 1, stride=stride, bias=False), frozen_bn(out)
            )

    def forward(self, x):
        r = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + r)


class Classifier(nn.Module):
    def __init__(self, cin, classes):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(cin, classes, 3, padding=d, dilation=d) for d in (6, 12, 18, 24)
        )
        for m in self.conv2d_list:
            m.weight.data.normal_(0, 0.01)

    def forward(self, x):
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
        return out


class DeepLabV2(nn.Module):
    def __init__(self):
        super().__init__()
        stem = scaled(64)
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = frozen_bn(stem)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        cin = stem
        geometry = [(1, 1), (2, 1), (1, 2), (1, 4)]
        for i, (n, planes, (stride, dil)) in enumerate(
            zip(BLOCKS, [scaled(64), scaled(128), scaled(256), scaled(512)], geometry)
        ):
            blocks = []
            for b in range(n):
                blocks.append(Bottleneck(cin, planes, stride if b == 0 else 1, dil, b == 0))
                cin = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.layer5 = Classifier(scaled(256) * 4, CLASSES)
        self.layer6 = Classifier(scaled(512) * 4, CLASSES)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        aux = self.layer5(x)
        return aux, self.layer6(self.layer4(x))

    def optim_parameters(self, lr):
        heads = list(self.layer5.parameters()) + list(self.layer6.parameters())
        ids = {id(p) for p in heads}
        backbone = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": backbone, "lr": lr}, {"params": heads, "lr": 10 * lr}]


def discriminator(classes, ndf=64):
    layers, cin = [], classes
    for i, c in enumerate([ndf, ndf * 2, ndf * 4, ndf * 8, 1]):
        layers.append(nn.Conv2d(cin, c, 4, stride=2, padding=1))
        if i < 4:
            layers.append(nn.LeakyReLU(0.2))
        cin = c
    return nn.Sequential(*layers)


def self_information(logits):
    p = F.softmax(logits, dim=1)
    return -p * torch.log2(p + 1e-30) / math.log2(logits.shape[1])


def bce(x, label):
    return F.binary_cross_entropy_with_logits(x, torch.full_like(x, label))


MEAN_BGR = torch.tensor([104.00698793, 116.66876762, 122.67891434]).view(1, 3, 1, 1)


def rgb_to_hsv(img, eps=1e-6):
    """kornia 0.5.8's rgb_to_hsv (hue in radians)."""
    maxc, max_idx = img.max(dim=1)
    minc = img.min(dim=1)[0]
    v = maxc
    delta = maxc - minc
    s = delta / (v + eps)
    delta = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = torch.unbind(maxc.unsqueeze(1) - img, dim=1)
    h = torch.stack([bc - gc, 2.0 * delta + rc - bc, 4.0 * delta + gc - rc], dim=1)
    h = torch.gather(h, dim=1, index=max_idx.unsqueeze(1)).squeeze(1)
    h = ((h / delta) / 6.0) % 1.0
    return 2 * math.pi * h, s, v


def hsv_to_rgb(h, s, v):
    """kornia 0.5.8's hsv_to_rgb."""
    h = h / (2 * math.pi)
    hi = torch.floor(h * 6) % 6
    f = ((h * 6) % 6) - hi
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    hi = hi.long().unsqueeze(1)
    idx = torch.cat([hi, hi + 6, hi + 12], dim=1)
    table = torch.stack((v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q), dim=1)
    return torch.gather(table, 1, idx)


def color_jitter(x, s=0.25):
    """kornia 0.5.8 ColorJitter(s, s, s, s) on one image in [0, 1], factors and order drawn."""
    b, c, sat = [float(torch.empty(1).uniform_(max(0, 1 - s), 1 + s)) for _ in range(3)]
    hue = float(torch.empty(1).uniform_(-s, s))
    for op in torch.randperm(4).tolist():
        if op == 0:
            x = (x + (b - 1)).clamp(0, 1)
        elif op == 1:
            x = (x * c).clamp(0, 1)
        elif op == 2:
            h, sv, v = rgb_to_hsv(x)
            x = hsv_to_rgb(h, (sv * sat).clamp(0, 1), v)
        else:
            h, sv, v = rgb_to_hsv(x)
            x = hsv_to_rgb(torch.fmod(h + 2 * math.pi * hue, 2 * math.pi), sv, v)
    return x


def gaussian_blur(x):
    """DACS's gaussian_blur: kornia GaussianBlur2d, sigma ~ U(0.15, 1.15), reflect padding."""
    sigma = float(torch.empty(1).uniform_(0.15, 1.15))

    def size(side):
        c = math.ceil(0.1 * side)
        return c if c % 2 else c - 1

    def gauss(k):
        g = torch.exp(-((torch.arange(k) - k // 2).float() ** 2) / (2 * sigma**2))
        return g / g.sum()

    ky, kx = size(x.shape[2]), size(x.shape[3])
    k2 = torch.outer(gauss(ky), gauss(kx)).expand(3, 1, ky, kx)
    x = F.pad(x, (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect")
    return F.conv2d(x, k2, groups=3)


def dacs_step(model, ema, opt, xs, ys, xt, up):
    """One DACS iteration (trainUDA.py): source CE, teacher pseudo-labels, ClassMix of half of
    the source image's classes, jitter and blur, weighted CE on the mixed image, SGD step, EMA
    update."""
    opt.zero_grad()
    _, main_s = model(xs)
    loss_l = F.cross_entropy(up(main_s), ys, ignore_index=255)
    with torch.no_grad():
        _, main_t = ema(xt)
        prob, pseudo = torch.max(F.softmax(up(main_t), dim=1), dim=1)
    classes = torch.unique(ys[0])
    n = classes.shape[0]
    picked = classes[torch.randperm(n)[: (n + n % 2) // 2]]
    mask = torch.isin(ys[0], picked).float()[None]
    mixed = mask[:, None] * xs + (1 - mask[:, None]) * xt
    mixed = color_jitter((mixed + MEAN_BGR) / 255) * 255 - MEAN_BGR
    mixed = gaussian_blur(mixed)
    y_mix = (mask * ys + (1 - mask) * pseudo).long()
    weight = (prob >= 0.968).float().mean()
    w_mix = mask + (1 - mask) * weight
    _, main_m = model(mixed)
    loss_u = (w_mix * F.cross_entropy(up(main_m), y_mix, ignore_index=255, reduction="none")).mean()
    loss = loss_l + loss_u
    loss.backward()
    opt.step()
    return loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(1234)
    threads = torch.get_num_threads()
    print(
        f"pytorch {torch.__version__} cpu: same config, {threads} threads, "
        f"median of {args.steps} after {args.warmup} warm-up"
    )

    def batch():
        x = torch.rand(1, 3, H, W) * 100 - 50
        y = torch.randint(0, CLASSES, (1, H, W))
        y[torch.rand(1, H, W) < 0.05] = 255
        return x, y

    def up(t):
        return F.interpolate(t, size=(H, W), mode="bilinear", align_corners=True)

    def run(advent):
        model = DeepLabV2().train()
        lr, lr_d = 2.5e-4, 1e-4
        opt = torch.optim.SGD(model.optim_parameters(lr), lr=lr, momentum=0.9, weight_decay=5e-4)
        d_main, d_aux = discriminator(CLASSES).train(), discriminator(CLASSES).train()
        opt_dm = torch.optim.Adam(d_main.parameters(), lr=lr_d, betas=(0.9, 0.99), eps=1e-8)
        opt_da = torch.optim.Adam(d_aux.parameters(), lr=lr_d, betas=(0.9, 0.99), eps=1e-8)
        times = []
        for i in range(args.warmup + args.steps):
            xs, ys = batch()
            xt, _ = batch()
            t0 = time.perf_counter()
            opt.zero_grad()
            opt_dm.zero_grad()
            opt_da.zero_grad()
            for d in (d_main, d_aux):
                for p in d.parameters():
                    p.requires_grad = False
            aux_s, main_s = model(xs)
            aux_s, main_s = up(aux_s), up(main_s)
            loss = F.cross_entropy(main_s, ys, ignore_index=255) + 0.1 * F.cross_entropy(
                aux_s, ys, ignore_index=255
            )
            loss.backward()
            if advent:
                aux_t, main_t = model(xt)
                aux_t, main_t = up(aux_t), up(main_t)
                adv = 0.001 * bce(d_main(self_information(main_t)), 0.0) + 0.0002 * bce(
                    d_aux(self_information(aux_t)), 0.0
                )
                adv.backward()
                for d in (d_main, d_aux):
                    for p in d.parameters():
                        p.requires_grad = True
                for d, s, t in ((d_main, main_s, main_t), (d_aux, aux_s, aux_t)):
                    ld = (
                        bce(d(self_information(s.detach())), 0.0)
                        + bce(d(self_information(t.detach())), 1.0)
                    ) / 2
                    ld.backward()
                opt_dm.step()
                opt_da.step()
            opt.step()
            float(loss.detach())
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def run_dacs():
        model = DeepLabV2().train()
        ema = DeepLabV2().train()
        ema.load_state_dict(model.state_dict())
        for p in ema.parameters():
            p.requires_grad = False
        lr = 2.5e-4
        opt = torch.optim.SGD(model.optim_parameters(lr), lr=lr, momentum=0.9, weight_decay=5e-4)
        times = []
        for i in range(args.warmup + args.steps):
            xs, ys = batch()
            xt, _ = batch()
            t0 = time.perf_counter()
            loss = dacs_step(model, ema, opt, xs, ys, xt, up)
            alpha = min(1 - 1 / (i + 1), 0.99)
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), model.parameters()):
                    pe.data[:] = alpha * pe.data + (1 - alpha) * p.data
            float(loss.detach())
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    model = DeepLabV2().eval()
    x, _ = batch()
    fwd = []
    with torch.no_grad():
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            aux, main = model(x)
            float(aux.sum() + main.sum())
            if i >= args.warmup:
                fwd.append(time.perf_counter() - t0)
    print(f"pytorch forward_ms {statistics.median(fwd) * 1e3:.1f}")
    print(f"pytorch ce_step_ms {run(False) * 1e3:.1f}")
    print(f"pytorch advent_step_ms {run(True) * 1e3:.1f}")
    print(f"pytorch dacs_step_ms {run_dacs() * 1e3:.1f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
