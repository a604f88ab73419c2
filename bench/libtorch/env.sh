# Sourced by bench scripts (and by hand) before building dag with `--features tch`:
#
#   source bench/libtorch/env.sh [PYTHON]
#
# Points torch-sys at the libtorch inside an installed PyTorch package (so nothing is downloaded),
# lets it build against a newer libtorch than the 2.9 that tch 0.22 was generated for, and keeps
# this build's artifacts apart from the default target directory (other features of Burn).
_dag_libtorch_python="${1:-${DAG_TORCH_PYTHON:-/var/tmp/torch-venv/bin/python}}"
if ! "$_dag_libtorch_python" -c 'import torch' 2>/dev/null; then
    echo "error: $_dag_libtorch_python cannot import torch; pass an interpreter with PyTorch" >&2
    return 1 2>/dev/null || exit 1
fi
_dag_libtorch_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export VIRTUAL_ENV="$(cd "$(dirname "$_dag_libtorch_python")/.." && pwd)"
export PATH="$(dirname "$_dag_libtorch_python"):$PATH"
export LIBTORCH_USE_PYTORCH=1
export LIBTORCH_BYPASS_VERSION_CHECK=1
export CXX="$_dag_libtorch_here/cxx"
export LD_LIBRARY_PATH="$("$_dag_libtorch_python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CARGO_TARGET_DIR="${DAG_TCH_TARGET_DIR:-/var/tmp/dag-target-tch}"
unset _dag_libtorch_python _dag_libtorch_here
