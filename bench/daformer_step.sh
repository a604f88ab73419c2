#!/usr/bin/env bash
# Times a MiT-B0 + DAFormer-decoder training step (source CE, AdamW with DAFormer's parameter
# groups) on dag's flex backend and on PyTorch CPU, alternating, and prints each run's ratio and
# their median; then the peak memory of DAFormer's whole self-training step on flex. See
# BENCHMARKS.md, "DAFormer step".
#
#   bench/daformer_step.sh [PYTHON] [--runs N] [--size HxW] [--batch N]
#     PYTHON    an interpreter with torch (default /var/tmp/torch-venv/bin/python)
#     --runs N  comparisons, dag and PyTorch alternating (default 3)
#     --size    image size (default 512x512, DAFormer's crops); --batch (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=/var/tmp/torch-venv/bin/python
RUNS=3
SIZE=512x512
BATCH=2
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) RUNS="${2:?--runs needs a number}"; shift ;;
        --size) SIZE="${2:?--size needs HxW}"; shift ;;
        --batch) BATCH="${2:?--batch needs a number}"; shift ;;
        *) PY="$1" ;;
    esac
    shift
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/dag-target}"
cargo build --release -q -p dag-train --features wgpu --example daformer_step
bin="$CARGO_TARGET_DIR/release/examples/daformer_step"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) cores, \
$(grep -m1 -o 'avx512f' /proc/cpuinfo || echo 'no avx512f'), $(grep -m1 -o 'avx2' /proc/cpuinfo)"
ratios=()
for run in $(seq 1 "$RUNS"); do
    echo "== run $run of $RUNS"
    dag_out="$("$bin" --size "$SIZE" --batch "$BATCH" --mode ce)"
    echo "$dag_out"
    torch_out="$("$PY" bench/daformer_step/daformer_step_torch.py --size "$SIZE" --batch "$BATCH")"
    echo "$torch_out"
    dag="$(awk '$2 == "daformer_ce_step_ms" { print $3 }' <<<"$dag_out")"
    torch="$(awk '$2 == "daformer_ce_step_ms" { print $3 }' <<<"$torch_out")"
    ratio="$(awk -v a="$dag" -v b="$torch" 'BEGIN { printf "%.2f", a / b }')"
    echo "ratio dag-flex/pytorch daformer_ce_step_ms $ratio"
    ratios+=("$ratio")
done
median="$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{ a[NR] = $1 }
    END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }')"
echo "ratio dag-flex/pytorch daformer_ce_step_ms median $median of ${ratios[*]}"
echo "== DAFormer's whole self-training step (teacher, ClassMix, feature distance) on flex"
"$bin" --size "$SIZE" --batch "$BATCH" --mode daformer --warmup 1 --steps 2
