"""The configuration reference (`rlkd config --reference [--spec]`): every field of every model a
run config or a benchmark spec reaches carries a description, and the printed reference lists each
field's dotted path with the default that field really has."""

from __future__ import annotations

import typing

import pytest
from pydantic import BaseModel

from rlkd.bench.spec import EvalSpec, GridSpec
from rlkd.config import RunConfig
from rlkd.config_reference import main, run_config_reference, spec_reference


def _models_reachable(root: type[BaseModel]) -> set[type[BaseModel]]:
    """Every model class reachable from ``root`` through field annotations, walked independently of
    rlkd.config_reference (so a model its walker missed still fails here)."""
    seen: set[type[BaseModel]] = set()

    def types_in(annotation) -> typing.Iterator[type]:
        yield annotation
        for arg in typing.get_args(annotation):
            yield from types_in(arg)

    def visit(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for info in model.model_fields.values():
            for t in types_in(info.annotation):
                if isinstance(t, type) and issubclass(t, BaseModel):
                    visit(t)

    visit(root)
    return seen


ROOTS = (RunConfig, GridSpec, EvalSpec)


@pytest.mark.parametrize("root", ROOTS, ids=lambda m: m.__name__)
def test_every_field_has_a_description(root):
    models = _models_reachable(root)
    assert len(models) > 1 or root is EvalSpec  # the walk did find the nested sections
    missing = sorted(f"{m.__name__}.{name}" for m in models for name, info in m.model_fields.items()
                     if not (info.description or "").strip())
    assert not missing, f"fields without a description: {missing}"


def _row(reference: str, path: str) -> list[str]:
    """The cells of the reference's row for ``path`` (field, type, default, bounds, description)."""
    rows = [line for line in reference.splitlines() if line.startswith(f"| `{path}` |")]
    assert rows, f"{path} is not in the reference"
    return [cell.strip() for cell in rows[0].strip("|").split(" | ")]


def test_run_reference_lists_every_field_with_its_default():
    ref = run_config_reference()
    # Every field of every reachable model appears under some dotted path ending in its name.
    for model in _models_reachable(RunConfig):
        for name in model.model_fields:
            assert f".{name}` |" in ref or f"| `{name}` |" in ref, f"{model.__name__}.{name} missing"
    fields = RunConfig.model_fields
    train = fields["train"].default_factory()
    loss = fields["loss"].default_factory()
    expected = {
        "seed": "72",
        "output_dir": "required",
        "train.lr": str(train.lr),
        "train.max_steps": str(train.max_steps),
        "train.schedule": f'"{train.schedule}"',
        "data.max_length": str(RunConfig.model_fields["data"].annotation.model_fields["max_length"].default),
        "loss.temperature": str(loss.temperature),
        "loss.ranking.k": str(loss.ranking.k),
        # The loss section builds RankingConfig(enabled=False): a left-out `ranking:` is off, although
        # the class's own default is True. The reference must show what the run gets.
        "loss.ranking.enabled": "false" if not loss.ranking.enabled else "true",
        "checkpoint.keep_last": str(fields["checkpoint"].default_factory().keep_last),
    }
    assert expected["loss.ranking.enabled"] == "false"
    for path, default in expected.items():
        assert _row(ref, path)[2] == f"`{default}`", path
    assert _row(ref, "train.lr")[3] == "> 0"
    assert _row(ref, "train.min_lr_ratio")[3] == "≥ 0, ≤ 1"
    assert '"cosine"' in _row(ref, "train.schedule")[1]
    assert _row(ref, "loss.ranking.k")[4]  # descriptions are printed too


def test_spec_reference_lists_nested_sections():
    ref = spec_reference()
    assert _row(ref, "seeds")[2] == "`[72]`"
    assert _row(ref, "variants")[2] == '`[{"name": "none"}, {"name": "R"}]`'  # models in a list, as YAML keys
    assert _row(ref, "variants[].name")[2] == "`required`"
    assert _row(ref, "tasks[].stages.teacher_sft")[2] == "`null`"
    assert _row(ref, "eval.extra_sets.<name>.slice_len")[2] == "`128`"
    assert _row(ref, "generation.max_new_tokens")[3] == "≥ 1"
    # a spec's own layout declaration: its columns and headlines, with their defaults
    assert _row(ref, "layout.sections[].columns[].better")[2] == "`null`"
    assert _row(ref, "layout.headlines[].keys")[3] == "length ≥ 1"
    assert _row(ref, "layout.reference_rows")[2] == '`["Teacher", "Start"]`'


def test_cli(capsys):
    assert main(["--reference"]) == 0
    assert "`loss.ranking.k`" in capsys.readouterr().out
    assert main(["--reference", "--spec"]) == 0
    assert "`variants[].sweep`" in capsys.readouterr().out
    assert main([]) == 2
