"""Context-window extension as configuration: compute the rope parameters for a method and write them
into the HF config (transformers 5 `rope_parameters`, `rope_theta` kept inside), with
`max_position_embeddings` updated. transformers applies them; we only compute them."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from longtune.data_prep.user_error import UserError

log = logging.getLogger(__name__)


class ExtensionError(UserError, ValueError):
    """Extension settings that cannot be applied to this model."""


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
    rotary_dim: int = 0
    """Dimensions that rotate: head_dim × partial_rotary_factor (the |D| of the formulas)."""
    base_parameters: tuple[tuple[str, Any], ...] = ()
    """Keys of the model's own rope_parameters that every method keeps (e.g. partial_rotary_factor)."""

    def rope_base(self, **params: Any) -> dict[str, Any]:
        """The model's kept keys, then `rope_theta`, then the method's keys."""
        return {**dict(self.base_parameters), "rope_theta": self.rope_theta, **params}


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
    _no_options(p)
    return p.rope_base(rope_type="linear", factor=p.factor), p.target_length


@rope_rule("dynamic")
def _dynamic(p: ExtensionPlan) -> tuple[dict[str, Any], int]:
    # Dynamic NTK rescales at run time once a sequence exceeds max_position_embeddings: transformers
    # computes b' = b·(f·l/L − (f − 1))^(d/(d−2)) with L = max_position_embeddings, so that field must keep
    # the pre-trained length L (writing the target there would shift every rescaled base).
    _no_options(p)
    return p.rope_base(rope_type="dynamic", factor=p.factor), p.original_length


@rope_rule("ntk")
def _ntk(p: ExtensionPlan) -> tuple[dict[str, Any], int]:
    # NTK-aware base change: b' = b · s^(d / (d − 2)), d the rotary dimensions. Option `alpha` replaces s
    # in the base (the NTK-aware recipe usually sets it above the true ratio).
    _known(p.options, ("alpha",))
    d = p.rotary_dim
    s = float(p.options.get("alpha", p.factor))
    params = p.rope_base(rope_type="default")
    params["rope_theta"] = p.rope_theta * s ** (d / (d - 2))
    return params, p.target_length


@rope_rule("abf")
def _abf(p: ExtensionPlan) -> tuple[dict[str, Any], int]:
    new_theta = p.options.get("rope_theta")
    if new_theta is None:
        raise ExtensionError("extension.method=abf needs extension.rope_theta")
    _no_options(p)
    params = p.rope_base(rope_type="default")
    params["rope_theta"] = float(new_theta)
    return params, p.target_length


@rope_rule("yarn")
def _yarn(p: ExtensionPlan) -> tuple[dict[str, Any], int]:
    # transformers' yarn = the YaRN reference code: a linear ramp over the pair index between the correction
    # dims of beta_fast (32) and beta_slow (1) rotations, cos/sin multiplied by 0.1·ln s + 1.
    params = p.rope_base(rope_type="yarn", factor=p.factor, original_max_position_embeddings=p.original_length)
    params.update(_known(p.options, ("attention_factor", "beta_fast", "beta_slow", "mscale",
                                     "mscale_all_dim", "truncate")))
    return params, p.target_length


@rope_rule("llama3")
def _llama3(p: ExtensionPlan) -> tuple[dict[str, Any], int]:
    params = p.rope_base(rope_type="llama3", factor=p.factor, original_max_position_embeddings=p.original_length,
                         low_freq_factor=1.0, high_freq_factor=4.0)
    params.update(_known(p.options, ("low_freq_factor", "high_freq_factor")))
    if not params["low_freq_factor"] < params["high_freq_factor"]:
        raise ExtensionError(f"llama3: low_freq_factor {params['low_freq_factor']} must be below "
                             f"high_freq_factor {params['high_freq_factor']}")
    return params, p.target_length


@rope_rule("longrope")
def _longrope(p: ExtensionPlan) -> tuple[dict[str, Any], int]:
    # inv_freq_i = 1 / (λ_i · b^(2i/d)); transformers uses short_factor up to original_max_position_embeddings
    # and long_factor (for the whole sequence) beyond; short_factor defaults to all ones (no rescale).
    half = p.rotary_dim // 2
    factors = {"short_factor": p.options.get("short_factor", [1.0] * half),
               "long_factor": p.options.get("long_factor")}
    for key, value in factors.items():
        if (not isinstance(value, (list, tuple)) or len(value) != half
                or not all(isinstance(v, (int, float)) and v > 0 for v in value)):
            raise ExtensionError(f"extension.options.{key} must be a list of head_dim/2 = {half} positive numbers")
        factors[key] = [float(v) for v in value]
    params = p.rope_base(rope_type="longrope", factor=p.factor, original_max_position_embeddings=p.original_length,
                         **factors)
    extra = _known(p.options, ("attention_factor", "short_factor", "long_factor"))
    params.update({k: v for k, v in extra.items() if k == "attention_factor"})
    return params, p.target_length


def _no_options(p: ExtensionPlan) -> None:
    _known(p.options, ())


def _known(options: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(keys) - {"rope_theta"})
    if unknown:
        raise ExtensionError(f"extension.options: unknown {', '.join(unknown)}; valid: {', '.join(keys) or 'none'}")
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
    if target <= 0 or original <= 0:
        raise ExtensionError(f"extension lengths must be positive (original {original}, target {target})")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0))
    rotary_dim = int(head_dim * partial)
    opts = dict(options or {})
    if rope_theta is not None:
        opts["rope_theta"] = rope_theta
    theta = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    kept = tuple((k, v) for k, v in params.items() if k in _KEPT_KEYS)
    return ExtensionPlan(method, original, target, float(factor), float(theta), head_dim, opts,
                         rotary_dim=rotary_dim, base_parameters=kept)


_KEPT_KEYS = ("partial_rotary_factor",)


def apply_extension(config: PretrainedConfig, plan: ExtensionPlan) -> dict[str, Any]:
    """Write the plan into `config` in place; returns the new rope_parameters."""
    rope_parameters, max_positions = _RULES[plan.method](plan)
    before = (dict(getattr(config, "rope_parameters", None) or {}), config.max_position_embeddings)
    config.rope_parameters = rope_parameters
    config.max_position_embeddings = max_positions
    log.info("extension %s: rope_parameters %s -> %s; max_position_embeddings %d -> %d", plan.method,
             before[0], rope_parameters, before[1], max_positions)
    return rope_parameters


def extend_model_dir(model_dir: str | Path, out_dir: str | Path, method: str, target_length: int | None = None,
                     *, original_length: int | None = None, factor: float | None = None,
                     rope_theta: float | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write an extended copy of an HF model dir: same weights and tokenizer, new rope config.

    Written to a temporary sibling first and renamed, so a failure leaves no half-written dir."""
    from transformers import AutoConfig

    src, dst = Path(model_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise ExtensionError(f"model dir {str(src)!r} has no config.json")
    if dst.exists():
        raise ExtensionError(f"output dir {str(dst)!r} already exists")
    config = AutoConfig.from_pretrained(src)
    plan = plan_extension(config, method, target_length, original_length, factor, rope_theta, options)
    params = apply_extension(config, plan)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        for item in src.iterdir():
            if item.is_file() and item.name != "config.json":
                shutil.copy2(item, tmp / item.name)
        config.save_pretrained(tmp)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return params
