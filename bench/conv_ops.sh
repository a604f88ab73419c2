#!/usr/bin/env bash
# Times each kind of convolution of the training-step benchmark model on dag's flex backend
# and on PyTorch CPU in the same run: forward pass, weight gradient, input gradient (ms), and
# the dag/PyTorch ratio of their sum. See BENCHMARKS.md, "im2col convolutions on flex".
#
#   bench/conv_ops.sh [PYTHON]
#     PYTHON    an interpreter with torch (default /var/tmp/torch-venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-/var/tmp/torch-venv/bin/python}"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
(
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/dag-target}"
    cargo run --release -q -p dag-model --features wgpu --example conv_ops -- --reps 7
) | tee "$out"
"$PY" bench/conv_ops/conv_ops_torch.py --reps 7 | tee -a "$out"
printf "%-26s %9s %9s %7s\n" "conv (fwd+wgrad+xgrad)" "dag ms" "torch ms" "ratio"
awk '
  { total[$1 " " $2] = $3 + $4 + $5; order[$2] = NR }
  END {
    for (name in order) {
      d = total["dag-flex " name]; p = total["pytorch " name]
      if (d != "" && p != "") printf "%-26s %9.2f %9.2f %7.2f\n", name, d, p, d / p
    }
  }' "$out" | sort -k1,1
