"""What the YAML configs of every longtune command (recipes, prep configs) share: dotted
`key.sub=value` overrides — values parsed as YAML, list items addressed by index
(`sources.0.weight.share=0.3`) — and the message for an unknown key."""

from __future__ import annotations

import difflib
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


def unknown_key_message(loc: list[str], valid: list[str]) -> str:
    """`loc` is the path of the unknown key; `valid` the keys allowed at that level."""
    hint = difflib.get_close_matches(loc[-1], valid, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown key {'.'.join(loc)!r}{suggestion}; valid keys here: {', '.join(valid)}"
