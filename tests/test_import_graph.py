"""rlkd's modules import one way, down a declared order of layers.

    base -> data -> models -> objectives -> config -> engine -> eval -> grid -> report -> cli

A module may import from its own layer and the layers below it, never from a layer above: every
import counts, lazy ones inside functions included (``ast``, not the import machinery). ``LAYERS``
places every module of rlkd; a new module must be placed (a test says so) before it is checked.

Why config sits above objectives: each layer owns the schema of its section (``LossConfig`` in
rlkd.objectives.config, ``OnPolicyConfig`` in rlkd.data.onpolicy, ``StudentLoraConfig`` in rlkd.lora)
and ``RunConfig`` (rlkd.config) composes them; nothing below the engine reads a run config.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import rlkd

PACKAGE = Path(rlkd.__file__).resolve().parent

ORDER = ("base", "data", "models", "objectives", "config", "engine", "eval", "grid", "report", "cli")

# module (or package prefix: the longest match wins) -> layer
LAYERS: dict[str, str] = {
    # base: leaf utilities every layer may use (paths, provenance and locks, devices, plug-in loading)
    "rlkd": "base",  # rlkd/__init__.py only: a new top-level module must be placed
    "rlkd.paths": "base", "rlkd.provenance": "base", "rlkd.device": "base",
    "rlkd.plugins": "base", "rlkd.report_sinks": "base",
    # data: tasks, templates, tokenization, loaders, synthetic sources, on-policy sampling's config
    "rlkd.data": "data",
    # models: loading and building models, LoRA students, the teacher-logits cache
    "rlkd.models": "models", "rlkd.factory": "models", "rlkd.lora": "models", "rlkd.teacher_cache": "models",
    "rlkd.teacher_topk_cache": "models",
    # objectives: the registry, every divergence, the ranking term, DistillLoss and its fused path,
    # the top-k agreement of two distributions (CR@k, OR@k)
    "rlkd.objectives": "objectives",
    # config: the run config composed of the layers' own sections
    "rlkd.config": "config",
    # engine: training (DeepSpeed, checkpoints, resume, reporting), its memory plan, the HF trainer
    # integration, Slurm job scripts
    "rlkd.engine": "engine", "rlkd.plan": "engine", "rlkd.integrations": "engine", "rlkd.launch": "engine",
    # eval: generation, tasks, metrics, alignment, teacher generations (SeqKD/FD training rows)
    "rlkd.eval": "eval",
    # grid: a spec -> cells -> stages -> a run -> the results store (records, the layout declaration's
    # schema that a spec validates against)
    "rlkd.bench": "grid",
    # report: the store -> effects and statistics -> tables and plots (one package: rlkd/bench/report/)
    "rlkd.bench.report": "report",
    # cli: commands, and the command bodies that compose running and reporting (run a grid, then
    # render its tables; the embedded default benchmark)
    "rlkd.cli": "cli", "rlkd.bench.cli": "cli", "rlkd.bench.table_cli": "cli", "rlkd.bench.orchestrate": "cli",
    "rlkd.bench.default": "cli", "rlkd.engine.cli": "cli", "rlkd.eval.cli": "cli", "rlkd.objectives.cli": "cli",
    "rlkd.plan.cli": "cli", "rlkd.launch.cli": "cli",
    "rlkd.config_reference": "cli",  # `rlkd config --reference`: reads the run config and the spec
}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: Path
    line: int


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_edges(root: Path = PACKAGE) -> tuple[dict[str, Path], list[Edge]]:
    """The package's modules, and every import of one of them by another (``from pkg import name``
    counts as pkg.name when that is a module), with file and line."""
    modules = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    edges: list[Edge] = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                           for alias in node.names]
            for target in targets:
                if target in modules and target != name:
                    edges.append(Edge(name, target, path, node.lineno))
    return modules, edges


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the modules of the package it imports."""
    modules, edges = import_edges(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for edge in edges:
        graph[edge.source].add(edge.target)
    return graph


def layer_of(module: str, layers: dict[str, str] = LAYERS) -> str | None:
    """The layer of the longest prefix of ``module`` (at a dot) that ``layers`` names; the root
    package's entry is its ``__init__`` alone, so a new top-level module must be placed."""
    parts = module.split(".")
    if module in layers:
        return layers[module]
    for end in range(len(parts) - 1, 1, -1):
        found = layers.get(".".join(parts[:end]))
        if found is not None:
            return found
    return None


def layer_violations(root: Path = PACKAGE, layers: dict[str, str] = LAYERS,
                     order: tuple[str, ...] = ORDER) -> list[str]:
    """Every import from a module to one in a higher layer, as 'file:line: a (layer) imports b (layer)'."""
    rank = {layer: i for i, layer in enumerate(order)}
    _, edges = import_edges(root)
    found = []
    for edge in dict.fromkeys(edges):  # `from m import a, b` is one edge per name
        low, high = layer_of(edge.source, layers), layer_of(edge.target, layers)
        if rank[low] < rank[high]:
            where = edge.path.relative_to(root.parent)
            found.append(f"{where}:{edge.line}: {edge.source} ({low}) imports {edge.target} ({high}), "
                         f"a layer above it")
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_rlkd_has_no_import_cycle():
    graph = import_graph()
    assert "rlkd.bench.spec" in graph["rlkd.bench.cli"]  # the graph sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    modules, _ = import_edges()
    unplaced = [m for m in modules if layer_of(m) is None]
    assert not unplaced, f"place these modules in LAYERS (tests/test_import_graph.py): {unplaced}"
    assert layer_of("rlkd.new_module") is None and layer_of("rlkd.data.new_module") == "data"
    assert set(LAYERS.values()) <= set(ORDER)
    stale = [prefix for prefix in LAYERS if not any(m == prefix or m.startswith(prefix + ".") for m in modules)]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_rlkd_imports_only_down_the_layers():
    violations = layer_violations()
    assert not violations, "imports against the layer order " + " -> ".join(ORDER) + ":\n" + "\n".join(violations)


# Private attributes of another object that rlkd reads, each with its reason. DeepSpeed's engine has no
# public way to gather a ZeRO-3 model's 16-bit state dict (accelerate and transformers call the same).
# os._exit is the standard library's documented exit without interpreter finalisation, which a
# multi-rank `rlkd train` needs (rlkd/engine/cli.py says why); its underscore does not mark it private.
PRIVATE_ACCESS_ALLOWED = {("rlkd/engine/train.py", "engine._zero3_consolidated_16bit_state_dict"),
                          ("rlkd/engine/cli.py", "os._exit")}


def private_access(root: Path = PACKAGE) -> list[str]:
    """``x._name`` on anything but ``self``/``cls``, and ``from other.package import _name``: a layer
    reaching into another's internals (as rlkd.objectives.fused did into DistillLoss) rather than
    through its public seam."""
    found = []
    for path in sorted(root.rglob("*.py")):
        where = str(path.relative_to(root.parent))
        package = _module_name(path, root).split(".")[:2]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id not in ("self", "cls")):
                if (where, f"{node.value.id}.{node.attr}") not in PRIVATE_ACCESS_ALLOWED:
                    found.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                if node.module.split(".")[:2] != package:
                    found += [f"{where}:{node.lineno}: from {node.module} import {alias.name}" for alias in node.names
                              if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_module_reaches_into_anothers_internals():
    found = private_access()
    assert not found, "private names used from outside their owner:\n" + "\n".join(found)


def test_the_private_access_check_reports_a_planted_call(tmp_path):
    root = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a/__init__.py": "",
        "pkg/a/loss.py": "class Loss:\n    def _chunk(self):\n        return self._x\n",
        "pkg/b/__init__.py": "",
        "pkg/b/fused.py": "from pkg.a.loss import Loss, _helper\n\n\ndef f(loss):\n    return loss._chunk()\n",
    })
    assert private_access(root) == ["pkg/b/fused.py:1: from pkg.a.loss import _helper",
                                    "pkg/b/fused.py:5: loss._chunk"]


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_checker_reports_a_planted_back_edge(tmp_path):
    """A package whose data layer imports its eval layer inside a function, and whose engine
    imports eval at module level by a relative import: both reported with file, line and layers."""
    root = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/data/__init__.py": "",
        "pkg/data/rows.py": "import json\n\n\ndef rows():\n    from pkg.eval.generate import greedy\n    return greedy()\n",
        "pkg/engine/__init__.py": "",
        "pkg/engine/train.py": "from ..eval import generate\n",
        "pkg/eval/__init__.py": "",
        "pkg/eval/generate.py": "from pkg.data.rows import rows  # downward: fine\n\n\ndef greedy():\n    return 1\n",
    })
    layers = {"pkg": "base", "pkg.data": "data", "pkg.engine": "engine", "pkg.eval": "eval"}
    found = layer_violations(root, layers)
    assert found == [
        "pkg/data/rows.py:5: pkg.data.rows (data) imports pkg.eval.generate (eval), a layer above it",
        "pkg/engine/train.py:1: pkg.engine.train (engine) imports pkg.eval.generate (eval), a layer above it",
    ]
    # the same package with the edges pointing down passes
    (root / "data/rows.py").write_text("def rows():\n    return []\n")
    (root / "engine/train.py").write_text("from ..data import rows\n")
    assert layer_violations(root, layers) == []


def test_the_checker_reports_a_planted_back_edge_in_rlkd(monkeypatch):
    """Moving one real module to a lower layer in the map makes its real imports back edges."""
    monkeypatch.setitem(LAYERS, "rlkd.engine.agreement", "data")
    found = layer_violations()
    assert any(v.startswith("rlkd/engine/agreement.py:") and "(data) imports rlkd.objectives.agreement (objectives)"
               in v for v in found), found
