#!/usr/bin/env bash
# Preprocess throughput and peak memory.
#
# Generates synthetic Cityscapes-format trees at 2048x1024 (the real Cityscapes size, so the
# resize is real work) with two different numbers of images, then times `preprocess`
# (PNG decode + bicubic resize to 1024x512 + label mapping + shard writing) on each and reports
# images/s and the peak resident memory from /usr/bin/time -v. Equal peak memory for both sizes
# shows that memory does not grow with the dataset.
#
# Usage: bench/preprocess.sh [small_n] [large_n]      (default 60 240)
# Env:   CARGO_TARGET_DIR (default /var/tmp/dag-target), WORK (default: a fresh temp dir,
#        removed at the end unless KEEP=1), RAYON_NUM_THREADS (default: all cores).
set -euo pipefail

small=${1:-60}
large=${2:-240}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/dag-target}
here=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-$(mktemp -d /var/tmp/dag-bench-preprocess.XXXXXX)}
[ -n "${KEEP:-}" ] || trap 'rm -rf "$work"' EXIT

cargo build --release --quiet -p dag-data --example datatool --manifest-path "$here/Cargo.toml"
tool=$CARGO_TARGET_DIR/release/examples/datatool

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for n in "$small" "$large"; do
    data=$work/data-$n
    if [ ! -d "$data/target" ]; then
        echo "generating $n images at 2048x1024 ..."
        "$tool" synth "$data" 2048 1024 0 "$n" 0 7 >/dev/null
    fi
    rm -rf "$work/out-$n"
    # Drop nothing from the page cache: the PNGs were just written, as in a pipeline run.
    /usr/bin/time -v "$tool" prep cityscapes "$data/target" train 19 1024 512 "$work/out-$n" \
        >"$work/prep-$n.json" 2>"$work/time-$n.txt"
    rss_kb=$(awk -F: '/Maximum resident set size/ {gsub(/ /, "", $2); print $2}' "$work/time-$n.txt")
    printf '%5d images: %s  peak RSS %d MiB\n' "$n" "$(cat "$work/prep-$n.json")" $((rss_kb / 1024))
done
