"""Context-window extension as configuration: compute the rope parameters for a method and write them
into the HF config (transformers 5 `rope_parameters`, `rope_theta` kept inside), with
`max_position_embeddings` updated. transformers applies them; we only compute them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig

log = logging.getLogger(__name__)


class ExtensionError(ValueError):
    """Extension settings that cannot be applied to this model."""

    user_facing = True  # the CLI prints it as one error line, without a traceback


@dataclass(frozen=True)
class ExtensionPlan:
    """What to do, with every length resolved."""

    method: str
    original_length: int
    target_length: int
    factor: float
    rope_theta: float
    head_dim: int
    options: dict[str, Any]


RopeRule = Callable[[ExtensionPlan], tuple[dict[str, Any], int]]
"""plan → (rope_parameters, new max_position_embeddings)."""

_RULES: dict[str, RopeRule] = {}


def rope_rule(name: str) -> Callable[[RopeRule], RopeRule]:
    def register(fn: RopeRule) -> RopeRule:
        _RULES[name] = fn
        return fn
    return register


@rope_rule("linear")
def _linear(p: ExtensionPlan) -> tuple[dict[str, Any], int]:
    return {"rope_type": "linear", "factor": p.factor, "rope_theta": p.rope_theta}, p.target_length


@rope_rule("dynamic")
def _dynamic(p: ExtensionPlan) -> tuple[dict[str, Any], int]:
    # Dynamic NTK rescales at run time once a sequence exceeds max_position_embeddings, so that field
    # keeps the pre-trained length.
    return {"rope_type": "dynamic", "factor": p.factor, "rope_theta": p.rope_theta}, p.original_length


@rope_rule("ntk")
def _ntk(p: ExtensionPlan) -> tuple[dict[str, Any], int]:
    # NTK-aware base change: b' = b · s^(d / (d − 2)).
    d = p.head_dim
    return {"rope_type": "default", "rope_theta": p.rope_theta * p.factor ** (d / (d - 2))}, p.target_length


@rope_rule("abf")
def _abf(p: ExtensionPlan) -> tuple[dict[str, Any], int]:
    new_theta = p.options.get("rope_theta")
    if new_theta is None:
        raise ExtensionError("extension.method=abf needs extension.rope_theta")
    return {"rope_type": "default", "rope_theta": float(new_theta)}, p.target_length


@rope_rule("yarn")
def _yarn(p: ExtensionPlan) -> tuple[dict[str, Any], int]:
    params = {"rope_type": "yarn", "factor": p.factor, "rope_theta": p.rope_theta,
              "original_max_position_embeddings": p.original_length}
    params.update(_known(p.options, ("attention_factor", "beta_fast", "beta_slow", "mscale",
                                     "mscale_all_dim", "truncate")))
    return params, p.target_length


@rope_rule("llama3")
def _llama3(p: ExtensionPlan) -> tuple[dict[str, Any], int]:
    params = {"rope_type": "llama3", "factor": p.factor, "rope_theta": p.rope_theta,
              "original_max_position_embeddings": p.original_length,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    params.update(_known(p.options, ("low_freq_factor", "high_freq_factor")))
    return params, p.target_length


@rope_rule("longrope")
def _longrope(p: ExtensionPlan) -> tuple[dict[str, Any], int]:
    half = p.head_dim // 2
    factors = {k: p.options.get(k) for k in ("short_factor", "long_factor")}
    for key, value in factors.items():
        if not isinstance(value, list) or len(value) != half:
            raise ExtensionError(f"extension.options.{key} must be a list of head_dim/2 = {half} numbers")
    params = {"rope_type": "longrope", "factor": p.factor, "rope_theta": p.rope_theta,
              "original_max_position_embeddings": p.original_length, **factors}
    params.update(_known(p.options, ("attention_factor",)))
    return params, p.target_length


def _known(options: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(keys) - {"rope_theta", "short_factor", "long_factor"})
    if unknown:
        raise ExtensionError(f"extension.options: unknown {', '.join(unknown)}; valid: {', '.join(keys)}")
    return {k: options[k] for k in keys if k in options}


def plan_extension(config: PretrainedConfig, method: str, target_length: int | None,
                   original_length: int | None = None, factor: float | None = None,
                   rope_theta: float | None = None, options: dict[str, Any] | None = None
                   ) -> ExtensionPlan:
    if method not in _RULES:
        raise ExtensionError(f"unknown extension method {method!r}; valid: {', '.join(sorted(_RULES))}")
    params = dict(getattr(config, "rope_parameters", None) or {})
    if params.get("rope_type", "default") != "default":
        raise ExtensionError(f"the model already uses rope_type {params['rope_type']!r}; extending an "
                             "already scaled rope is not supported")
    original = original_length or config.max_position_embeddings
    if factor is None:
        if target_length is None:
            raise ExtensionError("extension needs target_length or factor")
        factor = target_length / original
    target = target_length or int(round(original * factor))
    if method not in ("abf",) and factor < 1:
        raise ExtensionError(f"extension factor {factor:g} < 1: target_length {target} is shorter than "
                             f"the original length {original}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    opts = dict(options or {})
    if rope_theta is not None:
        opts["rope_theta"] = rope_theta
    return ExtensionPlan(method, original, target, float(factor), float(params.get("rope_theta", 10000.0)),
                         head_dim, opts)


def apply_extension(config: PretrainedConfig, plan: ExtensionPlan) -> dict[str, Any]:
    """Write the plan into `config` in place; returns the new rope_parameters."""
    rope_parameters, max_positions = _RULES[plan.method](plan)
    before = (dict(config.rope_parameters), config.max_position_embeddings)
    config.rope_parameters = rope_parameters
    config.max_position_embeddings = max_positions
    log.info("extension %s: rope_parameters %s -> %s; max_position_embeddings %d -> %d", plan.method,
             before[0], rope_parameters, before[1], max_positions)
    return rope_parameters
