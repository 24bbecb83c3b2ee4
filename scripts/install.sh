#!/usr/bin/env bash
# One-command install of rlkd and everything its tests and benchmarks need.
#   bash scripts/install.sh            # CPU machine: pins the CPU build of torch 2.13.0
#   RLKD_TORCH=cuda bash scripts/install.sh   # force the default (CUDA) torch wheel
# torchsort is optional (a pure-PyTorch soft rank is built in); it is installed when it builds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mode=${RLKD_TORCH:-auto}
if [[ $mode == auto ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then mode=cuda; else mode=cpu; fi
fi
# A second install is a no-op: same install script, same dependencies, and this checkout importable.
stamp=.cache/install.stamp
want=$( { cat pyproject.toml scripts/install.sh; echo "$mode"; "$PY" -V; } | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]] && "$PY" - <<'EOF'
import importlib.util, pathlib, sys
import rlkd
here = pathlib.Path(rlkd.__file__).resolve().parents[1] == pathlib.Path.cwd().resolve()
sys.exit(0 if here and all(importlib.util.find_spec(m) for m in ("torch", "deepspeed", "transformers")) else 1)
EOF
then
  echo "rlkd is already installed from this checkout (scripts/install.sh and pyproject.toml unchanged); nothing to do"
  exit 0
fi
if [[ $mode == cpu ]]; then
  # An unpinned torch resolves to a multi-GB CUDA build; 2.13.0 CPU is the wheel this project is tested on.
  "$PY" -m pip install -q "torch==2.13.0"
else
  "$PY" -m pip install -q "torch>=2.4"
fi
"$PY" -m pip install -q -e ".[dev]"
# torchsort compiles against the installed torch: it needs no build isolation, and on a machine
# without a GPU, nvcc must be hidden or it tries (and fails) to build CUDA kernels.
if ! "$PY" -c "import torchsort" 2>/dev/null; then
  path=$PATH
  if [[ $mode == cpu ]]; then
    path=$(tr ':' '\n' <<<"$PATH" | while read -r dir; do [[ -x $dir/nvcc ]] || echo "$dir"; done | paste -sd: -)
  fi
  if ! env -u CUDA_HOME -u CUDA_PATH PATH="$path" "$PY" -m pip install -q --no-build-isolation "torchsort==0.1.10"; then
    echo "warning: torchsort did not build; rlkd uses its pure-PyTorch soft rank" >&2
  fi
fi
"$PY" -c "import rlkd, torch; print('rlkd', rlkd.__version__, '| torch', torch.__version__)"
mkdir -p "$(dirname "$stamp")" && echo "$want" > "$stamp"
