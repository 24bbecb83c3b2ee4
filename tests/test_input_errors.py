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
