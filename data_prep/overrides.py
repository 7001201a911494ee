"""Dotted `key.sub=value` overrides for the YAML configs of every longtune command (recipes and prep
configs): values are parsed as YAML, list items are addressed by index (`sources.0.weight.share=0.3`)."""

from __future__ import annotations

from typing import Any

import yaml


def parse_override(text: str, error: type[Exception] = ValueError) -> tuple[list[str], Any]:
    """`train.max_steps=10` → (['train', 'max_steps'], 10)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise error(f"override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise error(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str], error: type[Exception] = ValueError
                    ) -> dict[str, Any]:
    """Apply overrides to `data` in place (missing sections are created); returns `data`."""
    for text in overrides:
        keys, value = parse_override(text, error)
        node: Any = data
        for depth, key in enumerate(keys[:-1]):
            where = ".".join(keys[:depth + 1])
            if isinstance(node, list):
                node = node[_index(text, where, key, node, error)]
                continue
            child = node.setdefault(key, {})
            if not isinstance(child, (dict, list)):
                raise error(f"override {text!r}: {where} is not a section")
            node = child
        if isinstance(node, list):
            node[_index(text, ".".join(keys), keys[-1], node, error)] = value
        else:
            node[keys[-1]] = value
    return data


def _index(text: str, where: str, key: str, items: list, error: type[Exception]) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise error(f"override {text!r}: {where} is not an index of a list of {len(items)}")
    return int(key)
