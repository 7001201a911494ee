"""Sequence-chunked decoder layers (FPDT's idea): each layer runs on consecutive chunks of the sequence, so
what one layer holds at a time is one chunk's working set, not the whole sequence's.

A `SequenceChunkedLayer` wraps a decoder layer (as torch's `ActivationWrapper`: the original stays its child
`_checkpoint_wrapped_module`, state dicts keep their keys) and runs it through `_ChunkedLayerFunction`:

- forward, without autograd: chunk 0, 1, … in turn through the model's own layer code. The attention of
  chunk i (`chunk_attention`, reached through the sequence-parallel attention function) puts the chunk's
  keys and values in the offload tier and attends over chunks 0 … i, the earlier ones read back from the
  tier one at a time (prefetched one ahead) and merged by log-sum-exp — the ring's block arithmetic, with
  chunks in place of ranks. The function saves only the layer's input (in the checkpoint tier when
  checkpoints are offloaded).
- backward: chunks in reverse order, each recomputed with autograd. Chunk i's attention backward takes the
  gradients of every chunk j ≤ i's keys and values; those of j < i are added to accumulators in the tier,
  and chunk i's own are complete (every later chunk has added its share), so they flow back through its
  k/v projections at once. Each parameter's gradient is summed over the chunks and returned once (DDP's,
  FSDP2's and ZeRO-1/2's hooks fire once per step).

The result is exact: the same attention, split into blocks whose partial results merge by log-sum-exp.
Under Ulysses each rank chunks its local shard, and `sharding.py`'s chunked layout makes local chunk i of
every rank one part of global chunk i, so the all-to-all of local chunk i gathers global chunk i whole.

With a ring of R ranks global chunk i is cut into R contiguous blocks, rank r holding block b = i·R + r (the
blocks are a contiguous layout of chunks·R blocks). Chunk i's forward all-gathers the ring's blocks of chunk i
into the tier, so the queries of block b find every earlier block there, the ring's included. In backward each
rank adds the gradients its queries give every earlier block to that block's accumulator in its own tier; when
chunk i is done (every later block's queries have run, on every rank) one all-to-all sends each rank's
accumulators for the ring's blocks of chunk i to their owners, which sum them. The tier then holds the whole
sequence's keys/values of a layer (this rank's heads) instead of one rank's share. Not with tensor or pipeline
parallelism (the recipe refuses them).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper

from .offload import OffloadTier, make_tier
from .ring_attention import BlockAccumulator, RingPlan, block_gradients


class ChunkStore:
    """One layer call's keys and values per block (a chunk, or a ring rank's part of one), and in backward their
    gradient accumulators, in a tier."""

    def __init__(self, tier: OffloadTier) -> None:
        self.tier = tier
        self.kv: dict[int, Any] = {}
        self.grads: dict[int, Any] = {}

    def put(self, index: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.kv[index] = (self.tier.put(k), self.tier.put(v))

    def prefetch(self, index: int) -> None:
        """Start reading chunk `index`'s keys/values back (the disk tier reads them on its I/O threads)."""
        for handle in self.kv.get(index, ()):
            self.tier.prefetch(handle)

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv[index]
        return self.tier.get(k), self.tier.get(v)

    def add_grads(self, index: int, dk: torch.Tensor, dv: torch.Tensor) -> None:
        previous = self.grads.pop(index, None)
        if previous is not None:
            dk, dv = dk + self.tier.get(previous[0]), dv + self.tier.get(previous[1])
        self.grads[index] = (self.tier.put(dk), self.tier.put(dv))

    def take_grads(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Chunk `index`'s accumulated gradients (None when no later chunk added any); drops the chunk."""
        self.kv.pop(index, None)
        handles = self.grads.pop(index, None)
        return None if handles is None else (self.tier.get(handles[0]), self.tier.get(handles[1]))


@dataclass(frozen=True)
class _ChunkStep:
    """What the attention of the chunk being run needs: which chunk, where the others are, which pass."""

    index: int
    store: ChunkStore
    recompute: bool  # backward's recomputation (autograd on) rather than the forward pass


_STEP: ContextVar[_ChunkStep | None] = ContextVar("longtune_sequence_chunk", default=None)


def _chunk_plan(plan: RingPlan, chunks: int, index: int) -> RingPlan:
    """`plan` (a ring of `plan.world` ranks, one without a ring) with the blocks in the place of ring ranks:
    block `index` · ring + ring rank of `chunks` · ring consecutive blocks."""
    return dataclasses.replace(plan, layout="contiguous", world=chunks * plan.world,
                               rank=index * plan.world + plan.rank, group=None)


def _gather_ring(t: torch.Tensor, ring: RingPlan) -> list[torch.Tensor]:
    """Every ring rank's `t` (its block of the running chunk), in ring order."""
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(ring.world)]
    dist.all_gather(out, t, group=ring.group)
    return out


