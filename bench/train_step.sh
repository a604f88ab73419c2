#!/usr/bin/env bash
# Times a DeepLabV2-small training step (CE, AdvEnt and DACS) on dag's flex backend, on dag's LibTorch
# backend (`device: tch`) and on PyTorch CPU in the same run, and prints the dag/PyTorch ratios.
# See BENCHMARKS.md, "Training step".
#
#   bench/train_step.sh [PYTHON] [--no-tch] [--runs N]
#     PYTHON    an interpreter with torch (default /var/tmp/torch-venv/bin/python); its libtorch
#               is also what the `tch` build links against (bench/libtorch/README.md)
#     --no-tch  time flex and PyTorch only (no second build of Burn)
#     --runs N  repeat the whole comparison N times (default 1), dag and PyTorch alternating, and
#               print each run's ratios and their median: on a shared VM one run's ratio can be
#               off by a third
set -euo pipefail
cd "$(dirname "$0")/.."
PY=/var/tmp/torch-venv/bin/python
TCH=1
RUNS=1
while [ $# -gt 0 ]; do
    case "$1" in
        --no-tch) TCH=0 ;;
        --runs)
            RUNS="${2:?--runs needs a number}"
            shift
            ;;
        *) PY="$1" ;;
    esac
    shift
done
all="$(mktemp)"
out="$(mktemp)"
trap 'rm -f "$out" "$all"' EXIT
# One comparison: dag (flex, then tch unless --no-tch), then PyTorch, then the ratios.
one_run() {
    [ "$RUNS" = 1 ] || echo "== run $run of $RUNS ($(date -u +%H:%M:%S) UTC, steal so far: $(awk '/^cpu /{print $9}' /proc/stat) ticks)"
    : >"$out"
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
      }' "$out" | sort | tee -a "$all"
}

for run in $(seq 1 "$RUNS"); do
    one_run
done
if [ "$RUNS" -gt 1 ]; then
    echo "== median of $RUNS runs"
    # Each ratio's runs, then the median (sorted, middle one or mean of the middle two).
    awk '$1 == "ratio" { v[$2 " " $3] = v[$2 " " $3] " " $4 }
        END { for (k in v) print k v[k] }' "$all" | sort | while read -r who step values; do
        median="$(tr ' ' '\n' <<<"$values" | sort -g | awk '{ a[NR] = $1 }
            END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }')"
        echo "ratio $who $step median $median of $values"
    done
fi
