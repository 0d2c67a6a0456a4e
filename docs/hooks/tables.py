"""MkDocs hook: the tables that describe code are generated from it at build time, so they cannot drift.

A page asks for a table with a marker on a line of its own: ``<!-- mha:settings -->`` (service/settings.py's
``Settings``), ``<!-- mha:errors -->`` (service/errors.py's ``ERROR_STATUS`` and ``ERROR_DESCRIPTIONS``) or
``<!-- mha:metrics -->`` (the registry that service/metrics.py's ``Metrics`` builds). An unknown marker fails
the build, so a typo cannot leave a page without its table.
"""

from __future__ import annotations

import re
import sys
import types
import typing
from pathlib import Path

MARKER = re.compile(r"^<!-- mha:([a-z]+) -->$", re.MULTILINE)


def on_config(config):
    # Document the tree mkdocs.yml lives in, not whatever copy of the packages the environment installed.
    root = str(Path(config.config_file_path).resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return config


def on_page_markdown(markdown: str, page, config, files) -> str:
    def table(m: re.Match) -> str:
        name = m.group(1)
        if name not in TABLES:
            raise ValueError(f"{page.file.src_path}: unknown table marker mha:{name} (known: {', '.join(TABLES)})")
        return TABLES[name]()

    return MARKER.sub(table, markdown)


def _cell(text: str) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text.replace("<", "&lt;").replace(">", "&gt;")  # "Bearer <key>" is text, not a tag


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " \\| ".join(_type_name(a) for a in args) + " (optional)"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default_factory is not None:
        factory = field.default_factory
        return f"`{factory.__module__.lstrip('_')}.{factory.__qualname__}()`"
    value = field.default
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int) and value >= 1024 and value % 1024 == 0:
        for unit, size in (("Mi", 1024 * 1024), ("Ki", 1024)):
            if value % size == 0:
                return f"`{value}` ({value // size} {unit})"
    return f"`{value}`"


def _bounds(field) -> str:
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    out = []
    for item in field.metadata:
        for attr, word in words.items():
            value = getattr(item, attr, None)
            if value is not None:
                out.append(f"{word} {value}")
    return ", ".join(out)


def settings_table() -> str:
    from service.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    rows = ["| variable | type | default | what it does and how to tune it |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        kind = _type_name(field.annotation)
        bounds = _bounds(field)
        if bounds:
            kind += f", {bounds}"
        var = f"{prefix}{name}".upper()
        rows.append(
            f'| <a id="{var.lower()}"></a>`{var}` | {kind} | {_default(field)} | {_cell(field.description or "")} |'
        )
    return "\n".join(rows)


def errors_table() -> str:
    from service.errors import ERROR_DESCRIPTIONS, ERROR_STATUS

    rows = ["| status | type | meaning |", "|---|---|---|"]
    for kind, status in sorted(ERROR_STATUS.items(), key=lambda kv: (kv[1], kv[0])):
        rows.append(f"| {status} | `{kind}` | {_cell(ERROR_DESCRIPTIONS.get(kind, ''))} |")
    return "\n".join(rows)


def metrics_table() -> str:
    from prometheus_client.metrics import MetricWrapperBase

    from service.metrics import Metrics

    metrics = Metrics()
    # The registry names every family; the label names live only on the metric objects that Metrics keeps.
    labels = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for family in metric.describe():
                labels.setdefault(family.name, getattr(metric, "_labelnames", ()))
    rows = ["| metric | type | labels | help |", "|---|---|---|---|"]
    for family in metrics.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        names = ", ".join(f"`{label}`" for label in labels.get(family.name, ()))
        rows.append(f"| `{name}` | {family.type} | {names} | {_cell(family.documentation)} |")
    return "\n".join(rows)


TABLES = {"settings": settings_table, "errors": errors_table, "metrics": metrics_table}
