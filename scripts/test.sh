#!/usr/bin/env bash
# Runs the whole test suite the way CI does, after setting up what the tests need:
#  - Mesa's software Vulkan (lavapipe) for the WGPU training test,
#  - Chromium, which opens the HTML report in tests/report_browser.rs,
#  - a Python venv with numpy, pyarrow, duckdb, pillow, pandas and polars for the
#    external-reader, README-command and reference tests.
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

if ! "$venv/bin/python" -c 'import numpy, pyarrow, duckdb, PIL, pandas, polars' >/dev/null 2>&1; then
    echo "== creating $venv with numpy, pyarrow, duckdb, pillow, pandas and polars"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check numpy pyarrow duckdb pillow pandas polars
fi
export DAG_TEST_PYTHON="$venv/bin/python"

# --no-fail-fast: one failing test binary must not hide the results of the others; cargo still
# exits non-zero when any test failed.
exec cargo test --release --workspace --features wgpu --no-fail-fast "$@"
