#!/usr/bin/env bash
# The GPU check (issue 13): <= 8 minutes on one modern GPU (timeouts 150 s + 300 s + 120 s, expected well under); writes under results/gpu/.
#   1. the GPU-marked tests (tests/test_gpu.py): fused vs logits path on CUDA (fp32 to 1e-5, bf16),
#      and a ZeRO-3 bf16 training run over NCCL, fused vs logits path;
#   2. benchmarks/step_perf.py --gpu: TinyLlama-1.1B-shaped student, Llama-2-7B-shaped teacher, random
#      init, bf16, seq 2048, KL vs KL+R (the paper's Table 4: +1.19% wall time for KL+R);
#   3. benchmarks/fused_perf.py on CUDA: peak memory and time of the fused vs the logits path (bf16
#      inputs, H 2048, N x V = 4096 x 128256 and 8192 x 151936).
# Usage: bash scripts/gpu_check.sh            (RLKD_GPU_OUT=dir to write elsewhere)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${RLKD_GPU_OUT:-results/gpu}
mkdir -p "$OUT"
export DS_ACCELERATOR=cuda PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
start=$(date +%s)
status=0

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1;
  python3 -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"; } > "$OUT/environment.txt" 2>&1
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible" | tee "$OUT/summary.txt"
  exit 2
fi

echo "== 1/3 GPU-marked tests" | tee "$OUT/summary.txt"
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml="$OUT/pytest.xml" \
  > "$OUT/pytest.txt" 2>&1
rc=$?; tail -n 3 "$OUT/pytest.txt" | tee -a "$OUT/summary.txt"
[ $rc -eq 0 ] || status=1

echo "== 2/3 step_perf on GPU (7B-shaped teacher, 1.1B-shaped student, bf16, seq 2048)" | tee -a "$OUT/summary.txt"
MODELS=${RLKD_GPU_MODELS:-/tmp/rlkd_gpu_models}   # random models are kept here for a rerun (~16 GB)
timeout 300 python3 benchmarks/step_perf.py --gpu --steps 6 --warmup 2 --model-dir "$MODELS" --out "$OUT" \
  > "$OUT/step_perf.txt" 2>&1
rc=$?; grep -E "^\| KL" "$OUT/step_perf.txt" | tee -a "$OUT/summary.txt"
[ $rc -eq 0 ] || { status=1; tail -n 20 "$OUT/step_perf.txt" | tee -a "$OUT/summary.txt"; }

echo "== 3/3 fused vs logits path on GPU (bf16 inputs, H 2048, V 128256 and 151936)" | tee -a "$OUT/summary.txt"
timeout 120 python3 benchmarks/fused_perf.py --device cuda --dtype bfloat16 --repeats 3 \
  --configs 4096x128256 8192x151936 --name fused --out "$OUT" > "$OUT/fused_perf.txt" 2>&1
rc=$?; grep -E "^\| [0-9]" "$OUT/fused.md" 2>/dev/null | tee -a "$OUT/summary.txt"
[ $rc -eq 0 ] || { status=1; tail -n 20 "$OUT/fused_perf.txt" | tee -a "$OUT/summary.txt"; }

echo "gpu_check: status $status after $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
exit $status
