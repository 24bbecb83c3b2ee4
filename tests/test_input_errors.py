"""Issue 27, bad input: one clear error of a few lines naming the file, line, field, objective or
plug-in, before any model loads (plug-in objectives, loss weights, loss terms, LoRA targets, data
files, spec YAML)."""

from __future__ import annotations

import textwrap

import pytest

from rlkd.config import ConfigError, load_config
from rlkd.objectives.registry import _REGISTRY

PLUGIN = textwrap.dedent('''
    import torch
    from rlkd.objectives import register_objective

    @register_objective("{name}", bounds={{"scale": (0.0, 10.0)}})
    def broken(student_logits, teacher_logits, labels=None, *, scale=1.0):
        """A plug-in objective with a mistake."""
        per_token = scale * (torch.softmax(student_logits, -1) - torch.softmax(teacher_logits, -1)).pow(2)
        return {body}
''')


def _plugin(tmp_path, name: str, body: str):
    path = tmp_path / f"{name}.py"
    path.write_text(PLUGIN.format(name=name, body=body))
    return path


def _refused(run_config, **changes) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(base=dict(run_config, **changes))
    text = str(info.value)
    assert "function-after" not in text and "Traceback" not in text and "Value error" not in text
    assert len(text.splitlines()) <= 3, text
    return text


@pytest.fixture
def forget_plugins():
    names = set(_REGISTRY)
    yield
    for name in set(_REGISTRY) - names:
        _REGISTRY.pop(name)


@pytest.mark.parametrize("name, body, said", [
    ("scalar_obj", "per_token.sum(-1).mean()", "returns shape [] for logits of shape [4, 7]"),      # F5
    ("matrix_obj", "per_token", "returns shape [4, 7] for logits of shape [4, 7]"),                 # W1
    ("nan_obj", "per_token.sum(-1) * float('nan')", "(not finite) on finite logits"),               # W2
    ("nograd_obj", "per_token.sum(-1).detach()", "carries no gradient to the student logits"),
])
def test_a_plugin_objective_that_does_not_return_one_finite_loss_per_position_is_refused(
        run_config, tmp_path, forget_plugins, name, body, said):
    path = _plugin(tmp_path, name, body)
    text = _refused(run_config, plugins=[str(path)], loss={"objective": name})
    assert f"objective '{name}' ({path}:" in text and said in text  # objective, plug-in file and line named
    assert name not in _REGISTRY


def test_an_objective_parameter_that_makes_it_nan_is_refused_at_config_time(run_config, tmp_path, forget_plugins):
    path = _plugin(tmp_path, "log_scale", "per_token.sum(-1) * torch.log(torch.tensor(scale))")
    load_config(base=dict(run_config, plugins=[str(path)], loss={"objective": "log_scale"}))  # scale=1: fine
    text = _refused(run_config, plugins=[str(path)], loss={"objective": "log_scale", "params": {"scale": 0.0}})
    assert "objective 'log_scale'" in text and "{'scale': 0.0}" in text and "not finite" in text


def test_an_objective_nan_only_on_real_logits_is_named_when_training_meets_it(tmp_path, forget_plugins):
    """W2 at run time: a plug-in finite on the probe's random input but NaN where a logit is large.
    The step's error names the objective and its plug-in file, not only "the loss is not finite"."""
    import torch

    from rlkd.objectives import DistillLoss
    from rlkd.plugins import load_plugins

    path = _plugin(tmp_path, "large_nan", "torch.where(student_logits.amax(-1) > 50, float('nan'), 1.0) "
                                          "* per_token.sum(-1)")
    load_plugins([str(path)])
    student, teacher = torch.randn(6, 11), torch.randn(6, 11)
    student[4, 3] = 80.0  # finite, but the plug-in's NaN branch
    loss = DistillLoss({"terms": [{"objective": "kl", "weight": 1.0}, {"objective": "large_nan", "weight": 1.0}]})
    with pytest.raises(FloatingPointError) as info:
        loss(student.requires_grad_(), teacher)
    text = str(info.value)
    assert "position 4" in text and f"objective 'large_nan' ({path}:" in text and "'kl'" not in text


@pytest.mark.parametrize("loss", [
    {"terms": [{"objective": "kl", "weight": 0}]},                                          # F6
    {"terms": [{"objective": "kl", "weight": 0}, {"ranking": {"k": 5}, "weight": 0}]},
    {"objective": "kl", "ranking": {"enabled": True, "rank_weight": 0, "base_weight": 0}},
])
def test_all_zero_loss_weights_are_refused(run_config, loss):
    text = _refused(run_config, loss=loss)
    assert "loss: every weight of the loss is 0" in text and "the student would not train" in text


