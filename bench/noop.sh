#!/usr/bin/env bash
# No-op and scale benchmarks of the dag engine, with DVC on the same pipeline for comparison.
#
#   bench/noop.sh            (RUNS=10 by default; DVC=/var/tmp/dvc-venv/bin/dvc; DAG_BIN=... skips the build)
#
# Needs: hyperfine (apt-get install -y hyperfine), python3, and for the comparison DVC in a venv:
#   python3 -m venv /var/tmp/dvc-venv && /var/tmp/dvc-venv/bin/pip install dvc
# Prints a table of medians; BENCHMARKS.md records one run of it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
RUNS=${RUNS:-10}
DVC=${DVC:-/var/tmp/dvc-venv/bin/dvc}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/dag-target}

# DAG_BIN=path/to/dag skips the build.
if [ -z "${DAG_BIN:-}" ]; then
  cargo build --release -p dag --manifest-path "$repo/Cargo.toml" >&2
fi
DAG=${DAG_BIN:-$CARGO_TARGET_DIR/release/dag}
command -v hyperfine >/dev/null || { echo "bench/noop.sh needs hyperfine (apt-get install -y hyperfine)" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/var/tmp}/dag-bench.XXXXXX")
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
median() { python3 -c 'import json,sys; print("%.1f" % (json.load(open(sys.argv[1]))["results"][0]["median"]*1000))' "$1"; }

# 1. The 7-stage pipeline over 64 MiB: no-op `dag run`.
python3 "$here/noop/gen.py" seven "$work/seven"
cp -r "$work/seven" "$work/seven-dvc"
(cd "$work/seven" && "$DAG" run pipeline.yaml -q)
(cd "$work/seven" && hyperfine -N --runs "$RUNS" --warmup 2 --export-json "$work/dag7.json" "$DAG run pipeline.yaml -q" >&2)
dag7=$(median "$work/dag7.json")

# 2. The same pipeline under `dvc repro`.
dvc7=n/a
if [ -x "$DVC" ]; then
  (cd "$work/seven-dvc" && "$DVC" init --no-scm -q && "$DVC" repro -q >/dev/null)
  (cd "$work/seven-dvc" && hyperfine -N --runs "$RUNS" --warmup 1 --export-json "$work/dvc7.json" "$DVC repro -q" >&2)
  dvc7=$(median "$work/dvc7.json")
else
  echo "DVC not found at $DVC; skipping the comparison" >&2
fi

# 3. 1,000 generated stages: first run (every stage executes), then no-op plan and run.
python3 "$here/noop/gen.py" chain "$work/chain" 1000
cd "$work/chain"
t0=$(date +%s%N); "$DAG" run pipeline.yaml -q; t1=$(date +%s%N)
first_ms=$(( (t1 - t0) / 1000000 ))
# What the 1,000 commands cost by themselves (fork + exec of sh, one write each).
mkdir -p "$work/base/o"
t0=$(date +%s%N); for i in $(seq 0 999); do sh -c "echo $i > $work/base/o/$i.txt"; done; t1=$(date +%s%N)
base_ms=$(( (t1 - t0) / 1000000 ))
hyperfine -N --runs "$RUNS" --warmup 1 --export-json "$work/plan1k.json" "$DAG plan pipeline.yaml" >&2
hyperfine -N --runs "$RUNS" --warmup 1 --export-json "$work/run1k.json" "$DAG run pipeline.yaml -q" >&2
plan1k=$(median "$work/plan1k.json")
run1k=$(median "$work/run1k.json")
per_stage=$(python3 -c "print('%.2f' % (($first_ms - $base_ms) / 1000))")

# 4. Hashing throughput of a 1 GiB output (memory-mapped, multi-threaded blake3).
head -c 1073741824 /dev/urandom > "$work/big.bin"
"$DAG" hash "$work/big.bin" >/dev/null
gbs=$(for i in 1 2 3 4 5; do "$DAG" hash "$work/big.bin"; done | sed -E 's/.*\(([0-9.]+) GB\/s\)/\1/' | sort -n | sed -n 3p)

ratio=n/a
[ "$dvc7" != n/a ] && ratio=$(python3 -c "print('%.0fx' % ($dvc7 / $dag7))")
cat <<TABLE
| measurement                                             | result |
|---------------------------------------------------------|--------|
| no-op \`dag run\`, 7 stages over 64 MiB (median of $RUNS) | $dag7 ms |
| no-op \`dvc repro\`, same pipeline (median of $RUNS)      | $dvc7 ms |
| dvc / dag                                               | $ratio |
| 1,000 stages: no-op \`dag plan\` (median)                 | $plan1k ms |
| 1,000 stages: no-op \`dag run\` (median)                  | $run1k ms |
| 1,000 stages: first run, all executed                   | $first_ms ms |
| 1,000 bare \`sh -c\` commands, same work                  | $base_ms ms |
| engine bookkeeping per executed stage                   | $per_stage ms |
| hashing a 1 GiB file (median of 5)                      | $gbs GB/s |
TABLE