def _joined(dk: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """dK and dV as one flat tensor (one message; K's and V's head dims may differ)."""
    return torch.cat([dk.flatten(), dv.flatten()])


def _return_ring_grads(partials: list[torch.Tensor], ring: RingPlan) -> torch.Tensor:
    """Sends `partials[s]` (this rank's dK/dV of ring rank s's block) to rank s; returns the sum of what every
    rank sent for this rank's block."""
    sent = torch.stack(partials)
    received = torch.empty_like(sent)
    dist.all_to_all_single(received, sent, group=ring.group)
    return received.sum(0)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan, store: ChunkStore
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out fp32, lse) of block `plan.rank`'s queries over blocks 0 … rank (the earlier ones from `store`)."""
    acc = BlockAccumulator(q, v.shape[-1])
    for j in range(plan.rank):
        if j + 1 < plan.rank:
            store.prefetch(j + 1)
        k_j, v_j = store.get(j)
        acc.add(plan, plan.rank, j, k_j, v_j)
        del k_j, v_j
    acc.add(plan, plan.rank, plan.rank, k, v)
    return acc.out, acc.lse


class _ChunkAttention(torch.autograd.Function):
    """Chunk i's attention in backward's recomputation: its backward sends the gradients of the earlier
    blocks' keys/values to their accumulators and returns this rank's block's own, complete."""

    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan, store: ChunkStore, ring: RingPlan):
        out, lse = _attend(q, k, v, plan, store)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.store, ctx.ring = plan, store, ring
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, store, ring = ctx.plan, ctx.store, ctx.ring
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        for j in range(plan.rank):
            if j + 1 < plan.rank:
                store.prefetch(j + 1)
            k_j, v_j = store.get(j)
            dk_j, dv_j = block_gradients(dout, q, k_j, v_j, out, lse, plan, plan.rank, j, dq)
            store.add_grads(j, dk_j, dv_j)
            del k_j, v_j, dk_j, dv_j
        dk, dv = block_gradients(dout, q, k, v, out, lse, plan, plan.rank, plan.rank, dq)
        if ring.world == 1:
            later = store.take_grads(plan.rank)
            if later is not None:
                dk, dv = dk + later[0], dv + later[1]
        else:  # every rank's share for the ring's blocks of this chunk goes to the block's owner
            first, partials = plan.rank - ring.rank, []
            for s in range(ring.world):
                got = store.take_grads(first + s)
                part = _joined(dk, dv) if s == ring.rank else dk.new_zeros(dk.numel() + dv.numel())
                partials.append(part if got is None else part + _joined(*got))
            summed = _return_ring_grads(partials, ring)
            dk, dv = summed[:dk.numel()].view_as(dk), summed[dk.numel():].view_as(dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: int, plan: RingPlan) -> torch.Tensor:
    """Attention of the running chunk's q `[B, Hq, C, D]` (k/v `[B, Hkv, C, D]`: the chunk's own) over every
    chunk so far; called by the sequence-parallel attention function inside a `SequenceChunkedLayer`."""
    step = _STEP.get()
    if step is None:
        raise RuntimeError("memory.sequence_chunks: attention ran outside a SequenceChunkedLayer (the model's "
                           "decoder layers must be wrapped by apply_sequence_chunks)")
    chunk_plan = _chunk_plan(plan, chunks, step.index)
    if step.recompute:
        return _ChunkAttention.apply(q, k, v, chunk_plan, step.store, plan)
    if plan.world == 1:
        step.store.put(step.index, k, v)
    else:  # the ring's blocks of this chunk, this rank's among them: later blocks on every rank read them
        first = chunk_plan.rank - plan.rank
        for s, (k_s, v_s) in enumerate(zip(_gather_ring(k, plan), _gather_ring(v, plan), strict=True)):
            step.store.put(first + s, k_s, v_s)
    out, _ = _attend(q, k, v, chunk_plan, step.store)
    return out.to(q.dtype)


@contextlib.contextmanager
def _running(step: _ChunkStep) -> Iterator[None]:
    token = _STEP.set(step)
    try:
        yield
    finally:
        _STEP.reset(token)


def _chunk_kwargs(kwargs: dict, start: int, length: int) -> dict:
    """The decoder layer's keyword arguments for one chunk: per-position tensors cut to it."""
    out = dict(kwargs)
    if kwargs.get("attention_mask") is not None:
        raise ValueError("memory.sequence_chunks: the model built an attention mask; chunked layers take the "
                         "document bounds from the sequence-parallel context instead")
    if kwargs.get("position_ids") is not None:
        out["position_ids"] = kwargs["position_ids"].narrow(1, start, length)
    if kwargs.get("position_embeddings") is not None:
        out["position_embeddings"] = tuple(t.narrow(1, start, length) for t in kwargs["position_embeddings"])
    return out


@dataclass
class _LayerCall:
    """One call of a chunked layer: the layer, its keyword arguments and where its tensors wait."""

    layer: nn.Module
    kwargs: dict
    chunks: int
    kv_tier: OffloadTier
    input_tier: OffloadTier | None

    def bounds(self, length: int) -> list[tuple[int, int]]:
        size = length // self.chunks
        return [(i * size, size) for i in range(self.chunks)]

    def run(self, index: int, start: int, length: int, x: torch.Tensor, store: ChunkStore, recompute: bool
            ) -> torch.Tensor:
        with _running(_ChunkStep(index, store, recompute)):
            out = self.layer(x, **_chunk_kwargs(self.kwargs, start, length))
        return out[0] if isinstance(out, tuple) else out


