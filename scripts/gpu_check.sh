#!/usr/bin/env bash
# GPU checks for whoever has a CUDA GPU: the GPU tests and the GPU benchmarks,
# in under 5 minutes.  Run from anywhere:  bash scripts/gpu_check.sh
# Needs petbind installed with a CuPy wheel for the machine's CUDA, e.g.
#   python3 -m pip install -e '.[test]' cupy-cuda12x
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
status=0
if ! $PY -c 'import cupy, sys; sys.exit(0 if cupy.cuda.runtime.getDeviceCount() > 0 else 1)' 2>/dev/null; then
  echo "gpu_check: CuPy cannot see a CUDA GPU (install cupy-cuda12x or cupy-cuda13x to match the driver)" >&2
  exit 2
fi
$PY -c 'import cupy; p = cupy.cuda.runtime.getDeviceProperties(0); print("GPU:", p["name"].decode(), "| CuPy", cupy.__version__, "| CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())'
echo "== pytest -m gpu"
timeout 150 $PY -m pytest -q -m gpu -p no:cacheprovider || status=1
echo "== benchmarks/projectors.py --device gpu (size ci)"
timeout 60 $PY benchmarks/projectors.py --device gpu --oracle-lors 300 || status=1
echo "== benchmarks/projectors.py --device gpu (size mmr)"
timeout 90 $PY benchmarks/projectors.py --device gpu --size mmr --oracle-lors 100 --listmode-events 20000000 || status=1
echo "== benchmarks/quant.py --device gpu"
timeout 60 $PY benchmarks/quant.py --device gpu || status=1
exit $status
