#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels that benchmarks/gpu_check.sh installs on a GPU machine that has
# PyTorch, Triton and the scientific stack but not fastai, and cannot reach a package registry.
#
#     bash benchmarks/gpu_wheels.sh        # here, with a registry; then carry .whl/ with the working tree
#
# The list is fastai and the pure-Python packages it imports that such a machine lacks: fastai's own (fastcore,
# fastprogress, fastdownload, fasttransform), plum-dispatch and beartype (fasttransform's), and what fastprogress
# 1.1 imports through python-fasthtml (starlette, itsdangerous, python-multipart, httpx2, httpcore2, truststore).
# The versions are the ones this project's tests ran with. `gpu_check.sh --cpu-dry-run` installs them into an
# empty folder and fails if the check imports a package that is neither among them nor on the GPU image.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
    fastai==2.8.12 fastcore==2.2.41 fastprogress==1.1.6 fastdownload==0.0.8 fasttransform==0.0.5
    plum-dispatch==2.9.0 beartype==0.23.1
    python-fasthtml==0.14.14 starlette==1.10.0 itsdangerous==2.2.0 python-multipart==0.0.34
    httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d .whl "${WHEELS[@]}"
ls .whl
