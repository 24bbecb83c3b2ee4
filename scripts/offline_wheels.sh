#!/usr/bin/env bash
# Build, on a machine with package access, the wheels that an offline CUDA node (one that has torch,
# transformers, accelerate, numpy, scipy, pyyaml, tqdm, safetensors, psutil, packaging; Python 3.12,
# x86_64) lacks to run rlkd's training, a bench cell and scripts/gpu_check.sh.
#
#   bash scripts/offline_wheels.sh DIR              # then copy DIR to the node and run
#   bash scripts/gpu_check.sh --wheels DIR          # installs them into a private folder first
#
# deepspeed is published as a source archive only: it is built here as a pure-Python wheel
# (DS_BUILD_OPS=0: no CUDA op is compiled; DeepSpeed JIT-builds an op only if one is asked for,
# and rlkd's defaults ask for none), at the version installed here so that the node runs what
# this machine tested. Everything else is a binary wheel for CPython 3.12 on x86_64 glibc >= 2.28
# (manylinux_2_28, and the older manylinux_2_17/2014 tags most projects still publish, which such a
# node runs too; older pips do not expand one tag to the older ones). RLKD_WHEEL_PYTHON and
# RLKD_WHEEL_PLATFORMS (space-separated) target another node. The total must stay <= 64 MiB.
set -euo pipefail
DIR=${1:?usage: bash scripts/offline_wheels.sh DIR}
PYTHON_VERSION=${RLKD_WHEEL_PYTHON:-3.12}
PLATFORMS=${RLKD_WHEEL_PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64}
LIMIT_MIB=64
# What the node lacks: DeepSpeed's own requirements that such images miss (pydantic and its
# dependencies, hjson), and small ones that they usually have but that cost nothing to bring along.
WHEELS=(pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson msgpack einops py-cpuinfo)

mkdir -p "$DIR"
DS_VERSION=$(python3 -c "import importlib.metadata as m; print(m.version('deepspeed'))")
echo "offline_wheels: deepspeed $DS_VERSION as a pure-Python wheel"
DS_BUILD_OPS=0 python3 -m pip wheel --no-deps --no-build-isolation --quiet "deepspeed==$DS_VERSION" -w "$DIR"

# The versions installed here (the tested ones) where they exist for the target; pydantic-core
# must be the one this pydantic pins, so both come from this machine's pair.
pins=()
for name in "${WHEELS[@]}"; do
  version=$(python3 -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: print('')" "$name")
  pins+=("$name${version:+==$version}")
done
platform_flags=()
for platform in $PLATFORMS; do platform_flags+=(--platform "$platform"); done
echo "offline_wheels: ${pins[*]} for CPython $PYTHON_VERSION ($PLATFORMS)"
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  "${platform_flags[@]}" --quiet -d "$DIR" "${pins[@]}"

total=$(du -cb "$DIR"/*.whl | tail -n 1 | cut -f1)
ls -1 "$DIR"/*.whl | sed 's|.*/|  |'
echo "offline_wheels: $(ls "$DIR"/*.whl | wc -l) wheels, $((total / 1024)) KiB in $DIR"
if [ "$total" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "offline_wheels: more than $LIMIT_MIB MiB" >&2
  exit 1
fi
