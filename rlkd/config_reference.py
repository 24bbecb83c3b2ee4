"""`rlkd config --reference`: every field of the run config (or, with ``--spec``, of a benchmark
spec) as Markdown, generated from the pydantic models themselves so that it cannot drift from them.

Each nested model is a section; each field a row with its dotted path, type, default, bounds and the
``description`` given in its model. A default is the value the field takes when its key is left out
of the YAML: inside a section whose parent builds a non-default instance (``loss.ranking`` is
``RankingConfig(enabled=False)``), the row shows that instance's value, not the class's.
"""

from __future__ import annotations

import argparse
import enum
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

_BOUNDS = ((annotated_types.Ge, "ge", "≥"), (annotated_types.Gt, "gt", ">"), (annotated_types.Le, "le", "≤"),
           (annotated_types.Lt, "lt", "<"), (annotated_types.MinLen, "min_length", "length ≥"),
           (annotated_types.MaxLen, "max_length", "length ≤"))


@dataclass(frozen=True)
class FieldDoc:
    path: str            # dotted path as written in YAML; `[]` marks a list item, `<name>` a dict key
    type: str
    default: str         # "required" when the key must be given
    bounds: str
    description: str


@dataclass(frozen=True)
class Section:
    path: str
    model: type[BaseModel]
    summary: str
    fields: tuple[FieldDoc, ...]


def _strip_annotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def type_name(annotation: Any) -> str:
    """A short, YAML-minded spelling of a field's type (``Literal`` as its choices)."""
    annotation = _strip_annotated(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "None"
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def nested_models(annotation: Any, suffix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """The models a field's type holds, each with the path suffix that reaches it (``[]`` for a list
    item, ``.<name>`` for a dict value)."""
    annotation = _strip_annotated(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(suffix, annotation)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple, set, frozenset):
        return [m for a in args if a is not Ellipsis for m in nested_models(a, suffix + "[]")]
    if origin is dict:
        return nested_models(args[1], suffix + ".<name>") if len(args) == 2 else []
    return [m for a in args for m in nested_models(a, suffix)]


def bounds(info: FieldInfo) -> str:
    found = []
    for meta in info.metadata:
        for kind, attr, symbol in _BOUNDS:
            if isinstance(meta, kind):
                found.append(f"{symbol} {getattr(meta, attr)}")
    return ", ".join(found)


def _plain(value: Any) -> Any:
    """``value`` as it would be written in YAML: a model inside a list as its non-default keys."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_defaults=True)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _show(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "(section below)"
    return json.dumps(_plain(value), default=str)


def field_default(info: FieldInfo) -> Any:
    """What a left-out key becomes, or PydanticUndefined when the key is required."""
    if info.default is not PydanticUndefined:
        return info.default
    if info.default_factory is not None:
        return info.default_factory()
    return PydanticUndefined


def sections(model: type[BaseModel], path: str = "", instance: BaseModel | None = None) -> list[Section]:
    """``model``'s section and those of every model reachable from it, depth first."""
    rows, below = [], []
    for name, info in model.model_fields.items():
        full = f"{path}.{name}" if path else name
        default = getattr(instance, name) if instance is not None else field_default(info)
        rows.append(FieldDoc(full, type_name(info.annotation),
                             "required" if default is PydanticUndefined else _show(default),
                             bounds(info), (info.description or "").strip()))
        for suffix, sub in nested_models(info.annotation):
            # A default instance of exactly this model (not a list of them) gives the section's defaults.
            sub_instance = default if (not suffix and isinstance(default, sub)) else None
            below += sections(sub, full + suffix, sub_instance)
    summary = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    if summary.startswith("Usage docs:") or model.__doc__ == BaseModel.__doc__:
        summary = ""
    return [Section(path, model, " ".join(summary.split()), tuple(rows)), *below]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") if text else ""


def render(title: str, intro: str, secs: list[Section]) -> str:
    out = [f"# {title}", "", intro, ""]
    for sec in secs:
        heading = f"`{sec.path}`" if sec.path else "top level"
        out += [f"## {heading} ({sec.model.__name__})", ""]
        if sec.summary:
            out += [sec.summary, ""]
        out += ["| field | type | default | bounds | description |", "|---|---|---|---|---|"]
        for f in sec.fields:
            out.append(f"| `{f.path}` | `{_cell(f.type)}` | `{_cell(f.default)}` | {_cell(f.bounds)} | "
                       f"{_cell(f.description)} |")
        out.append("")
    return "\n".join(out)


def run_config_reference() -> str:
    from rlkd.config import RunConfig

    return render("Run configuration reference (`rlkd train --config`)",
                  "Every key of a run config, as `rlkd train` validates it; any of them can be overridden on "
                  "the command line as `dotted.path=value`. `[]` marks an item of a list, `<name>` a key "
                  "of your choosing. Unknown keys are refused.", sections(RunConfig))


def spec_sections() -> list[Section]:
    from rlkd.bench.spec import EvalSpec, GridSpec

    # `eval:` of a spec or task is stored as a plain mapping and validated per cell as EvalSpec.
    return sections(GridSpec) + sections(EvalSpec, "eval")


def spec_reference() -> str:
    return render("Benchmark spec reference (`rlkd bench SPEC`)",
                  "Every key of a benchmark spec. `defaults`, a task's `run`, an objective's and a variant's "
                  "`run` are partial run configs (`rlkd config --reference`), deep-merged in that order; "
                  "`eval:` (of the spec or a task) takes the keys of the `eval` section. "
                  "`benchmarks/example.yaml` shows them in use.", spec_sections())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlkd config", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", action="store_true",
                        help="print every field with its type, default, bounds and description (Markdown)")
    parser.add_argument("--spec", action="store_true", help="the benchmark spec's fields instead of the run config's")
    args = parser.parse_args(argv)
    if not args.reference:
        parser.print_usage()
        print("rlkd config: nothing to do; try --reference", file=__import__("sys").stderr)
        return 2
    print(spec_reference() if args.spec else run_config_reference())
    return 0
