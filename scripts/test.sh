#!/usr/bin/env bash
# Runs the whole test suite the way CI does, after setting up what the tests need:
#  - Mesa's software Vulkan (lavapipe) for the WGPU training test,
#  - Chromium, which opens the HTML report in tests/report_browser.rs,
#  - a Python venv with numpy, pyarrow, duckdb, pillow, pandas and polars for the
#    external-reader, README-command and reference tests, and moto's S3-compatible server,
#    started on 127.0.0.1 for the shared-cache tests.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh -p dag-metrics`).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/dag-target}"
venv="${DAG_TEST_VENV:-/var/tmp/dag-test-venv}"

if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing mesa-vulkan-drivers (software Vulkan for the WGPU test)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers >/dev/null
    else
        echo "error: the WGPU test needs Mesa's software Vulkan driver (lavapipe)." >&2
        echo "       install it with: sudo apt-get install mesa-vulkan-drivers" >&2
        exit 1
    fi
fi

if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing chromium (the browser check of \`dag report\`)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "warning: no Chromium; tests/report_browser.rs skips its browser check" >&2
        echo "         (install it with: sudo apt-get install chromium)" >&2
    fi
fi

if ! "$venv/bin/python" -c 'import numpy, pyarrow, duckdb, PIL, pandas, polars, moto, boto3' >/dev/null 2>&1; then
    echo "== creating $venv with numpy, pyarrow, duckdb, pillow, pandas, polars and moto's S3 server"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check numpy pyarrow duckdb pillow pandas polars 'moto[server]'
fi
export DAG_TEST_PYTHON="$venv/bin/python"

# An S3-compatible server on 127.0.0.1 with one bucket for the shared-cache tests
# (tests/remote_cache.rs); stopped when the tests end.
s3_port="${DAG_TEST_S3_PORT:-9917}"
"$venv/bin/moto_server" -H 127.0.0.1 -p "$s3_port" >"${TMPDIR:-/tmp}/dag-test-s3.log" 2>&1 &
s3_pid=$!
trap 'kill "$s3_pid" 2>/dev/null || true' EXIT
export DAG_TEST_S3_ENDPOINT="http://127.0.0.1:$s3_port"
export DAG_TEST_S3_BUCKET=dag-test
make_bucket="import boto3
boto3.client('s3', endpoint_url='$DAG_TEST_S3_ENDPOINT', aws_access_key_id='dag-test',
             aws_secret_access_key='dag-test-secret', region_name='us-east-1'
             ).create_bucket(Bucket='$DAG_TEST_S3_BUCKET')"
for _ in $(seq 100); do
    "$venv/bin/python" -c "$make_bucket" 2>/dev/null && break
    sleep 0.2
done

# --no-fail-fast: one failing test binary must not hide the results of the others; cargo still
# exits non-zero when any test failed.
cargo test --release --workspace --features wgpu --no-fail-fast "$@"
