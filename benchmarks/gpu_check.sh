#!/usr/bin/env bash
# The GPU check: CUDA tests (no host synchronization in the fused loss and the callback's per-batch work), the loss
# benchmark on the GPU (training and no-grad, against F.cross_entropy, up to 16384 x 131072 in bf16 and fp32, with
# achieved bandwidth as a share of the device's peak), and a short fastai fit with CalibrationCallback; one summary.
#
#     bash benchmarks/gpu_check.sh                # on a CUDA machine, from a checkout carrying .whl/ (8 min at most)
#     bash benchmarks/gpu_check.sh --cpu-dry-run  # without a GPU: all that can run, Triton in its interpreter
#
# The GPU machine has PyTorch and Triton but not fastai, and no registry: fastai and the pure-Python packages it
# imports come from the wheels in .whl/ (download them first, where a registry is reachable, with
# benchmarks/gpu_wheels.sh). Other arguments go to benchmarks/gpu_check.py (--help lists them).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DRY_RUN=0
for arg in "$@"; do [[ $arg == --cpu-dry-run ]] && DRY_RUN=1; done

SITE=$(mktemp -d)  # the wheels are installed there, and nowhere else
trap 'rm -rf "$SITE"' EXIT
if [[ $DRY_RUN == 1 ]]; then
    export TRITON_INTERPRET=1  # read when triton is imported
    # The wheels are for the GPU machine's Python 3.12: install them as such (pure Python, and plum's sources).
    WHEEL_TARGET=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux2014_x86_64)
else
    WHEEL_TARGET=()
fi

if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check: no wheels in .whl/ (run benchmarks/gpu_wheels.sh where a registry is reachable)" >&2
    exit 2
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${WHEEL_TARGET[@]}" .whl/*.whl || exit 2
export PYTHONPATH="$SITE:$PWD"
export GPU_CHECK_WHEELS="$SITE"
# The C kernel of the CPU path (optional: the tests' CPU references run without it too).
"$PYTHON" setup.py -q build_ext --inplace >/dev/null 2>&1 || echo "gpu_check: the C kernel was not built" >&2
"$PYTHON" benchmarks/gpu_check.py "$@"  # not exec: the trap removes $SITE afterwards
