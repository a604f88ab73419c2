"""PyTorch twin of bench/daformer_step/main.rs (`--mode ce`): MiT-B0 with DAFormer's decoder
(the independent implementation of stages/model/tests/daformer_reference.py, SegFormer's and
DAFormer's architecture: dropout 0.1, stochastic depth to 0.1), 19 classes, random images and
block labels, the logits resized to the labels (bilinear, align_corners=False) and
cross-entropy with 255 ignored; AdamW lr 6e-5 with the decoder at 10x and no weight decay on
parameters whose name contains `norm` (DAFormer's `custom_keys`), weight decay 0.01 elsewhere.

    /var/tmp/torch-venv/bin/python bench/daformer_step/daformer_step_torch.py \
        [--warmup 2] [--steps 5] [--size 512x512] [--batch 2]

Benchmark only; never needed by CI.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../stages/model/tests"))
from daformer_reference import DAFormer  # noqa: E402

CLASSES = 19


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    print(f"pytorch: DAFormer mit_b0, {CLASSES} classes, {args.batch} x {h}x{w}, ce step, "
          f"{threads} threads, median of {args.steps} after {args.warmup} warm-up")
    model = DAFormer(0, "sep_aspp", CLASSES, dropout=0.1, drop_path=0.1).train()
    groups = {(False, False): [], (False, True): [], (True, False): [], (True, True): []}
    for name, p in model.named_parameters():
        groups[(name.startswith("decode_head"), "norm" in name)].append(p)
    lr = 6e-5
    opt = torch.optim.AdamW(
        [{"params": ps, "lr": lr * (10 if head else 1), "weight_decay": 0.0 if norm else 0.01}
         for (head, norm), ps in groups.items() if ps],
        lr=lr, betas=(0.9, 0.999), eps=1e-8)
    ys, xs = torch.meshgrid(torch.arange(h) // 32, torch.arange(w) // 32, indexing="ij")
    labels = torch.stack([(ys * 7 + xs * 3 + i) % CLASSES for i in range(args.batch)])
    times = []
    for i in range(args.warmup + args.steps):
        x = torch.rand(args.batch, 3, h, w) * 2 - 1
        t = time.perf_counter()
        logits = model(x)
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    print(f"pytorch daformer_ce_step_ms {statistics.median(times) * 1e3:.1f}")


if __name__ == "__main__":
    main()
