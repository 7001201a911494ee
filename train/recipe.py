"""The recipe: a YAML file validated into typed objects, with dotted command-line overrides.

This module reads it: shipped names, YAML with one-line errors, overrides, validation errors turned into one
line that names the key. The schema is `recipe_schema` (the whole recipe and its rules between sections) and
`recipe_sections` (one model per section); their public names are importable from here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

import longtune.train as _train_pkg
from longtune.data_prep.yaml_config import apply_overrides as apply_dotted_overrides
from longtune.data_prep.yaml_config import unknown_key_message

from .recipe_schema import STAGE_FIXED_KEYS, Recipe, RecipeError, StageSection
from .recipe_sections import SP_ATTN_IMPLEMENTATION, StageGateSection, known_attn_implementations

__all__ = ["RECIPES_DIR", "SP_ATTN_IMPLEMENTATION", "STAGE_FIXED_KEYS", "Recipe", "RecipeError", "StageGateSection",
           "StageSection", "apply_overrides", "known_attn_implementations", "load_recipe", "recipe_from_dict",
           "resolve_recipe_path", "shipped_recipes"]

RECIPES_DIR = Path(_train_pkg.__file__).resolve().parent.parent / "recipes"
"""Shipped recipes: `recipes/` of the checkout, or `longtune/recipes` of an installed package."""


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped with longtune (`longtune train NAME`)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if path.suffix not in (".yaml", ".yml") or not path.parent.parts:
        if shipped.is_file():
            return shipped
    raise RecipeError(f"recipe {name_or_path!r} is neither a file nor a shipped recipe "
                      f"(shipped: {', '.join(shipped_recipes())})")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Dotted `section.key=value` overrides (values parsed as YAML); problems are RecipeErrors."""
    return apply_dotted_overrides(data, overrides, RecipeError)


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem becomes one RecipeError."""
    path = resolve_recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"recipe {path}: cannot read it as YAML ({exc})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: the top level must be a mapping of sections, got "
                          f"{type(data).__name__}")
    data = apply_overrides(data, list(overrides))
    return recipe_from_dict(data, source=str(path))


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: " + "; ".join(_describe(err) for err in exc.errors())) from None


def _describe(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc) or "recipe"
    if err["type"] == "extra_forbidden":
        return unknown_key_message(loc, _valid_keys(loc[:-1]))
    if err["type"] == "value_error":
        msg = err["msg"].removeprefix("Value error, ")
        return f"{where}: {msg}" if loc else msg  # loc is empty for the recipe-level cross-field checks
    got = err.get("input")
    return f"{where}: {err['msg']} (got {got!r})"


def _valid_keys(section_path: list[str]) -> list[str]:
    cls: type[BaseModel] = Recipe
    for name in section_path:
        if name.isdigit():  # an index into a list of sections (stages.1)
            continue
        ann = cls.model_fields[name].annotation
        if get_origin(ann) is list and get_args(ann):
            ann = get_args(ann)[0]
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        cls = ann
    return list(cls.model_fields)
