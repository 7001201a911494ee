"""docs/recipes.md, generated from the recipe schema: every key's type, default and meaning live in one place,
the Field descriptions, and this module turns them into the page (`python -m longtune.train.recipe_docs`)."""

from __future__ import annotations

import inspect
import types
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from .recipe import Recipe

HEADER = """\
# Recipe keys

A recipe is YAML with the sections below; every key is optional (defaults shown). Unknown keys are
errors that name the valid keys. Override any key on the command line:
`longtune train RECIPE train.max_steps=10 parallel.sp.ulysses=2`.

This page is generated from the schema's field descriptions (`longtune.train.recipe`) by `make docs`
(`python -m longtune.train.recipe_docs > docs/recipes.md`); `tests/test_recipe_docs.py` fails when it is
out of date. Edit the descriptions, not this page.
"""


def recipe_docs_markdown() -> str:
    """The whole of docs/recipes.md: the header, a list of sections, then one key table per section."""
    sections = list(Recipe.model_fields)
    parts = [HEADER, "Sections: " + " · ".join(f"[{name}](#{name})" for name in sections) + ".\n"]
    for name, field in Recipe.model_fields.items():
        parts.append(f"## {name}\n")
        intro = _section_doc(_section_class(field.annotation))
        if intro:
            parts.append(intro + "\n")
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        rows += _key_rows(name, field)
        parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)


def _key_rows(key: str, field: Any) -> list[str]:
    """Table rows for one key: a section expands into its keys, a list of sections into `key[].…` rows."""
    ann = field.annotation
    if _is_section(ann):
        return [row for name, sub in ann.model_fields.items() for row in _key_rows(f"{key}.{name}", sub)]
    default = field.get_default(call_default_factory=True)
    shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
    rows = [f"| `{key}` | {_cell(_type_name(ann))} | `{shown}` | {_cell(field.description or '')} |"]
    item = _section_class(ann)
    if item is not None:  # a list of sections: the keys every item takes
        rows += [row for name, sub in item.model_fields.items() for row in _key_rows(f"{key}[].{name}", sub)]
    return rows


def _type_name(ann: Any) -> str:
    """A YAML reader's name for a field's type: choices, `int | null`, `list of str`, `mapping`."""
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " | ".join(str(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is tuple:
        return "[" + ", ".join(_type_name(arg) for arg in args) + "]"
    if origin is dict or _is_section(ann):
        return "mapping"
    if ann is type(None):
        return "null"
    if ann is Any:
        return "any"
    return getattr(ann, "__name__", str(ann))


def _is_section(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _section_class(ann: Any) -> type[BaseModel] | None:
    """The schema class behind a section or a list of sections, else None."""
    if _is_section(ann):
        return ann
    args = get_args(ann)
    if get_origin(ann) is list and args and _is_section(args[0]):
        return args[0]
    return None


def _section_doc(cls: type[BaseModel] | None) -> str:
    """The section class's own docstring (not one inherited from pydantic), as a paragraph."""
    doc = cls.__dict__.get("__doc__") if cls is not None else None
    return inspect.cleandoc(doc) if doc else ""


def _cell(text: str) -> str:
    """Markdown table cell text: a `|` would end the cell, a newline the row."""
    return " ".join(text.split()).replace("|", "\\|")


if __name__ == "__main__":
    print(recipe_docs_markdown(), end="")
