#!/usr/bin/env bash
# Runs pipelines/quickstart.yaml from an empty cache once per training seed and prints each run's
# wall time, the mIoU of source-only, AdvEnt and IntraDA (best snapshot on val, as the shipped
# file reports), the two steps, and the entropy score's Spearman correlation with the
# generator's difficulty; then the mean of each column. See BENCHMARKS.md, "Quickstart".
#
#   bench/quickstart.sh [SEED...]      (default: 1234 0 1; a run takes about 4 minutes here, more on a contended VM)
#
# Every run sees the same images (`synth` has its own `seed` param; the pipeline seed is the
# training seed), so only the training seeds change. Work files go to $DAG_BENCH_DIR (default
# /var/tmp/dag-bench-quickstart); $DAG_BENCH_PIPELINE runs a variant of the quickstart instead.
#
# $DAG_BENCH_DEVICE runs every stage on that device (`--device`, e.g. `tch`), with the dag binary
# in $DAG_BENCH_DAG (no build; for tch, a binary built and run as bench/libtorch/README.md says).
#
# Besides the wall time, each row has the CPU time the run used (user + system, all threads) and
# the share of the machine's CPU time the hypervisor took away while it ran (`steal` in
# /proc/stat): on a shared VM a high steal makes the wall time overstate what two dedicated
# cores need.
set -euo pipefail
cd "$(dirname "$0")/.."
pipeline_src="${DAG_BENCH_PIPELINE:-pipelines/quickstart.yaml}"
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(1234 0 1)
work="${DAG_BENCH_DIR:-/var/tmp/dag-bench-quickstart}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/dag-target}"
if [ -n "${DAG_BENCH_DAG:-}" ]; then
    dag="$DAG_BENCH_DAG"
else
    cargo build --release -q --features wgpu -p dag
    dag="$CARGO_TARGET_DIR/release/dag"
fi
device_args=()
[ -z "${DAG_BENCH_DEVICE:-}" ] || device_args=(--device "$DAG_BENCH_DEVICE")
mkdir -p "$work"
# The machine's steal ticks and all its ticks so far (first line of /proc/stat).
cpu_ticks() { awk '/^cpu / { for (i = 2; i <= NF; i++) t += $i; print $9, t }' /proc/stat; }
results="$work/results.tsv"
printf 'seed\tseconds\tcpu_seconds\tsteal_pct\tsource_only\tadvent\tintrada\tadvent_step\tintrada_step\tspearman\n' >"$results"
for seed in "${seeds[@]}"; do
    if ! [[ "$seed" =~ ^[0-9]+$ ]]; then
        echo "seed $seed: use a non-negative integer" >&2
        exit 2
    fi
    pipeline="$work/quickstart-seed$seed.yaml"
    sed -e "s/^seed: .*/seed: $seed/" "$pipeline_src" >"$pipeline"
    grep -q "^seed: $seed\$" "$pipeline" || {
        echo "could not set the seed in $pipeline: has the seed line of $pipeline_src changed?" >&2
        exit 1
    }
    rm -rf "$work/cache-$seed" "$work/out-$seed"
    log="$work/run-seed$seed.log"
    echo "seed $seed: running (log: $log)" >&2
    steal_before=$(cpu_ticks)
    TIMEFORMAT='%R %U %S'
    { time "$dag" run "$pipeline" ${device_args[@]+"${device_args[@]}"} --cache "$work/cache-$seed" \
        --out "$work/out-$seed" >"$log" 2>&1; } 2>"$work/time-$seed"
    steal_after=$(cpu_ticks)
    steal=$(echo "$steal_before $steal_after" | awk '{ printf "%.1f", 100 * ($3 - $1) / ($4 - $2) }')
    spearman=$("$dag" show "$pipeline" entropy ${device_args[@]+"${device_args[@]}"} --cache "$work/cache-$seed" |
        awk '$2 == "spearman_difficulty" { printf "%.3f", $4 }')
    read -r wall user sys <"$work/time-$seed"
    awk -v seed="$seed" -v wall="$wall" -v cpu="$(echo "$user $sys" | awk '{ print $1 + $2 }')" \
        -v steal="$steal" -v rho="$spearman" '
        $1 == "source_only" { s = $(NF - 2) } $1 == "advent" { a = $(NF - 2) } $1 == "intrada" { i = $(NF - 2) }
        END { printf "%s\t%.0f\t%.0f\t%s\t%.2f\t%.2f\t%.2f\t%+.2f\t%+.2f\t%s\n", seed, wall, cpu, steal, s, a, i, a - s, i - a, rho }
    ' "$log" | tee -a "$results"
done
echo
column -t -s $'\t' "$results"
awk -F'\t' 'NR > 1 { n++; for (c = 2; c <= 10; c++) sum[c] += $c }
    END { if (n) { printf "mean"; for (c = 2; c <= 10; c++) printf "  %.2f", sum[c] / n; printf "  (%d seeds)\n", n } }' "$results"
