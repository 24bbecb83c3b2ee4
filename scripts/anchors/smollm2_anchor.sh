#!/usr/bin/env bash
# Real-model anchor: SmolLM2-135M-Instruct (offline copy) on the first 200 GSM8K test questions
# (greedy, up to 256 new tokens) and the first 200 rows of the paper's Dolly split (greedy, up to
# 128 new tokens), both with the model's own chat template.
# Writes results/anchors/smollm2-135m-instruct/{gsm8k,dolly}/{metrics.json,predictions.jsonl}.
# About 20 CPU-minutes for GSM8K and 10 for Dolly with one thread. Rerunning skips finished work
# and resumes an interrupted run.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
ckpt=${CKPT:-$repo/.cache/smollm2}
bash "${PREPARE:-$repo/../shared/tools/prepare_smollm2.sh}" "$ckpt"
# One thread: on a busy shared CPU, two threads per process ran several times slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
common=(--checkpoint "$ckpt" --limit "${LIMIT:-200}" --prompt-style chat --batch-size 16
        --data-dir "${RLKD_DATA_DIR:-$repo/../shared/data}"
        --out "${OUT:-results/anchors/smollm2-135m-instruct}" --quiet)
rlkd eval --task gsm8k --max-new-tokens 256 "${common[@]}"
rlkd eval --task dolly --max-new-tokens 128 "${common[@]}"
