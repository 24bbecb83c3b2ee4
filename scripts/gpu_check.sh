#!/usr/bin/env bash
# The GPU check (issue 26): one call, at most 6 minutes on one H100 (the timeouts below sum to 475 s
# with --wheels, 445 s without; each step normally ends well before its own). Writes results/gpu/:
# summary.txt, environment.json, one JSON per step (steps/<name>.json: status, exit code, seconds,
# timeout, the log's last lines) and each step's full log; exits non-zero if any step failed.
#
#   1. wheels       --wheels DIR: pip install --no-index --no-deps --target <private dir> DIR/*.whl
#                   (built by scripts/offline_wheels.sh), put first on PYTHONPATH
#   2. environment  versions, the device, rlkd's device decision and DeepSpeed's accelerator
#   3. gpu_tests    the gpu-marked tests (tests/test_gpu.py): fused vs logits path on CUDA, ZeRO-3 bf16
#                   training over NCCL on both paths, alignment under a live NCCL group, the bf16
#                   tensor-core weight gradient
#   4. cell_prepare a tokenizer, tiny random teacher/student and GSM8K-format rows, made here (nothing
#                   downloaded; scripts/gpu_check_cell.py)
#   5. bench_cell   `rlkd bench` of one training setting (KL+R, ZeRO-3 bf16) scored twice: GSM8K task
#                   evaluation and alignment against the teacher; training, export and both
#                   evaluations on the GPU
#   6. offload      `rlkd train` with deepspeed.student_offload_optimizer=true (the default optimizer)
#   7. step_perf    Table 4: KL vs KL+R step time, Llama-2-7B-shaped teacher, TinyLlama-1.1B-shaped
#                   student, bf16, seq 2048; random models built on the GPU (nothing saved)
#   8. fused_perf   fused vs logits path, bf16, H 2048, N x V = 4096 x 128256 and 8192 x 151936
#
# Usage: bash scripts/gpu_check.sh [--wheels DIR] [--out DIR] [--cpu-smoke] [--dry-run]
#   --cpu-smoke  every step at a tiny size on the CPU (checks the script itself; out: /tmp/rlkd_gpu_smoke)
#   --dry-run    print the steps and their timeouts, run nothing
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WHEELS="" OUT="" SMOKE=0 DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=${2:?--wheels DIR}; shift 2 ;;
    --out) OUT=${2:?--out DIR}; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    --dry-run) DRY=1; shift ;;
    *) echo "gpu_check: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
if [ $SMOKE = 1 ]; then OUT=${OUT:-/tmp/rlkd_gpu_smoke}; else OUT=${OUT:-${RLKD_GPU_OUT:-results/gpu}}; fi
DEPS=${RLKD_GPU_DEPS:-/tmp/rlkd_gpu_deps}