def test_zero_weight_on_one_term_is_still_allowed(run_config):
    cfg = load_config(base=dict(run_config, loss={"terms": [{"objective": "kl", "weight": 0}, {"ranking": {"k": 5}}]}))
    assert cfg.loss.ranking.enabled and cfg.loss.ranking.rank_weight == 2.0


def test_loss_term_errors_name_the_term_without_pydantic_internals(run_config):
    unknown = _refused(run_config, loss={"terms": [{"objective": "kl"}, {"objective": "nope"}]})       # W5
    assert "loss.terms[1]: unknown objective 'nope'; registered objectives: " in unknown
    assert "RankingTerm" not in unknown and "unknown key" not in unknown
    negative = _refused(run_config, loss={"terms": [{"objective": "kl", "weight": -1}]})              # W6
    assert negative.splitlines()[1:] == ["  loss.terms[0].weight: Input should be greater than or equal to 0"]
    both = _refused(run_config, loss={"terms": [{"objective": "kl", "ranking": {"k": 5}}]})           # W7
    assert "item 0 has both 'objective' and 'ranking'" in both and "choose one" in both


def test_lora_target_modules_are_checked_against_the_student_before_any_model_loads(run_config, monkeypatch):
    from rlkd.engine.train import run_training

    def refuse(cfg):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr("rlkd.engine.train.build_session", refuse)
    lora = {"r": 4, "alpha": 8}
    with pytest.raises(ConfigError) as info:                                                          # W3
        run_training(dict(run_config, models=dict(run_config["models"],
                                                  student_lora=dict(lora, target_modules=["q_proj", "nonexistent_proj"]))))
    text = str(info.value)
    assert text.startswith("models.student_lora.target_modules ['nonexistent_proj'] match no module of the student")
    assert "its linear layers: " in text and "q_proj" in text.split("its linear layers: ")[1]
    empty = _refused(run_config, models=dict(run_config["models"], student_lora=dict(lora, target_modules=[])))  # W4
    assert "models.student_lora.target_modules: an empty list adapts nothing" in empty


def test_a_non_utf8_line_names_the_file_and_line(tmp_path):                                            # F4
    from rlkd.data import DataError, iter_jsonl

    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"input_ids": [1, 2], "loss_mask": [0, 1]}\n{"input_ids": [1, 2], "note": "caf\xe9"}\n')
    with pytest.raises(DataError) as info:
        list(iter_jsonl(path))
    assert str(info.value) == f"{path}:2: not UTF-8 text (byte 0xe9 at column 35)"


def test_a_non_utf8_training_file_stops_training_with_its_file_and_line(run_config, tmp_path):
    from rlkd.data import DataError
    from rlkd.engine.train import run_training

    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"input_ids": [1, 5, 6, 2], "loss_mask": [0, 1, 1, 1]}\n\xff\xfe\n')
    with pytest.raises(DataError) as info:
        run_training(dict(run_config, data=dict(run_config["data"], path=str(path))))
    assert str(info.value) == f"{path}:2: not UTF-8 text (byte 0xff at column 1)"


def test_a_spec_yaml_error_names_the_line_where_the_broken_construct_starts(tmp_path):               # W8
    from rlkd.bench.spec import SpecError, load_spec

    lines = ["name: broken", "tasks:", "  - {name: gsm8k,", "     run: {data: {task: gsm8k}}", "objectives: [kl]",
             "seeds: [1]"]
    spec = tmp_path / "spec.yaml"
    spec.write_text("\n".join(lines) + "\n")
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    text = str(info.value)
    assert text.startswith(f"{spec}:3: not valid YAML: ") and "starts at line 3, column 5" in text
    assert len(text.splitlines()) == 1


def test_a_run_that_fails_after_the_models_loaded_leaves_no_empty_checkpoint_folder(run_config, tmp_path,
                                                                                   monkeypatch):
    """Issue 27, requirement 5: it left an empty checkpoints/ behind."""
    from rlkd.engine.train import run_training

    steps = []

    def fail_at_the_first_step(session, step):
        steps.append(step)
        raise RuntimeError("stopped at the first step")

    monkeypatch.setattr("rlkd.engine.train.train_step", fail_at_the_first_step)
    out = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="stopped at the first step"):
        run_training(dict(run_config, output_dir=str(out)))
    assert steps == [0] and (out / "manifest.json").is_file()  # it failed after the models loaded
    assert not (out / "checkpoints").exists()
