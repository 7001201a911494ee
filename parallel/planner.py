"""The layout planner: every valid layout of a model on N devices, with its memory and step time, ranked.

Pure functions over `memory_model` and `time_model`; `longtune plan` (train/commands/plan.py) is the CLI.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from .layout import Layout
from .layout_rules import sequence_chunks_problem as recipe_rule
from .layout_rules import ulysses_heads_problem
from .memory_model import GIB, MemoryBreakdown, ModelShape, memory_breakdown
from .time_model import Calibration, StepEstimate, step_time


@dataclass(frozen=True)
class Hardware:
    """What the layouts must fit: `gpus` devices of `gpu_mem_gib`, `gpus_per_node` to a node whose host
    memory (`host_mem_gib`) and local NVMe (`disk_gib`, the disk offload tier) its ranks share."""

    gpus: int
    gpu_mem_gib: float
    host_mem_gib: float
    gpus_per_node: int
    baseline_gib: float = 1.5  # CUDA context, NCCL buffers, allocator fragmentation (outside the model)
    headroom: float = 0.9  # use at most this fraction of device memory
    disk_gib: float = 28000.0  # 8 × 3.84 TB NVMe drives (DGX H100, AWS p5 class): 30.7 TB

    @property
    def usable_device_bytes(self) -> float:
        return self.gpu_mem_gib * GIB * self.headroom - self.baseline_gib * GIB

    @property
    def host_bytes_per_rank(self) -> float:
        return self.host_mem_gib * GIB / min(self.gpus_per_node, self.gpus)

    @property
    def disk_bytes_per_rank(self) -> float:
        return self.disk_gib * GIB / min(self.gpus_per_node, self.gpus)


@dataclass
class PlanRow:
    layout: Layout
    memory: MemoryBreakdown
    time: StepEstimate
    fits_device: bool
    fits_host: bool
    fits_disk: bool = True

    @property
    def fits(self) -> bool:
        return self.fits_device and self.fits_host and self.fits_disk


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_problem(shape: ModelShape, layout: Layout, seq_len: int) -> str | None:
    """Why a layout cannot run with longtune, or None. The same rules the recipe and `setup_run` apply."""
    if layout.tp > 1 and (shape.heads % layout.tp or shape.kv_heads % layout.tp or shape.intermediate % layout.tp):
        return f"tp {layout.tp} does not divide the heads ({shape.heads}, {shape.kv_heads} KV) or the MLP width"
    heads = ulysses_heads_problem(shape.heads, shape.kv_heads, layout.sp_ulysses, layout.tp)
    if heads:
        return heads
    if layout.pp > shape.layers:
        return f"pp {layout.pp} is more than {shape.layers} layers"
    if layout.pp > 1 and layout.grad_accum < layout.pp:
        return f"pp {layout.pp} needs at least {layout.pp} micro-batches per step"
    if seq_len % (2 * layout.sp_ring * layout.sp_ulysses) and layout.sp > 1:
        return f"length {seq_len} is not divisible by 2 × sp (= {2 * layout.sp})"
    if layout.tp > 1 and layout.tiled_mlp_chunk:
        return "tiled MLP with tp > 1 is not available yet"
    if layout.sharding.startswith("zero") and (layout.tp > 1 or layout.pp > 1):
        return "the deepspeed backend has no tensor or pipeline parallelism"
    if layout.offload_checkpoints and layout.recompute == "none":
        return "offload.checkpoints needs recompute"
    if (layout.offload_params or layout.offload_optimizer) and layout.sharding == "ddp":
        return "optimizer / parameter offload needs FSDP or ZeRO"
    if layout.optimizer_swap and layout.sharding != "ddp":
        return "optimizer swapping is for the native backend without FSDP"
    if layout.offload_gradients and (layout.sharding != "ddp" or layout.world > 1):
        return "gradient offload is for one process on the native backend"
    if layout.offload_params and layout.sharding in ("zero1", "zero2"):
        return "parameter offload needs ZeRO-3"
    return sequence_chunks_problem(layout, seq_len)


def sequence_chunks_problem(layout: Layout, seq_len: int) -> str | None:
    """Why a layout cannot run its layers in `sequence_chunks` chunks, or None (the recipe's rule, and the
    chunks split each rank's tokens evenly): they replace whole-layer recomputation (recompute full) and
    compose with Ulysses, a contiguous ring, FSDP2, DDP, ZeRO-1/2, tiling and offload, not with tp, pp or ZeRO-3."""
    n = layout.sequence_chunks
    problem = recipe_rule(n, layout.recompute, layout.recompute_modules, ring=layout.sp_ring,
                          ring_layout=layout.sp_layout, tp=layout.tp, pp=layout.pp, zero_stage=layout.zero_stage)
    if problem or n == 1:
        return problem
    local = seq_len // layout.sp
    if local % n:
        return f"sequence_chunks {n} does not divide the {local} tokens per rank (length {seq_len} / sp {layout.sp})"
    return None


MEMORY_OPTIONS: list[dict] = [
    {},
    {"recompute": "full"},
    {"recompute": "full", "tiled_loss_chunk": 2048},
    {"recompute": "full", "tiled_loss_chunk": 2048, "tiled_mlp_chunk": 4096},
    {"recompute": "full", "offload_checkpoints": True, "tiled_loss_chunk": 2048, "tiled_mlp_chunk": 4096},
    {"recompute": "full", "offload_checkpoints": True, "offload_tier": "disk", "tiled_loss_chunk": 2048,
     "tiled_mlp_chunk": 4096},
]
"""Memory switches tried with every degree combination, cheapest in compute first (the disk tier is for
checkpoints that outgrow host memory)."""

OFFLOAD_OPTIONS: list[dict] = [{}, {"offload_optimizer": True}, {"offload_optimizer": True, "offload_params": True}]

CHUNKED_OPTIONS: list[dict] = [
    {"recompute": "full", "tiled_loss_chunk": 2048, "tiled_mlp_chunk": 4096},
    {"recompute": "full", "offload_checkpoints": True, "tiled_loss_chunk": 2048, "tiled_mlp_chunk": 4096},
    {"recompute": "full", "offload_checkpoints": True, "offload_tier": "disk", "tiled_loss_chunk": 2048,
     "tiled_mlp_chunk": 4096},
]
"""Memory switches tried with sequence-chunked layers (chunking recomputes every layer; its K/V go to the
offload tier: host memory, or NVMe where host memory runs out)."""

CHUNK_TOKENS = (8192, 65536)
"""Chunk sizes tried, tokens per rank: below 8K the tier traffic per chunk of attention grows (it is
N/2 passes over the K/V), above 64K the chunk's working set approaches an unchunked layer's."""


def sequence_chunk_counts(local_tokens: int) -> list[int]:
    """Chunk counts N > 1 (powers of two) that split `local_tokens` evenly into chunks of CHUNK_TOKENS."""
    lo, hi = CHUNK_TOKENS
    counts, n = [], 2
    while local_tokens / n >= lo:
        if local_tokens % n == 0 and local_tokens / n <= hi:
            counts.append(n)
        n *= 2
    return counts


def enumerate_layouts(shape: ModelShape, world: int, seq_len: int, *, dtype: str = "bfloat16",
                      attention: str = "flash", shardings: tuple[str, ...] = ("ddp", "fsdp", "zero3"),
                      max_pp: int = 8) -> Iterator[Layout]:
    """Every valid layout of `world` ranks: dp × ring × ulysses × tp × pp = world, each memory and offload
    option, micro-batch 1 (long sequences; one row per rank already fills memory). `attention` is the kernel
    of sp = 1 layouts (flash: flash_attention_2; sdpa_masked: transformers' sdpa with packed documents);
    sp > 1 always runs longtune's O(L) kernels. Sequence-chunked layers (CHUNKED_OPTIONS ×
    `sequence_chunk_counts`) are tried where the attention is an O(L) kernel."""
    for tp, pp, ulysses, ring in itertools.product(_divisors(world), repeat=4):
        if tp * pp * ulysses * ring > world or world % (tp * pp * ulysses * ring) or pp > max_pp:
            continue
        dp = world // (tp * pp * ulysses * ring)
        kernel = attention if ulysses * ring == 1 else "flash"
        memory = [dict(mem) for mem in MEMORY_OPTIONS]
        if kernel == "flash":
            memory += [dict(mem, sequence_chunks=n) for mem in CHUNKED_OPTIONS
                       for n in sequence_chunk_counts(seq_len // (ulysses * ring))]
        for sharding, mem, off in itertools.product(shardings, memory, OFFLOAD_OPTIONS):
            if sharding != "ddp" and dp * ulysses * ring == 1 and not off:
                continue  # sharding over one rank is DDP
            # A chunked ring cuts each chunk into contiguous blocks (sharding.py); otherwise zigzag balances it.
            ring_layout = "contiguous" if mem.get("sequence_chunks", 1) > 1 else "zigzag"
            layout = Layout(dp=dp, sp_ulysses=ulysses, sp_ring=ring, tp=tp, pp=pp, sharding=sharding,
                            grad_accum=max(pp, 1) if pp > 1 else 1, dtype=dtype, attention=kernel,
                            sp_layout=ring_layout, **mem, **off)
            if layout_problem(shape, layout, seq_len) is None:
                yield layout


def evaluate(shape: ModelShape, layout: Layout, seq_len: int, hw: Hardware, cal: Calibration,
             host_is_device: bool = False, doc_fill: float = 1.0) -> PlanRow:
    mem = memory_breakdown(shape, layout, seq_len, host_is_device=host_is_device)
    est = step_time(shape, layout, seq_len, cal, gpus_per_node=hw.gpus_per_node, doc_fill=doc_fill)
    return PlanRow(layout, mem, est, fits_device=mem.peak_device <= hw.usable_device_bytes,
                   fits_host=mem.peak_host <= hw.host_bytes_per_rank, fits_disk=mem.peak_disk <= hw.disk_bytes_per_rank)


def plan(shape: ModelShape, seq_len: int, hw: Hardware, cal: Calibration, host_is_device: bool = False,
         doc_fill: float = 1.0, **options) -> list[PlanRow]:
    """Every layout, fitting ones first, each group fastest first (tokens/s; at equal speed fewer sequence
    chunks, then less device memory). `host_is_device`: CPU ranks, whose offloaded memory stays in the same
    RAM; `doc_fill`: Σ dᵢ² / L² of the packed rows (`time_model.document_fill`; 1.0, one document per row,
    unless the data is known)."""
    rows = [evaluate(shape, lay, seq_len, hw, cal, host_is_device, doc_fill)
            for lay in enumerate_layouts(shape, hw.gpus, seq_len, **options)]
    rows.sort(key=lambda r: (not r.fits, -r.time.tokens_per_s, r.layout.sequence_chunks, r.memory.peak_device))
    return rows


def max_length(shape: ModelShape, hw: Hardware, cal: Calibration, *, granularity: int = 1024,
               upper: int = 1 << 27, **options) -> tuple[int, PlanRow | None]:
    """The longest multiple of `granularity` tokens for which some layout fits (binary search: memory
    grows with length for every layout), and that length's best row."""
    def best(length: int) -> PlanRow | None:
        fitting = [r for r in plan(shape, length, hw, cal, **options) if r.fits]
        return fitting[0] if fitting else None

    lo, hi = 0, upper // granularity
    found = None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        row = best(mid * granularity)
        if row is not None:
            lo, found = mid, row
        else:
            hi = mid - 1
    return lo * granularity, found
