"""`rlkd plan` reports the teacher cache's size, exact and top-K, per position and for a preset's data."""

from __future__ import annotations

from pathlib import Path

import yaml

from rlkd.plan.cli import main

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "tests" / "data" / "model_configs"


def _table(text: str) -> dict[str, list[str]]:
    start = text.index("teacher cache (vocab")
    rows = text[start:].split("\n\n")[0].splitlines()[1:]
    return {row.strip().split("  ")[0]: row.split() for row in rows}


def test_the_table2_preset_reports_exact_and_top_k_sizes(capsys):
    assert main([str(REPO / "benchmarks/paper/table2.yaml"), "--gpus", "2", "--gpu-mem", "80",
                 "--config-dir", str(CONFIGS)]) == 0
    out = capsys.readouterr().out
    gsm8k = out[out.index("== gsm8k"):out.index("== dolly")]
    assert "teacher cache (vocab 32000)" in gsm8k and "<= 7473 x 2048 positions" in gsm8k
    rows = _table(gsm8k)
    # Llama's 32000 ids fit uint16: K x (2-byte id + 2-byte bf16) + a 4-byte fp32 tail
    assert rows["exact, float32 logits"][3] == f"{4 * 32000:,}"
    assert rows["top-8, bfloat16 log-probs + tail"][-4] == str(8 * 4 + 4)
    assert rows["top-128, bfloat16 log-probs + tail"][-4] == str(128 * 4 + 4)
    assert rows["exact, float32 logits"][-2] == f"{4 * 32000 * 7473 * 2048 / 2**30:.1f}"
    # Dolly has no sample cap in the preset: no upper bound is claimed for it
    dolly = out[out.index("== dolly"):]
    assert "teacher cache (vocab 32000)" in dolly and "<=" not in dolly


def test_a_run_config_reports_its_own_top_k_and_dtype(tmp_path, run_config, capsys):
    run_config.update(teacher_cache=str(tmp_path / "tc"), teacher_cache_top_k=16, teacher_cache_dtype="float16")
    run_config["models"] = {"student": str(CONFIGS / "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"),
                            "teacher": str(CONFIGS / "meta-llama/Llama-2-7b-hf")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config))
    assert main([str(path), "--gpus", "1", "--gpu-mem", "80"]) == 0
    rows = _table(capsys.readouterr().out)
    assert list(rows) == ["exact, float32 logits", "top-16, float16 log-probs + tail"]
    assert rows["top-16, float16 log-probs + tail"][-1] == f"{(16 * 4 + 4) * 1e6 / 2**30:.2f}"


def test_the_sparse_teacher_preset_reports_its_own_top_k_caches(capsys):
    # mini/sparse_teacher sweeps teacher_cache_top_k over [null, 32, 128] in float32 on SmolLM2's
    # 49152-id vocabulary (uint16 ids), 80 sequences of 256 tokens
    assert main([str(REPO / "benchmarks/mini/sparse_teacher.yaml"), "--gpus", "1", "--gpu-mem", "80",
                 "--config-dir", str(CONFIGS)]) == 0
    out = capsys.readouterr().out
    assert "teacher @smollm2/teacher" in out and "<= 80 x 256 positions" in out
    rows = _table(out)
    assert list(rows) == ["exact, float32 logits", "top-32, float32 log-probs + tail",
                          "top-128, float32 log-probs + tail"]
    assert rows["exact, float32 logits"][3] == f"{4 * 49152:,}"
    assert rows["top-32, float32 log-probs + tail"][-4] == str(32 * (2 + 4) + 4)
    assert rows["top-128, float32 log-probs + tail"][-4] == str(128 * (2 + 4) + 4)
    assert rows["exact, float32 logits"][-2:] == [f"{4 * 49152 * 80 * 256 / 2**30:.1f}", "GiB"]
    assert rows["top-32, float32 log-probs + tail"][-2:] == [f"{196 * 80 * 256 / 2**20:.1f}", "MiB"]
