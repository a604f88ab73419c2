#!/usr/bin/env python3
"""Generates the benchmark pipelines of bench/noop.sh (standard library only).

  gen.py seven DIR     the 7-stage shell pipeline over 64 MiB, as pipeline.yaml and dvc.yaml
  gen.py chain DIR N   N trivial shell stages, each reading the previous one's out
"""
import os
import sys

# (name, cmd, deps, outs) -- the same commands for dag and DVC.
SEVEN = [
    ("gen", "cp src/data.bin data/raw.bin", ["src/data.bin"], ["data/raw.bin"]),
    ("head", "head -c 33554432 data/raw.bin > data/a.bin", ["data/raw.bin"], ["data/a.bin"]),
    ("tail", "tail -c 33554432 data/raw.bin > data/b.bin", ["data/raw.bin"], ["data/b.bin"]),
    ("join", "cat data/a.bin data/b.bin > data/c.bin", ["data/a.bin", "data/b.bin"], ["data/c.bin"]),
    ("sum", "cksum data/c.bin > data/sum.txt", ["data/c.bin"], ["data/sum.txt"]),
    ("size", "wc -c < data/a.bin > data/size.txt", ["data/a.bin"], ["data/size.txt"]),
    ("report", "cat data/sum.txt data/size.txt > report.txt", ["data/sum.txt", "data/size.txt"], ["report.txt"]),
]


def seven(d):
    os.makedirs(os.path.join(d, "src"), exist_ok=True)
    os.makedirs(os.path.join(d, "data"), exist_ok=True)
    with open(os.path.join(d, "src", "data.bin"), "wb") as f:
        f.write(os.urandom(64 << 20))
    with open(os.path.join(d, "pipeline.yaml"), "w") as f:
        f.write("name: seven\nstages:\n")
        for name, cmd, deps, outs in SEVEN:
            f.write(f"  {name}:\n    kind: shell\n    params:\n      cmd: '{cmd}'\n")
            f.write(f"      deps: [{', '.join(deps)}]\n      outs: [{', '.join(outs)}]\n")
    with open(os.path.join(d, "dvc.yaml"), "w") as f:
        f.write("stages:\n")
        for name, cmd, deps, outs in SEVEN:
            f.write(f"  {name}:\n    cmd: '{cmd}'\n")
            f.write(f"    deps: [{', '.join(deps)}]\n    outs: [{', '.join(outs)}]\n")


def chain(d, n):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "pipeline.yaml"), "w") as f:
        f.write("name: chain\nstages:\n")
        for i in range(n):
            deps = f"[o/{i - 1}.txt]" if i else "[]"
            f.write(f"  s{i}: {{ kind: shell, params: {{ cmd: 'echo {i} > o/{i}.txt', deps: {deps}, outs: [o/{i}.txt] }} }}\n")


if __name__ == "__main__":
    if sys.argv[1] == "seven":
        seven(sys.argv[2])
    elif sys.argv[1] == "chain":
        chain(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)