if [ $SMOKE = 1 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  DTYPE=float32
  STEP_PERF=(python3 benchmarks/step_perf.py --steps 1 --warmup 0 --seq-len 64 --out "$OUT/perf")
  FUSED_PERF=(python3 benchmarks/fused_perf.py --device cpu --configs 256x2048 512x4096 --hidden 64 --repeats 1
              --name fused_gpu --out "$OUT/perf")
else
  export DS_ACCELERATOR=cuda
  DTYPE=bfloat16
  STEP_PERF=(python3 benchmarks/step_perf.py --gpu --steps 4 --warmup 2 --out "$OUT/perf")
  FUSED_PERF=(python3 benchmarks/fused_perf.py --device cuda --dtype bfloat16 --repeats 1
              --configs 4096x128256 8192x151936 --name fused_gpu --out "$OUT/perf")
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$WHEELS" ]; then export PYTHONPATH="$DEPS:$PYTHONPATH"; fi

# name, timeout (s), command; the timeouts sum to at most 480 s.
STEPS=(wheels environment gpu_tests cell_prepare bench_cell offload step_perf fused_perf)
declare -A LIMIT=([wheels]=30 [environment]=20 [gpu_tests]=100 [cell_prepare]=20 [bench_cell]=100 [offload]=45
                  [step_perf]=100 [fused_perf]=60)
total=0
for name in "${STEPS[@]}"; do
  if [ "$name" = wheels ] && [ -z "$WHEELS" ]; then continue; fi
  total=$((total + LIMIT[$name]))
done
if [ $DRY = 1 ]; then
  for name in "${STEPS[@]}"; do
    if [ "$name" = wheels ] && [ -z "$WHEELS" ]; then continue; fi
    printf '%-13s %4d s\n' "$name" "${LIMIT[$name]}"
  done
  echo "gpu_check: $total s of timeouts in all; out: $OUT"
  exit 0
fi
WORK=${RLKD_GPU_WORK:-$(mktemp -d /tmp/rlkd_gpu_check.XXXXXX)}   # models and data of this run only

mkdir -p "$OUT/steps" "$OUT/logs"
: > "$OUT/summary.txt"
start=$(date +%s)
failed=0

# run_step NAME COMMAND...: runs under the step's timeout, logs to logs/NAME.log, writes steps/NAME.json.
run_step() {
  local name=$1; shift
  local limit=${LIMIT[$name]} began rc seconds status
  began=$(date +%s)
  timeout "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  seconds=$(( $(date +%s) - began ))
  if [ $rc -eq 0 ]; then status=passed; elif [ $rc -eq 124 ]; then status=timeout; else status=failed; fi
  [ $rc -eq 0 ] || failed=$((failed + 1))
  python3 - "$OUT/steps/$name.json" "$name" "$status" "$rc" "$seconds" "$limit" "$OUT/logs/$name.log" <<'PY'
import json, sys
path, name, status, rc, seconds, limit, log = sys.argv[1:]
lines = open(log, errors="replace").read().splitlines()
json.dump({"step": name, "status": status, "exit_code": int(rc), "seconds": int(seconds), "timeout_s": int(limit),
           "log": log, "log_tail": lines[-25:]}, open(path, "w"), indent=2)
PY
  printf '%-13s %-8s %4d s (limit %d s)\n' "$name" "$status" "$seconds" "$limit" | tee -a "$OUT/summary.txt"
}

if [ -n "$WHEELS" ]; then
  run_step wheels python3 -m pip install --no-index --no-deps --upgrade --target "$DEPS" "$WHEELS"/*.whl
fi

run_step environment python3 - "$OUT/environment.json" "$DEPS" <<'PY'
import json, os, platform, subprocess, sys
import torch
info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR"), "PYTHONPATH": os.environ.get("PYTHONPATH")}
from rlkd.device import agree_with_deepspeed
info["rlkd_device"] = agree_with_deepspeed()          # refuses if DeepSpeed disagrees
import deepspeed, pydantic, transformers
info.update(deepspeed=deepspeed.__version__, deepspeed_from=os.path.dirname(deepspeed.__file__),
            transformers=transformers.__version__, pydantic=pydantic.__version__)
try:
    info["git"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    pass
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
PY

# -o addopts=-ra: the project's -n 2 needs pytest-xdist, which the device machine does not have
run_step gpu_tests python3 -m pytest -q -o addopts=-ra -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml="$OUT/pytest.xml"

run_step cell_prepare python3 scripts/gpu_check_cell.py prepare "$WORK/cell" --dtype "$DTYPE"

run_step bench_cell bash -c 'RLKD_DATA_DIR="$1/cell/data" python3 -m rlkd.cli bench "$1/cell/spec.yaml" \
  --results-dir "$1/cell/results" --jobs 1 && python3 scripts/gpu_check_cell.py verify "$1/cell" "$2/bench_cell.json"' \
  _ "$WORK" "$OUT"

run_step offload bash -c 'RLKD_DATA_DIR="$1/cell/data" python3 -m rlkd.cli train --config examples/tiny_run.yaml \
  models.teacher="$1/cell/models/teacher" models.student="$1/cell/models/student" models.dtype="$2" \
  output_dir="$1/offload" deepspeed.student_offload_optimizer=true train.max_steps=4 checkpoint.every_steps=0 \
  progress_bar=false && python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(m[\"status\"]); \
sys.exit(m[\"status\"] != \"finished\")" "$1/offload/manifest.json"' _ "$WORK" "$DTYPE"

run_step step_perf "${STEP_PERF[@]}"

run_step fused_perf "${FUSED_PERF[@]}"

elapsed=$(( $(date +%s) - start ))
{ echo; grep -hE '^\| KL' "$OUT"/perf/step*.md 2>/dev/null; grep -hE '^\| [0-9]' "$OUT"/perf/fused_gpu.md 2>/dev/null
  echo "gpu_check: $failed step(s) failed; $elapsed s (timeouts sum to $total s); out: $OUT"; } | tee -a "$OUT/summary.txt"
[ -z "${RLKD_GPU_WORK:-}" ] && rm -rf "$WORK"
[ $failed -eq 0 ]
