#!/usr/bin/env bash
# GPU proof on a machine with Python 3.12, PyTorch + CUDA, JAX + CUDA and NumPy 2, without TensorFlow, MXNet
# or internet: equivalence checks of torch, keras-jax and keras-torch on the GPU for every zoo model, then a
# short timing run on cpu and gpu. Under 5 minutes; JSON results and the log go to OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR [--wheels DIR] [--cpu-dry-run] [--jobs N]
#
# Keras and the pure-Python packages it and nncompare need travel as wheels (about 5 MiB), fetched on a
# machine with internet (optree is compiled: fetch the wheel for the GPU machine's Python and platform):
#   pip download --no-deps -d wheels/ "keras==3.15.*" absl-py rich markdown-it-py mdurl pygments namex \
#       packaging tabulate tqdm
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d wheels/ optree
# (ml_dtypes comes with JAX; h5py is only for saving Keras files and is not needed.) The wheels are
# unpacked into OUTDIR/pydeps, never into the machine's Python. Default DIR: shared/wheels of the checkout.
# Exit: 0 all ok, 1 a check differs or failed, 2 bad usage, 3 no GPU visible (nothing checked).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { echo "usage: $0 OUTDIR [--wheels DIR] [--cpu-dry-run] [--jobs N]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUTDIR="$1"; shift
WHEELS="$ROOT/shared/wheels"
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || usage; WHEELS="$2"; shift 2 ;;
    --cpu-dry-run) ARGS+=(--cpu-dry-run); shift ;;
    --jobs) [ $# -ge 2 ] || usage; ARGS+=(--jobs "$2"); shift 2 ;;
    *) usage ;;
  esac
done
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import keras, tabulate, tqdm" 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: Keras (or tabulate/tqdm) is not importable and $WHEELS holds no wheels: see the header of $0" >&2
    exit 2
  fi
  "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$OUTDIR/pydeps" "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$OUTDIR/pydeps"
fi
exec "$PYTHON" "$ROOT/benchmarks/gpu_check.py" "$OUTDIR" ${ARGS[@]+"${ARGS[@]}"}
