"""Rotary embeddings whose frequencies depend on the sequence length, on one shard of that sequence.

transformers' dynamic NTK and LongRoPE rotary embeddings choose their frequencies on every call from
`max(position_ids) + 1`: dynamic NTK rescales the base once the length passes the cached one, LongRoPE
switches from its short to its long factors past the original context. Under sequence parallelism each rank
holds a shard of the positions, so each would choose from its own shard — different frequencies on
different ranks of one sequence, and not those of the single-process run (a contiguous ring's first shard
would keep the short factors while the second switched to the long ones).

`apply_length_aware_rope` hooks such a module: before each call it agrees on the longest position over the
sequence-parallel groups (one scalar all-reduce per group and forward) and appends that position as one
extra column; the module computes cos / sin (its own choice of frequencies, now from the whole sequence);
after the call the extra column is dropped. Hooks, not a wrapper module: the model's module and buffer names
stay those of the plain model (FSDP2 fills a sharded model's buffers from rank 0's plain copy by name).
cos / sin are elementwise in the positions, so the real columns equal what the module gives for them alone.
Padding added to make the length divisible is a document of its own that starts at position 0 and is
shorter than the padding multiple, so it never moves the maximum of a real sequence past a threshold.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
"""Rope types (and prefixes of them) whose frequencies transformers recomputes from the call's length."""


def rope_depends_on_length(rotary: nn.Module) -> bool:
    rope_type = getattr(rotary, "rope_type", "default")
    types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
    return any(t == "longrope" or "dynamic" in str(t) for t in types)


def _append_longest(groups: list[dist.ProcessGroup], module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: the longest position of the whole sequence as one extra position column."""
    args, kwargs = list(args), dict(kwargs)
    position_ids = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
    longest = position_ids.max().reshape(1).to(torch.int64)
    for group in groups:
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group)
    extra = longest.to(position_ids.dtype).expand(position_ids.shape[0], 1)
    position_ids = torch.cat([position_ids, extra], dim=1)
    if "position_ids" in kwargs:
        kwargs["position_ids"] = position_ids
    else:
        args[1] = position_ids
    return tuple(args), kwargs


def _drop_longest(module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]):
    """Forward hook: cos / sin without the extra column."""
    cos, sin = output
    return cos[:, :-1].contiguous(), sin[:, :-1].contiguous()


def apply_length_aware_rope(model: nn.Module, groups: dict) -> bool:
    """Hook `model.model.rotary_emb` when its frequencies depend on the length and the sequence is sharded
    over `groups` ("sp_ring" / "sp_ulysses" → process group or None). Returns whether it hooked."""
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    live = [g for g in (groups.get("sp_ring"), groups.get("sp_ulysses"))
            if g is not None and dist.get_world_size(g) > 1]
    if (rotary is None or getattr(rotary, "longtune_length_aware", False) or not live
            or not rope_depends_on_length(rotary)):
        return False
    rotary.register_forward_pre_hook(functools.partial(_append_longest, live), with_kwargs=True)
    rotary.register_forward_hook(_drop_longest)
    rotary.longtune_length_aware = True
    return True
