#!/usr/bin/env bash
# pkwrap's GPU check from a fresh clone: install the package (building the C++ core
# here), then run bench/gpu_check.py, which prints one summary table (see its docstring).
#
#   bash bench/gpu_check.sh [gpu_check.py options, e.g. --quick --profile DIR]
#
# Uses the python3 on PATH with its own torch (CUDA build) and, where it has them,
# pytest, triton and tensorboard. Works offline: if pip cannot reach an index, the
# package is installed without build isolation and without dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
echo "== installing pkwrap (C++ core built with ${PKWRAP_BUILD_JOBS:-all} jobs)"
t0=$(date +%s)
if ! $PY -m pip install -q --no-build-isolation --no-deps -e . ; then
  echo "pip install -e . failed; building the extension in place instead"
  $PY setup.py -q build_ext --inplace || { echo "gpu_check: the C++ core does not build"; exit 1; }
fi
$PY - <<'PY' || exit 1
import importlib
missing = [m for m in ("torch", "numpy", "pytest") if importlib.util.find_spec(m) is None]
if missing:
    raise SystemExit("gpu_check: missing Python packages: %s" % ", ".join(missing))
for m in ("kaldiio", "triton", "tensorboard"):
    if importlib.util.find_spec(m) is None:
        print("gpu_check: note: %s is not installed (the checks that need it report it)" % m)
PY
echo "== installed in $(( $(date +%s) - t0 )) s"
exec $PY bench/gpu_check.py "$@"
