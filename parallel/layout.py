"""One training layout: every parallel and memory decision of a run, resolved once.

`Layout` holds the degrees (dp, sp, tp, pp), how state is sharded, recomputation, offload, tiling and the
pipeline schedule. The recipe is turned into one by `longtune.train.recipe_layout.layout_from_recipe`
(beside its inverse, `recipe_for_layout`), and everything that acts on those decisions reads it: the
backends, `parallelize()`, the memory and time models and the planner. Adding a memory switch means a
field here, its recipe key and the code that acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Attention = Literal["flash", "sdpa_masked"]
"""flash: an O(L) kernel that keeps GQA's KV heads (flash-attn, torch flash/efficient sdpa without a mask,
longtune's ring/Ulysses kernels). sdpa_masked: transformers' sdpa with a packed-document mask (one process,
`data.document_masking` with several documents per row): KV heads repeated to the query heads and a float
copy of the L × L mask saved by every layer."""

Sharding = Literal["ddp", "fsdp", "zero1", "zero2", "zero3"]


@dataclass(frozen=True)
class Layout:
    """One parallel and memory layout: the degrees and the recipe's memory switches. The defaults are one
    process with nothing switched on (the planner's enumeration and the tests build layouts field by field)."""

    dp: int = 1
    sp_ulysses: int = 1
    sp_ring: int = 1
    tp: int = 1
    pp: int = 1
    sharding: Sharding = "ddp"  # ddp (plain replicas), fsdp (FSDP2 ≈ ZeRO-3), zero1/2/3 (DeepSpeed)
    recompute: Literal["none", "full", "selective"] = "none"
    recompute_every: int = 2  # selective: every k-th layer
    recompute_modules: tuple[str, ...] = ()  # selective: e.g. ("mlp",) instead of whole layers
    offload_checkpoints: bool = False
    offload_activations: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    optimizer_swap: bool = False  # AdamW's state out of the device between steps, back for the step
    offload_gradients: bool = False  # each gradient out of the device once accumulated, back for the step
    offload_tier: Literal["host", "disk"] = "host"  # where offloaded checkpoints, gradients and state go
    tiled_loss_chunk: int = 0  # 0: off
    tiled_mlp_chunk: int = 0  # 0: off
    sequence_chunks: int = 1  # >1: each decoder layer runs chunk by chunk (sequence_chunks.py)
    micro_batch: int = 1
    grad_accum: int = 1
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    attention: Attention = "flash"
    sp_layout: Literal["contiguous", "zigzag"] = "zigzag"  # how the ring dimension orders the sequence
    tp_sequence_parallel: bool = True  # tp > 1: norms and residual stream sharded over the sequence too
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b
    pp_stages_per_rank: int = 1
    offload_dir: str | None = None  # offload_tier=disk: the directory its files go under
    pose: bool = False  # PoSE position skips: attention through longtune's kernels on one process too

    @property
    def sharded_attention(self) -> bool:
        """Attention through longtune's sequence-parallel kernels (`parallelize()` step 1): the sequence is
        sharded, layers run chunk by chunk, or PoSE's position skips would read as document starts in
        transformers' own attention."""
        return self.sp > 1 or self.pose or self.sequence_chunks > 1

    @property
    def zero_stage(self) -> int:
        """The DeepSpeed ZeRO stage (0 for plain replicas; FSDP2 is native, not a ZeRO stage)."""
        return int(self.sharding[-1]) if self.sharding.startswith("zero") else 0

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    @property
    def disk_dir(self) -> str | None:
        """Where the disk tier's files go; None: host memory."""
        return self.offload_dir if self.offload_tier == "disk" else None

    @property
    def sp(self) -> int:
        return self.sp_ulysses * self.sp_ring

    @property
    def world(self) -> int:
        return self.dp * self.sp * self.tp * self.pp

    @property
    def shard_group(self) -> int:
        """Ranks over which ZeRO / FSDP shard states: dp × sp (sequence-parallel ranks are replicas)."""
        return self.dp * self.sp

    def describe(self) -> str:
        parts = [f"dp{self.dp}"]
        if self.sp_ring > 1:
            parts.append(f"ring{self.sp_ring}")
        if self.sp_ulysses > 1:
            parts.append(f"ulysses{self.sp_ulysses}")
        if self.tp > 1:
            parts.append(f"tp{self.tp}")
        if self.pp > 1:
            parts.append(f"pp{self.pp}")
        parts.append(self.sharding)
        if self.recompute != "none":
            parts.append("rc-" + (self.recompute if self.recompute == "full" else
                                  "+".join(self.recompute_modules) or f"every{self.recompute_every}"))
        offloads = [n for n, on in (("ckpt", self.offload_checkpoints), ("act", self.offload_activations),
                                    ("opt", self.offload_optimizer), ("param", self.offload_params),
                                    ("swapopt", self.optimizer_swap), ("grad", self.offload_gradients)) if on]
        if offloads:
            parts.append("off-" + "+".join(offloads) + ("-disk" if self.offload_tier == "disk" else ""))
        if self.tiled_mlp_chunk:
            parts.append(f"tmlp{self.tiled_mlp_chunk}")
        if self.tiled_loss_chunk:
            parts.append(f"tloss{self.tiled_loss_chunk}")
        if self.sequence_chunks > 1:
            parts.append(f"chunks{self.sequence_chunks}")
        if self.micro_batch > 1:
            parts.append(f"mb{self.micro_batch}")
        return " ".join(parts)
