"""The configuration reference, rendered from the config models themselves (field, type, default, help).

Fields are grouped by the `# --- section ---` comments of their class. A field whose type is a pydantic model
(a stage's own options) becomes a block of its own, listing that model's fields under dotted names. One
structure feeds both renderings: Markdown for docs/configuration.md and plain text for `rlhf-time --help-config`.

    python -m rlhf_time.config_docs > docs/configuration.md
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from pydantic import BaseModel

from rlhf_time.config import TrainingConfig

SECTION_COMMENT = re.compile(r"^\s*# -+ (?P<title>.+?) -*$")
REGENERATE = "python -m rlhf_time.config_docs > docs/configuration.md"
STAGE_OPTIONS = "stage options"  # the block of the option sections (rlhf_time.stages.SECTIONS)


@dataclass
class FieldDoc:
    name: str  # dotted for a field inside a section model: grpo.num_generations
    type: str
    default: str
    help: str


@dataclass
class Block:
    """A run of fields under one heading: a comment section, or a nested options model."""

    title: str
    help: str = ""
    fields: list[FieldDoc] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)  # nested models declared in this block


def reference(model: type[BaseModel] = TrainingConfig) -> list[Block]:
    """The model's fields as blocks, in declaration order."""
    return _blocks(model, prefix="")


def _blocks(model: type[BaseModel], prefix: str) -> list[Block]:
    sections = _section_of_each_field(model)
    blocks: dict[str, Block] = {}
    for name, info in model.model_fields.items():
        nested = _nested_model(info.annotation)
        title = sections.get(name, STAGE_OPTIONS if nested is not None else "other")
        block = blocks.setdefault(title, Block(title))
        if nested is None:
            block.fields.append(FieldDoc(prefix + name, _type_name(info.annotation), _default(info), info.description or ""))
            continue
        inner = Block(f"{prefix}{name}", help=info.description or "")
        for sub in _blocks(nested, prefix=f"{prefix}{name}."):
            inner.fields += sub.fields
            inner.blocks += sub.blocks
        block.blocks.append(inner)
    # The stage sections come after the shared fields, whatever their place in the class hierarchy.
    return sorted(blocks.values(), key=lambda block: block.title == STAGE_OPTIONS)


def _section_of_each_field(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the title of the last `# --- title ---` comment above it in the class body (MRO included)."""
    sections: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        try:
            lines, _ = inspect.getsourcelines(cls)
        except (OSError, TypeError):  # no source (built dynamically): one "other" block
            continue
        source = textwrap.dedent("".join(lines))
        titles = {number: m["title"] for number, line in enumerate(source.splitlines(), 1)
                  if (m := SECTION_COMMENT.match(line))}
        body = ast.parse(source).body[0].body
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                above = [number for number in titles if number < node.lineno]
                if above:
                    sections[node.target.id] = titles[max(above)]
    return sections


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *typing.get_args(annotation)] if _is_union(annotation) else [annotation]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType)


def _type_name(annotation: Any) -> str:
    """`int`, `str or None`, `one of "linear", "cosine"`, `list[str]`: readable, and free of `|` for tables."""
    if annotation is type(None):
        return "None"
    if _is_union(annotation):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(value) for value in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(arg) for arg in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]"
    return getattr(annotation, "__name__", str(annotation))


def _default(info: Any) -> str:
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(its defaults)"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


# ---------------------------------------------------------------------------------------------- renderings
def render_markdown(model: type[BaseModel] = TrainingConfig) -> str:
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from the config models by `{REGENERATE}`; do not edit by hand. -->",
        "",
        f"Every field of `{model.__name__}`, which one YAML file mirrors key for key (`key=value` on the command "
        "line). Unknown keys, wrong types and out-of-range values are errors that name the field and what is "
        "allowed. `rlhf-time --help-config` prints the same list.",
    ]
    for block in reference(model):
        lines += ["", f"## {block.title[:1].upper()}{block.title[1:]}", ""]
        lines += _markdown_table(block.fields) if block.fields else []
        for inner in block.blocks:
            lines += _markdown_nested(inner, level=3)
    return "\n".join(lines) + "\n"


def _markdown_nested(block: Block, level: int) -> list[str]:
    lines = ["", f"{'#' * level} `{block.title}`", ""]
    if block.help:
        lines += [_escape(block.help), ""]
    lines += _markdown_table(block.fields) if block.fields else []
    for inner in block.blocks:
        lines += _markdown_nested(inner, level + 1)
    return lines


def _markdown_table(fields: list[FieldDoc]) -> list[str]:
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for doc in fields:
        rows.append(f"| `{doc.name}` | {_escape(doc.type)} | `{doc.default}` | {_escape(doc.help)} |")
    return rows


def _escape(text: str) -> str:
    """Markdown-safe table cell: no HTML tags, emphasis, link brackets or cell breaks from plain help text."""
    for char, escaped in (("\\", "\\\\"), ("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("*", "\\*"),
                          ("[", "\\["), ("]", "\\]"), ("|", "\\|"), ("_", "\\_"), ("`", "\\`")):
        text = text.replace(char, escaped)
    return text


def render_text(model: type[BaseModel] = TrainingConfig) -> str:
    lines: list[str] = []
    for block in reference(model):
        lines += [f"== {block.title} ==", *_text_fields(block.fields)]
        for inner in block.blocks:
            lines += _text_nested(inner)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _text_nested(block: Block) -> list[str]:
    lines = [f"-- {block.title} --", *([f"    {block.help}"] if block.help else []), *_text_fields(block.fields)]
    for inner in block.blocks:
        lines += _text_nested(inner)
    return lines


def _text_fields(fields: list[FieldDoc]) -> list[str]:
    return [f"{doc.name}: {doc.type} = {doc.default}\n    {doc.help}" for doc in fields]


if __name__ == "__main__":
    print(render_markdown(), end="")
