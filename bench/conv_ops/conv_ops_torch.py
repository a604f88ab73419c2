"""PyTorch twin of bench/conv_ops/main.rs: the same convolutions on CPU, same timings.

    python bench/conv_ops/conv_ops_torch.py [--reps 7] [--threads 2]

Prints `pytorch NAME fwd_ms wgrad_ms xgrad_ms` per conv (medians; the gradients are the extra
time of a backward pass that computes them).
"""

import argparse
import statistics
import time

import torch

# name, in, out, kernel, stride, padding, dilation, height, width (as CASES in main.rs)
CASES = [
    ("disc1_19-64_4x4s2", 19, 64, 4, 2, 1, 1, 128, 256),
    ("disc2_64-128_4x4s2", 64, 128, 4, 2, 1, 1, 64, 128),
    ("disc3_128-256_4x4s2", 128, 256, 4, 2, 1, 1, 32, 64),
    ("disc4_256-512_4x4s2", 256, 512, 4, 2, 1, 1, 16, 32),
    ("disc5_512-1_4x4s2", 512, 1, 4, 2, 1, 1, 8, 16),
    ("stem_3-16_7x7s2", 3, 16, 7, 2, 3, 1, 128, 256),
    ("layer1_16-16_3x3", 16, 16, 3, 1, 1, 1, 33, 65),
    ("layer4_128-128_3x3d4", 128, 128, 3, 1, 4, 4, 17, 33),
    ("classifier_512-19_3x3d12", 512, 19, 3, 1, 12, 12, 17, 33),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name, cin, cout, k, s, p, d, h, w in CASES:
        conv = torch.nn.Conv2d(cin, cout, k, s, p, d)
        x0 = torch.randn(1, cin, h, w)
        forward, weight_only, both = [], [], []
        for _ in range(args.reps):
            t = time.perf_counter()
            with torch.no_grad():
                conv(x0).sum().item()
            forward.append((time.perf_counter() - t) * 1e3)

            conv.zero_grad()
            t = time.perf_counter()
            conv(x0).sum().backward()
            conv.weight.grad.sum().item()
            weight_only.append((time.perf_counter() - t) * 1e3)

            conv.zero_grad()
            x = x0.clone().requires_grad_()
            t = time.perf_counter()
            conv(x).sum().backward()
            conv.weight.grad.sum().item()
            x.grad.sum().item()
            both.append((time.perf_counter() - t) * 1e3)
        f, wo, b = (statistics.median(v) for v in (forward, weight_only, both))
        print(f"pytorch {name} {f:.2f} {wo - f:.2f} {b - wo:.2f}")


if __name__ == "__main__":
    main()
