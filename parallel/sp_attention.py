"""Sequence-parallel attention for HF models, registered with transformers' `AttentionInterface`.

`parallelize()` switches a model to `attn_implementation="longtune_sp"`; every forward then passes
`sp_context=SequenceParallelContext(...)` (built by `sp_input.shard_micro_batch`) through the model
to this function, which runs Ulysses all-to-all (if any) around ring attention (if any) with
document masking. The model's own code runs on its shard; nothing in transformers is patched.
The name holds no "flash": transformers treats such names as flash-attention kernel requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import AttentionInterface

from .kernels import get_kernel
from .ring_attention import RingAttention, RingPlan
from .sequence_chunks import chunk_attention
from .sp_rope import apply_length_aware_rope
from .ulysses import heads_to_sequence, replicate_kv_heads, sequence_to_heads

ATTN_IMPLEMENTATION = "longtune_sp"


@dataclass(frozen=True)
class SequenceParallelContext:
    """Where this rank's tokens sit in the sequence, and the groups to talk to."""

    layout: str  # contiguous | zigzag (over the ring dimension)
    seq_len: int  # padded full length
    doc_bounds: tuple[tuple[tuple[int, int], ...], ...]  # per row, global [start, end)
    ring: int
    ring_rank: int
    ring_group: dist.ProcessGroup | None
    ulysses: int
    ulysses_rank: int
    ulysses_group: dist.ProcessGroup | None
    kernel: str | None = None
    chunks: int = 1  # sequence-chunked layers: this many chunks of the sequence (sequence_chunks.py)


def sequence_parallel_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: torch.Tensor | None,
                                dropout: float = 0.0, scaling: float | None = None,
                                sp_context: SequenceParallelContext | None = None, **kwargs):
    """HF attention signature: q `[B, Hq, l, D]`, k/v `[B, Hkv, l, D]` → (`[B, l, Hq, D]`, None)."""
    if sp_context is None:
        raise RuntimeError(f"attn_implementation {ATTN_IMPLEMENTATION!r} needs sp_context=... in the "
                           "model call (longtune.parallel.sp_input.shard_micro_batch builds it)")
    if dropout:
        raise ValueError(f"attention dropout {dropout} is not supported under sequence parallelism")
    window = kwargs.get("sliding_window")
    if window is not None and window < sp_context.seq_len:
        raise ValueError(f"sliding-window attention (window {window}) is not supported under sequence "
                         "parallelism")
    ctx = sp_context
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # Under autocast the rotary embedding promotes q/k to fp32 while v stays bf16; sdpa would cast them
    # to the autocast dtype itself, our kernels need one dtype.
    device_type = query.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else query.dtype
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    # Resolved on the first call of the process and cached (kernels.get_kernel): the same answer every layer.
    kernel = get_kernel(ctx.kernel, q.device, dtype, q.shape[-1])
    plan = RingPlan(ctx.layout, ctx.ring, ctx.ring_rank, ctx.seq_len, ctx.doc_bounds, scale, kernel, ctx.ring_group)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if ctx.chunks > 1:  # this layer runs chunk by chunk: the chunks so far are the keys (sequence_chunks.py)
            return chunk_attention(q, k, v, ctx.chunks, plan)
        return RingAttention.apply(q, k, v, plan)
    if ctx.ulysses == 1:
        return attend(q, k, v).transpose(1, 2).contiguous(), None
    copies = replicate_kv_heads(k.shape[1], q.shape[1], ctx.ulysses)
    if copies > 1:
        k, v = k.repeat_interleave(copies, dim=1), v.repeat_interleave(copies, dim=1)
    # The all-to-alls work in [B, S, H, D]; the kernels take [B, H, S, D] views of it.
    q, k, v = (t.transpose(1, 2) for t in sequence_to_heads([t.transpose(1, 2) for t in (q, k, v)],
                                                           ctx.ulysses_group, ctx.ulysses))
    if ctx.ring > 1:
        # K/V travel around the ring: give them (and q) their own dense buffers once, so neither the
        # all-to-all buffer stays alive nor every ring step copies a strided view before sending.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = attend(q, k, v)
    return heads_to_sequence(out.transpose(1, 2), ctx.ulysses_group, ctx.ulysses), None


AttentionInterface.register(ATTN_IMPLEMENTATION, sequence_parallel_attention)


def apply_sequence_parallel(model: torch.nn.Module, groups: dict) -> None:
    """`parallelize()`'s sequence-parallel step: the model's attention becomes `sequence_parallel_attention`
    (transformers' own switch, `set_attn_implementation`) and a rotary embedding whose frequencies depend on
    the length learns the whole sequence's (sp_rope.py). `groups`: "sp_ring" / "sp_ulysses" → process group."""
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    apply_length_aware_rope(model, groups)