def _autocast_state(device_type: str) -> list[tuple[str, bool, torch.dtype]]:
    return [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in {device_type, "cpu"}]


class _ChunkedLayerFunction(torch.autograd.Function):
    """The decoder layer over its chunks: forward without autograd, backward recomputes chunk by chunk in
    reverse order and returns the input gradient and each parameter's gradient summed over the chunks."""

    @staticmethod
    def forward(ctx, call: _LayerCall, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if length % call.chunks:
            raise ValueError(f"memory.sequence_chunks {call.chunks} does not divide this rank's {length} tokens")
        ctx.call, ctx.num_params = call, len(params)
        ctx.autocast = _autocast_state(x.device.type)
        store = ChunkStore(call.kv_tier)
        out = torch.empty_like(x)
        for i, (start, size) in enumerate(call.bounds(length)):
            out.narrow(1, start, size).copy_(call.run(i, start, size, x.narrow(1, start, size), store, False))
        ctx.store = store
        if call.input_tier is not None:  # chunk by chunk, so that backward brings back one chunk at a time
            ctx.input_handles = [call.input_tier.put(x.narrow(1, start, size)) for start, size in call.bounds(length)]
            ctx.input_shape = x.shape
        else:
            ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        call, store = ctx.call, ctx.store
        offloaded = call.input_tier is not None
        x = None if offloaded else ctx.saved_tensors[0]
        shape = ctx.input_shape if offloaded else x.shape
        # The module's parameters now (FSDP2's unsharded ones included), as the tiled MLP does.
        params = list(call.layer.parameters())
        if len(params) != ctx.num_params:
            raise RuntimeError(f"chunked layer: {ctx.num_params} parameters in forward, {len(params)} in backward")
        wants_x, wants = ctx.needs_input_grad[1], ctx.needs_input_grad[2:]
        targets = [i for i, w in enumerate(wants) if w]
        # Chunk i's input gradient replaces chunk i's output gradient, which nothing reads after chunk i: one
        # `[B, L, H]` fewer than a separate tensor (a fresh one when the incoming gradient is not ours to reuse).
        reuse = grad_out.is_contiguous() and grad_out._base is None and not grad_out.requires_grad
        grad_x = grad_out if reuse else grad_out.new_empty(shape)
        grads: list[torch.Tensor | None] = [None] * len(params)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            for kind, enabled, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            for i, (start, size) in reversed(list(enumerate(call.bounds(shape[1])))):
                if offloaded:
                    if i > 0:
                        call.input_tier.prefetch(ctx.input_handles[i - 1])
                    part = call.input_tier.get(ctx.input_handles.pop()).requires_grad_()
                else:
                    part = x.narrow(1, start, size).detach().requires_grad_()
                out = call.run(i, start, size, part, store, True)
                got = torch.autograd.grad(out, [part] + [params[t] for t in targets], grad_out.narrow(1, start, size),
                                          allow_unused=True)
                grad_x.narrow(1, start, size).copy_(got[0])
                for t, g in zip(targets, got[1:], strict=True):
                    if g is not None:
                        grads[t] = g if grads[t] is None else grads[t].add_(g)
                del out, got, part
        ctx.store = None
        return None, grad_x if wants_x else None, *grads


class SequenceChunkedLayer(ActivationWrapper):
    """A decoder layer run on `chunks` consecutive chunks of the sequence (`_ChunkedLayerFunction`)."""

    def __init__(self, layer: nn.Module, chunks: int, kv_tier: OffloadTier, input_tier: OffloadTier | None) -> None:
        super().__init__(layer)
        self.chunks, self.kv_tier, self.input_tier = chunks, kv_tier, input_tier

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise TypeError("SequenceChunkedLayer takes the decoder layer's arguments by keyword")
        layer = self._checkpoint_wrapped_module
        call = _LayerCall(layer, kwargs, self.chunks, self.kv_tier, self.input_tier)
        return _ChunkedLayerFunction.apply(call, hidden_states, *layer.parameters())

    def extra_repr(self) -> str:
        return f"chunks={self.chunks}"


def apply_sequence_chunks(layers: nn.Module, chunks: int, tier_dir: str | None, offload_inputs: bool) -> int:
    """Wrap every decoder layer in a `SequenceChunkedLayer` of `chunks` chunks (1: off); returns how many.

    Keys/values go to a tier under `tier_dir` (None: host memory); with `offload_inputs` each layer's saved
    input goes to a tier as well (the checkpoint offload of a recomputed layer)."""
    if chunks <= 1:
        return 0
    kv_tier = make_tier(tier_dir, prefix="kv-")
    input_tier = make_tier(tier_dir, prefix="checkpoints-") if offload_inputs else None
    wrapped = 0
    for index, layer in list(layers.named_children()):
        if not isinstance(layer, SequenceChunkedLayer):
            setattr(layers, index, SequenceChunkedLayer(layer, chunks, kv_tier, input_tier))
            wrapped += 1
    return wrapped
