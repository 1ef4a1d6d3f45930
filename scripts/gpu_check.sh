#!/usr/bin/env bash
# One-shot GPU acceptance run, for a machine with a CUDA GPU, offline too.
# Under 5 minutes on an H100/H200; prints one table to paste into a note.
#
#   bash scripts/gpu_check.sh          (from anywhere; PYTHON=... picks the interpreter)
#
# It runs, with the real CuPy (the test stand-in is never used where CuPy reaches a GPU):
#   1. pytest -m gpu                  every GPU test of the suite
#   2. benchmarks/gpu_acceptance.py   kernel build (NVRTC, the device's sm), TOF offsets beyond
#      2^31 against the NumPy oracle, forward/back adjointness on the device, span-11 mMR
#      non-TOF projection times, a span-11 mMR TOF OSEM iteration (time, peak memory against
#      the memory model), a 40 M-event TOF listmode OSEM iteration, voxelwise BF-SRTM
#      128x128x64x25 (time, GPU vs CPU)
#
# Needs on the machine: NumPy and a working CuPy (pip install 'petbind[gpu-cuda12]' or
# '[gpu-cuda13]'), and a C++ compiler (g++) for the CPU kernels the tests compare with.
# Everything else comes as wheels in .whl/ (git-ignored) next to this repository: on a
# connected machine with the GPU machine's Python version and platform, run
#
#   python3 -m pip download -d .whl --no-deps --only-binary=:all: \
#       --python-version 3.11 --platform manylinux_2_28_x86_64 \
#       scipy tqdm h5py pytest iniconfig pluggy packaging pygments
#
# (about 40 MB) and carry .whl/ with the working tree (a device run: carry=[".whl"]).
# Missing modules are then installed from .whl/ without their dependencies into
# .gpu-check-site/ (git-ignored), never over the machine's NumPy or CuPy.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=.gpu-check-site
NEEDED="scipy tqdm h5py pytest iniconfig pluggy packaging pygments"

if ! $PY -c 'import numpy, cupy' 2>/dev/null; then
  echo "gpu_check: NumPy and CuPy must be importable by $PY; install one CuPy wheel with its CUDA libraries:" \
       "pip install 'petbind[gpu-cuda12]' (or [gpu-cuda13]), never two CuPy wheels" >&2
  exit 2
fi
export PYTHONPATH="$PWD:$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
missing=""
for pkg in $NEEDED; do
  $PY -c "import $pkg" 2>/dev/null || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  if [ ! -d .whl ]; then
    echo "gpu_check: missing Python packages:$missing; put their wheels in .whl/ (see the top of $0)" >&2
    exit 2
  fi
  echo "== installing from .whl/ into $SITE:$missing"
  $PY -m pip install -q --no-index --find-links .whl --no-deps --target "$SITE" $missing || exit 2
fi
command -v "${CXX:-g++}" >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 ||
  echo "gpu_check: warning: no C++ compiler; the CPU side of the GPU-vs-CPU tests falls back to NumPy (slow)" >&2
if ! $PY -c 'import sys; from petbind.core.device import gpu_status; ok, why = gpu_status(); print("GPU:", why or "usable"); sys.exit(0 if ok else 1)'; then
  echo "gpu_check: the GPU is not usable (reason above)" >&2
  exit 2
fi
export PETBIND_CACHE_DIR="${PETBIND_CACHE_DIR:-$PWD/.pytest_cache/petbind}"

status=0
echo "== pytest -m gpu"
start=$(date +%s)
timeout 150 $PY -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee .gpu-check-pytest.log | tail -25
rc=${PIPESTATUS[0]}
summary=$(grep -E '^[=]* ?[0-9]+ (passed|failed)' .gpu-check-pytest.log | tail -1 | tr -d '=' | sed 's/^ *//')
[ "$rc" -eq 0 ] || status=1
SIZE=${GPU_CHECK_SIZE:-full}  # tiny: the same checks on small problems (for testing this script)
echo "== benchmarks/gpu_acceptance.py --size $SIZE"
timeout 150 $PY benchmarks/gpu_acceptance.py --size "$SIZE" \
  --pytest-summary "rc=$rc; ${summary:-no summary}; $(( $(date +%s) - start )) s wall" || status=1
rm -f .gpu-check-pytest.log
exit $status
