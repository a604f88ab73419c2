#!/usr/bin/env bash
# Times a DeepLabV2-small training step (CE and AdvEnt) on dag's flex backend, on dag's LibTorch
# backend (`device: tch`) and on PyTorch CPU in the same run, and prints the dag/PyTorch ratios.
# See BENCHMARKS.md, "Training step".
#
#   bench/train_step.sh [PYTHON] [--no-tch]
#     PYTHON    an interpreter with torch (default /var/tmp/torch-venv/bin/python); its libtorch
#               is also what the `tch` build links against (bench/libtorch/README.md)
#     --no-tch  time flex and PyTorch only (no second build of Burn)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=/var/tmp/torch-venv/bin/python
TCH=1
for a in "$@"; do
    case "$a" in
        --no-tch) TCH=0 ;;
        *) PY="$a" ;;
    esac
done
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
(
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/dag-target}"
    cargo run --release -q -p dag-train --features wgpu --example train_step -- \
        --warmup 3 --steps 10 --device flex
) | tee "$out"
if [ "$TCH" = 1 ]; then
    (
        # shellcheck source=bench/libtorch/env.sh
        source bench/libtorch/env.sh "$PY"
        cargo run --release -q -p dag-train --features tch --example train_step -- \
            --warmup 3 --steps 10 --device tch
    ) | tee -a "$out"
fi
"$PY" bench/train_step/train_step_torch.py --warmup 3 --steps 10 | tee -a "$out"
awk '
  $2 ~ /_ms$/ { t[$1 " " $2] = $3 }
  END {
    for (k in t) {
      split(k, p, " ")
      if (p[1] ~ /^dag-/ && ("pytorch " p[2]) in t)
        printf "ratio %s/pytorch %s %.2f\n", p[1], p[2], t[k] / t["pytorch " p[2]]
    }
  }' "$out" | sort
