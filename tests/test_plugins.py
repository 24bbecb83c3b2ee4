"""An objective defined outside rlkd, with no edit of rlkd: found by `rlkd objectives`, trained by
`rlkd train`, benchmarked by `rlkd bench` (child processes included) with and without the ranking
loss, tabulated by `rlkd table` with its paired ±R effect; loaded by plugins:, --plugin and the
rlkd.objectives entry-point group; its source recorded, so an edited plug-in flags its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rlkd.objectives.registry import _REGISTRY

PLUGIN = textwrap.dedent('''
    """An out-of-tree objective: squared distance of the probability vectors."""
    import torch
    from rlkd.objectives import register_objective

    @register_objective("{name}", bounds={{"scale": (0.0, 10.0)}})
    def squared_probs(student_logits, teacher_logits, labels=None, *, scale=1.0):
        """scale * ||p_S - p_T||^2."""
        return scale * (torch.softmax(student_logits, -1) - torch.softmax(teacher_logits, -1)).pow(2).sum(-1)
''')


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _rlkd(*args, cwd=None, timeout=600):
    # An in-process test earlier in the session leaves its one-process group's RANK/MASTER_PORT in
    # os.environ (its store still listens there); a child must start its own group instead.
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return subprocess.run([sys.executable, "-m", "rlkd.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


@pytest.fixture
def plugin_file(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    path = folder / "my_obj.py"
    path.write_text(PLUGIN.format(name="sqprob"))
    yield path
    _REGISTRY.pop("sqprob", None)


@pytest.mark.slow
def test_objectives_lists_a_plugin_given_by_flag(plugin_file):
    out = _rlkd("objectives", "--plugin", str(plugin_file), "--json")
    assert out.returncode == 0, out.stderr
    names = {row["name"]: row for row in json.loads(out.stdout)["objectives"]}
    assert names["sqprob"]["params"]["scale"] == {"default": 1.0, "range": [0.0, 10.0]}
    missing = _rlkd("objectives", "--plugin", str(plugin_file.with_name("nope.py")))
    assert missing.returncode == 2 and "nope.py: file not found" in missing.stderr


def test_a_run_config_names_its_plugin_by_relative_path(plugin_file, tmp_path):
    from rlkd.config import ConfigError, load_config
    from rlkd.objectives import DistillLoss

    config = plugin_file.parent / "run.yaml"
    config.write_text("output_dir: o\nplugins: [my_obj.py]\nmodels: {teacher: T, student: S}\n"
                      "data: {task: gsm8k}\nloss: {objective: sqprob, params: {scale: 3}}\n")
    cfg = load_config(config)
    assert cfg.plugins == [str(plugin_file.resolve())] and cfg.loss.params == {"scale": 3.0}
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    expected = 3 * (torch.softmax(s, -1) - torch.softmax(t, -1)).pow(2).sum()
    assert DistillLoss(cfg.loss)(s, t).loss_sum.item() == pytest.approx(expected.item(), rel=1e-6)
    config.write_text(config.read_text().replace("scale: 3", "scale: 30"))
    with pytest.raises(ConfigError, match="outside"):
        load_config(config)


def test_an_installed_package_registers_through_the_entry_point_group(tmp_path, monkeypatch):
    from rlkd import plugins
    from rlkd.objectives import get_objective

    site = tmp_path / "site"
    (site / "ep_objectives_pkg").mkdir(parents=True)
    (site / "ep_objectives_pkg" / "__init__.py").write_text(PLUGIN.format(name="ep_sqprob"))
    dist = site / "ep_objectives_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-objectives-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rlkd.objectives]\nsqprob = ep_objectives_pkg\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(plugins, "_ENTRY_POINTS_LOADED", False)
    try:
        assert get_objective("ep_sqprob").fn.__module__ == "ep_objectives_pkg"
        assert plugins.loaded_plugins()["ep_objectives_pkg"]["sha256"]
    finally:
        _REGISTRY.pop("ep_sqprob", None)
        plugins._LOADED.pop("ep_objectives_pkg", None)


@pytest.mark.slow
def test_train_bench_and_table_with_an_out_of_tree_objective(plugin_file, tmp_path):
    from rlkd.factory import shared_tokenizer

    if shared_tokenizer() is None:
        pytest.skip("needs the local Llama-2 tokenizer (../shared/data/tokenizers/llama2)")
    spec = plugin_file.parent / "grid.yaml"
    spec.write_text(textwrap.dedent("""
        name: plug
        plugins: [my_obj.py]
        defaults:
          models: {teacher: "@tiny/teacher", student: "@tiny/student"}
          data: {task: gsm8k, limit: 4, max_length: 96}
          train: {max_steps: 2, micro_batch_size: 2}
        eval: {kind: task, limit: 3, max_new_tokens: 4, batch_size: 3}
        tasks: [{name: gsm8k}]
        objectives: [{name: sqprob, params: {scale: 2}}]
        variants: [none, R]
        seeds: [1]
    """))
    results = tmp_path / "results"
    run = _rlkd("bench", str(spec), "--results-dir", str(results), timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    cells = {json.loads((d / "config.json").read_text())["arm"]["method"]: d for d in results.iterdir()
             if (d / "status.json").is_file()}
    assert set(cells) == {"SQPROB(scale=2)", "SQPROB(scale=2)+R"}
    for folder in cells.values():
        provenance = json.loads((folder / "provenance.json").read_text())
        (recorded,) = provenance["plugins"].items()
        assert recorded[0] == str(plugin_file.resolve()) and len(recorded[1]) == 64  # the source's SHA-256
        manifest = json.loads((folder / "train" / "manifest.json").read_text())
        assert manifest["config"]["loss"]["objective"] == "sqprob"  # the child process trained with it
        assert str(plugin_file.resolve()) in manifest["plugins"]
    table = (results / "table.md").read_text()
    verdict = table.split("###")[1]
    assert "Effect of the ranking loss" in verdict and "SQPROB(scale=2)+R − SQPROB(scale=2)" in verdict
    assert "| SQPROB(scale=2) |" in table and "| SQPROB(scale=2)+R |" in table
    assert _rlkd("table", str(results), "--plugin", str(plugin_file)).returncode == 0

    # Editing the plug-in flags its results as stale; --rerun-stale runs them again.
    plugin_file.write_text(plugin_file.read_text() + "\n# edited\n")
    dry = _rlkd("bench", str(spec), "--results-dir", str(results), "--dry-run")
    assert dry.returncode == 0 and dry.stdout.count("(ran on other code)") == 2, dry.stdout


@pytest.mark.slow
def test_rlkd_train_takes_the_plugin_flag(plugin_file, tmp_path, tiny_models, token_data):
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nmodels: {{teacher: {tiny_models['teacher']}, "
                      f"student: {tiny_models['student']}}}\ndata: {{task: tokenized, path: {token_data}}}\n"
                      "loss: {objective: sqprob, ranking: {enabled: true, k: 3}}\n"
                      "train: {max_steps: 2, micro_batch_size: 4}\nprogress_bar: false\n")
    unknown = _rlkd("train", "--config", str(config))
    assert unknown.returncode == 2 and "unknown objective 'sqprob'" in unknown.stderr
    run = _rlkd("train", "--config", str(config), "--plugin", str(plugin_file))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["base"] > 0 and "rank" in rows[-1]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["plugins"] == [str(plugin_file.resolve())]
