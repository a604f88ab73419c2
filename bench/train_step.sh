#!/usr/bin/env bash
# Times a DeepLabV2-small training step (CE and AdvEnt) on dag's flex backend and on PyTorch CPU
# in the same run, and prints the dag/PyTorch ratios. See BENCHMARKS.md, "Training step".
#
#   bench/train_step.sh [PYTHON]     # PYTHON: an interpreter with torch (default
#                                    # /var/tmp/torch-venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/dag-target}"
PY="${1:-/var/tmp/torch-venv/bin/python}"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
cargo run --release -q -p dag-train --features wgpu --example train_step -- --warmup 3 --steps 10 | tee "$out"
"$PY" bench/train_step/train_step_torch.py --warmup 3 --steps 10 | tee -a "$out"
awk '
  $2 ~ /_ms$/ { t[$1 " " $2] = $3 }
  END {
    for (k in t) {
      split(k, p, " ")
      if (p[1] == "dag" && ("pytorch " p[2]) in t)
        printf "ratio dag/pytorch %s %.2f\n", p[2], t[k] / t["pytorch " p[2]]
    }
  }' "$out" | sort
