"""`rlkd plan`: model sizes from configs alone, memory components against measured CPU peaks, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from rlkd.engine.distributed import child_env
from rlkd.plan.memory import (GIB, Setup, Variant, largest_micro_batch, loss_working_set, per_gpu, student_activations,
                              student_states)
from rlkd.plan.shapes import ModelShape, model_shape

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "tests" / "data" / "model_configs"
# Stated tolerance of the planner against measured peaks (RSS high-water growth on CPU, fp32):
# allocator slack and small temporaries the counts leave out.
TOLERANCE = 0.25


@pytest.mark.parametrize("name, params", [
    ("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", 1_100_048_384),  # published parameter counts
    ("meta-llama/Llama-2-7b-hf", 6_738_415_616),
    ("meta-llama/Llama-2-13b-hf", 13_015_864_320),
])
def test_paper_models_sized_on_the_meta_device(name, params):
    shape = model_shape(name, CONFIGS)
    assert shape.params == params
    assert shape.largest_layer_params == shape.vocab * shape.hidden  # the embedding / the untied head


def _smollm2_params(layers: int) -> int:
    """SmolLM2-135M's parameters by its architecture: hidden 576, 9 query heads and 3 KV heads of 64,
    MLP 1536, two norms per layer, a final norm, and a 49152-id embedding tied to the head."""
    hidden, kv, mlp, vocab = 576, 3 * 64, 1536, 49152
    layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp + 2 * hidden
    return layers * layer + hidden + vocab * hidden


@pytest.mark.parametrize("ref, layers", [
    ("@smollm2/teacher", 30),
    ("@smollm2/layers-0.1.2.8.9.10.11.20.21.22.23.24.25.27.28.29", 16),  # the mini tables' student
    ("@smollm2/pruned-15", 15),
])
def test_a_benchmark_model_reference_is_sized_from_the_config_it_stands_for(ref, layers):
    shape = model_shape(ref, CONFIGS)
    assert (shape.layers, shape.vocab, shape.tied) == (layers, 49152, True)
    assert shape.params == _smollm2_params(layers)
    assert _smollm2_params(30) == 134_515_008  # the total the prepared checkpoint loads with


def test_tied_embeddings_are_counted_once(tmp_path):
    config = json.loads((CONFIGS / "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T/config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tied = model_shape(str(tmp_path / "config.json"))
    assert tied.tied and tied.params == 1_100_048_384 - 32000 * 2048


def test_student_states_follow_deepspeeds_zero3_accounting():
    shape = model_shape("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", CONFIGS)
    setup = Setup(gpus_per_node=2, dtype_bytes=2)
    layer = 4 * shape.largest_layer_params
    assert student_states(shape, setup, offload_optimizer=False)["gpu"] == layer + 18 * shape.params // 2
    assert student_states(shape, setup, offload_optimizer=True)["gpu"] == layer + 2 * shape.params // 2
    fp32 = student_states(shape, replace(setup, dtype_bytes=4), offload_optimizer=False)["gpu"]
    assert fp32 == layer + 16 * shape.params // 2


def _probe(*args: str) -> int:
    env = child_env(rlkd_on_path=True, MALLOC_MMAP_THRESHOLD_="1048576", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "plan_probe.py"), *args], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def _tiny(hidden, vocab, intermediate=688, layers=4, heads=4) -> ModelShape:
    return ModelShape("tiny", 0, 0, hidden, intermediate, layers, heads, heads, vocab, False)


@pytest.mark.slow
@pytest.mark.parametrize("tokens, vocab", [(1024, 8000), (2048, 32000)])
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_loss_working_set_against_a_measured_peak(tokens, vocab, fused):
    """KL+R forward + backward including the head matmuls; the probe's head weights exist before
    it starts, so they are not part of what it measures."""
    student, teacher = _tiny(256, vocab), _tiny(384, vocab)
    measured = _probe("loss", "--tokens", str(tokens), "--vocab", str(vocab), "--hidden", "256",
                      "--teacher-hidden", "384", "--rank", *(["--fused"] if fused else []))
    predicted = loss_working_set(student, teacher, Setup(1, seq_len=tokens, dtype_bytes=4), fused=fused)
    assert abs(predicted - measured) <= TOLERANCE * measured, (predicted / 2**20, measured / 2**20)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_activations_against_a_measured_peak(checkpointing):
    measured = _probe("activations", "--hidden", "256", "--intermediate", "688", "--layers", "4", "--heads", "4",
                      "--batch", "4", "--seq", "256", *(["--checkpointing"] if checkpointing else []))
    predicted = student_activations(_tiny(256, 1000), Setup(1, micro_batch=4, seq_len=256, dtype_bytes=4),
                                    checkpointing=checkpointing)
    assert abs(predicted - measured) <= TOLERANCE * measured, (predicted / 2**20, measured / 2**20)


def test_only_the_logits_path_grows_with_tokens_times_vocabulary():
    """Doubling the tokens adds three tokens x V tensors to the logits path, and to the fused path
    only the hidden-state gradient (tokens x H)."""
    student = replace(model_shape("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", CONFIGS), vocab=128256)
    teacher = replace(model_shape("meta-llama/Llama-2-7b-hf", CONFIGS), vocab=128256)
    one, two = Setup(1, micro_batch=2, seq_len=2048), Setup(1, micro_batch=4, seq_len=2048)
    grow = {fused: loss_working_set(student, teacher, two, fused=fused) - loss_working_set(student, teacher, one, fused=fused)
            for fused in (False, True)}
    assert grow[False] == 3 * 4096 * 128256 * 2 + 4096 * 2048 * 2
    assert grow[True] == 4096 * 2048 * 2


def test_largest_micro_batch_is_the_boundary():
    student = model_shape("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", CONFIGS)
    teacher = model_shape("meta-llama/Llama-2-7b-hf", CONFIGS)
    setup, variant, memory = Setup(2, seq_len=2048), Variant(False, False, False), 40 * GIB
    best = largest_micro_batch(student, teacher, setup, variant, memory)
    assert best >= 1
    assert per_gpu(student, teacher, replace(setup, micro_batch=best), variant)["total"] <= memory
    assert per_gpu(student, teacher, replace(setup, micro_batch=best + 1), variant)["total"] > memory
    assert largest_micro_batch(student, teacher, setup, variant, 8 * GIB) == 0


def _plan(*args: str) -> subprocess.CompletedProcess:
    env = child_env(rlkd_on_path=True)
    return subprocess.run([sys.executable, "-m", "rlkd.cli", "plan", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)


@pytest.mark.slow
def test_cli_on_the_table2_spec_lists_each_teacher_once():
    done = _plan("benchmarks/paper/table2.yaml", "--gpus", "2", "--gpu-mem", "80", "--config-dir", str(CONFIGS))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("== ") == 2 and "== dolly, xsum:" in done.stdout
    assert "seq 2048" in done.stdout and "no offload, ckpt, fused" in done.stdout


def test_a_spec_plans_the_teacher_its_cells_train_with(capsys):
    # paper/table1 names its teacher in `defaults.models`: the cells distil from Llama-2-7B, and the
    # plan used to say "teacher none" for it (it read only each task's own teacher)
    from rlkd.plan.cli import main

    assert main([str(REPO / "benchmarks/paper/table1.yaml"), "--gpus", "8", "--gpu-mem", "80",
                 "--config-dir", str(CONFIGS)]) == 0
    out = capsys.readouterr().out
    assert out.count("== ") == 1
    assert "== pretrain: student TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T (1.10B params), " \
           "teacher meta-llama/Llama-2-7b-hf (6.74B)" in out
    assert "micro-batch 5 x seq 400" in out


def test_an_evaluation_only_spec_is_refused_by_name(capsys):
    from rlkd.plan.cli import main

    assert main([str(REPO / "benchmarks/paper/table3.yaml"), "--gpus", "1", "--gpu-mem", "80",
                 "--config-dir", str(CONFIGS)]) == 2
    assert "table3.yaml: no cell of this spec trains a model" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_on_a_run_config_marks_its_variant(tmp_path, run_config):
    run_config["loss"] = {"objective": "kl", "fused_lm_head": True}
    run_config["models"] = {"student": str(CONFIGS / "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"),
                            "teacher": str(CONFIGS / "meta-llama/Llama-2-7b-hf"), "gradient_checkpointing": True}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config))
    done = _plan(str(path), "--gpus", "1", "--gpu-mem", "24")
    assert done.returncode == 0, done.stderr[-3000:]
    marked = [line for line in done.stdout.splitlines() if "<- this config" in line]
    assert len(marked) == 1 and "no offload, ckpt, fused" in marked[0]


@pytest.mark.slow
def test_cli_names_a_model_it_cannot_find():
    done = _plan("benchmarks/paper/table2.yaml", "--gpus", "2", "--gpu-mem", "80", "--config-dir", "/nonexistent")
    assert done.returncode == 2
    assert "TinyLlama/TinyLlama-1.1B" in done.stderr and "--config-dir" in done.stderr
