"""Exact causal ring attention (contiguous or zigzag layout) with document masking.

Each rank holds the queries, keys and values of its chunks (`sharding.layout_chunks`). K/V travel
around the ring by point-to-point sends; the next block's transfer is posted before the current
block is computed, so communication overlaps compute. For every (query chunk, key chunk) pair the
work is split by document: a key chunk after the query chunk is skipped, the same chunk is causal,
an earlier chunk is full attention — within each document only, so nothing crosses a boundary and
no `L × L` mask is ever built. Neighbouring full pieces are joined into one kernel call
(`RingPlan.calls`), and partial results are merged by log-sum-exp.

The backward pass is a custom autograd function: it rotates K/V again, calls the kernel's backward
per block with the *final* output and LSE (exact), and sends the dK/dV accumulators along with K/V so
they arrive back at their owner after one extra hop. With a ring of one rank the same code is local
document-masked attention (used after Ulysses' all-to-all); with one row holding one document that is a
single kernel call whose own output and gradients are returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .attention_merge import merge_partial_attention
from .kernels import BlockKernel
from .sharding import Chunk, layout_chunks


@dataclass(frozen=True)
class Piece:
    """One kernel call: local query rows × local key rows of a key block."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    causal: bool


@dataclass(frozen=True)
class RingPlan:
    """Everything the ring needs besides the tensors."""

    layout: str
    world: int
    rank: int
    seq_len: int  # global (padded) length seen by the ring
    doc_bounds: tuple[tuple[tuple[int, int], ...], ...]  # per batch row, global [start, end)
    scale: float
    kernel: BlockKernel
    group: dist.ProcessGroup | None = None

    def chunks(self, rank: int) -> list[Chunk]:
        return layout_chunks(self.layout, self.world, rank, self.seq_len)

    def pieces(self, q_rank: int, k_rank: int, row: int) -> list[Piece]:
        """Kernel calls for the queries of `q_rank` against the keys of `k_rank` in batch row `row`."""
        out = []
        docs = self.doc_bounds[row]
        for qc in self.chunks(q_rank):
            for kc in self.chunks(k_rank):
                if kc.start > qc.start:
                    continue  # keys after the queries: fully masked, skipped rather than merged
                diagonal = kc.start == qc.start
                for d_start, d_end in docs:
                    q0, q1 = max(qc.start, d_start), min(qc.start + qc.length, d_end)
                    k0, k1 = max(kc.start, d_start), min(kc.start + kc.length, d_end)
                    if q0 >= q1 or k0 >= k1:
                        continue
                    out.append(Piece(q0 - qc.start + qc.offset, q1 - qc.start + qc.offset,
                                     k0 - kc.start + kc.offset, k1 - kc.start + kc.offset, diagonal))
        return out

    def calls(self, q_rank: int, k_rank: int, row: int) -> list[Piece]:
        """`pieces()` with neighbouring full (non-causal) pieces joined: one kernel call per block of keys.

        Two full pieces over the same query rows whose key rows are adjacent are one call over both key
        ranges; then two over the same key rows with adjacent query rows. Both stay within one document
        (a piece's rows are one document's part of a chunk). In the zigzag layout this halves the calls
        (and forward merges) of every off-diagonal step: a rank's two chunks see a peer's chunks as one
        block.
        """
        pieces = self.pieces(q_rank, k_rank, row)
        pieces = _join(sorted(pieces, key=lambda p: (p.q_start, p.q_end, p.k_start)), by_keys=True)
        return _join(sorted(pieces, key=lambda p: (p.k_start, p.k_end, p.q_start)), by_keys=False)


def _join(pieces: list[Piece], by_keys: bool) -> list[Piece]:
    """Join consecutive full pieces that share their query rows (`by_keys`) or key rows and are adjacent."""
    out: list[Piece] = []
    for p in pieces:
        prev = out[-1] if out else None
        if prev is not None and not prev.causal and not p.causal:
            if by_keys and (prev.q_start, prev.q_end) == (p.q_start, p.q_end) and prev.k_end == p.k_start:
                out[-1] = Piece(p.q_start, p.q_end, prev.k_start, p.k_end, False)
                continue
            if not by_keys and (prev.k_start, prev.k_end) == (p.k_start, p.k_end) and prev.q_end == p.q_start:
                out[-1] = Piece(prev.q_start, p.q_end, p.k_start, p.k_end, False)
                continue
        out.append(p)
    return out


def _peer(plan: RingPlan, step: int) -> int:
    """Global rank of the ring neighbour `step` places ahead."""
    local = (plan.rank + step) % plan.world
    return dist.get_global_rank(plan.group, local) if plan.group is not None else local


def _rotate(tensors: list[torch.Tensor], plan: RingPlan) -> tuple[list, list[torch.Tensor]]:
    """Post sends of `tensors` to the next rank and receives from the previous one.

    Returns (requests, received); the requests keep the sent buffers referenced until `_wait`.
    """
    sent = [t.contiguous() for t in tensors]
    received = [torch.empty_like(t) for t in sent]
    ops = [dist.P2POp(dist.isend, t, _peer(plan, 1), plan.group) for t in sent]
    ops += [dist.P2POp(dist.irecv, t, _peer(plan, -1), plan.group) for t in received]
    return [dist.batch_isend_irecv(ops), sent], received


def _wait(requests: list) -> None:
    for req in requests[0]:
        req.wait()


def _single_block(plan: RingPlan, batch: int, length: int) -> bool:
    """True when the whole attention is one causal kernel call: no ring, one row, one document.

    The common case after Ulysses' all-to-all with unpacked rows; the kernel's own output and
    gradients are then the result, without the accumulators the general path fills.
    """
    return plan.world == 1 and batch == 1 and plan.pieces(0, 0, 0) == [Piece(0, length, 0, length, True)]


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out `[B, H, L, D]`, lse fp32 `[B, H, L]`) of this rank's queries over the whole sequence.

    `out` is fp32, or q's dtype when the attention is a single kernel call.
    """
    if _single_block(plan, q.shape[0], q.shape[2]):
        return plan.kernel.forward(q, k, v, True, plan.scale)
    acc = BlockAccumulator(q, v.shape[-1])
    kv = [k, v]
    for step in range(plan.world):
        src = (plan.rank - step) % plan.world
        pending = None
        if step < plan.world - 1:
            pending = _rotate(kv, plan)
        acc.add(plan, plan.rank, src, kv[0], kv[1])
        if pending is not None:
            _wait(pending[0])
            kv = pending[1]
    return acc.out, acc.lse


class BlockAccumulator:
    """The attention of one query block `q` `[B, H, S, D]` over key blocks added one at a time: `out` (fp32)
    and `lse` merged by log-sum-exp. Used by the ring (a peer's block per step) and by sequence-chunked layers
    (an earlier chunk's block per step)."""

    def __init__(self, q: torch.Tensor, value_dim: int) -> None:
        b, h, length, _ = q.shape
        self.q = q
        self.out = torch.zeros(b, h, length, value_dim, dtype=torch.float32, device=q.device)
        self.lse = torch.full((b, h, length), float("-inf"), dtype=torch.float32, device=q.device)
        # Query row ranges that already hold a partial result, per batch row. A block whose rows overlap
        # none of them is copied; otherwise it is merged, which is exact for rows not yet seen too (their
        # out is 0 and lse -inf, and every row of a block has at least one key).
        self.covered: list[list[tuple[int, int]]] = [[] for _ in range(b)]

    def add(self, plan: RingPlan, q_rank: int, k_rank: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Merge in the keys/values `k`, `v` of block `k_rank` (the queries being block `q_rank`)."""
        q, out, lse = self.q, self.out, self.lse
        for row in range(q.shape[0]):
            for p in plan.calls(q_rank, k_rank, row):
                r, rows = slice(row, row + 1), slice(p.q_start, p.q_end)
                block_out, block_lse = plan.kernel.forward(
                    q[r, :, rows], k[r, :, p.k_start:p.k_end], v[r, :, p.k_start:p.k_end], p.causal, plan.scale)
                if any(s < p.q_end and p.q_start < e for s, e in self.covered[row]):
                    out[r, :, rows], lse[r, :, rows] = merge_partial_attention(
                        out[r, :, rows], lse[r, :, rows], block_out, block_lse)
                else:
                    out[r, :, rows] = block_out
                    lse[r, :, rows] = block_lse
                self.covered[row].append((p.q_start, p.q_end))


def block_gradients(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, plan: RingPlan, q_rank: int, k_rank: int, dq: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of block `k_rank`'s keys/values `k`, `v` (fp32) from the queries of block `q_rank`, given
    the whole attention's final `out` and `lse`; adds the queries' share to `dq` (fp32) in place."""
    dk = torch.zeros_like(k, dtype=torch.float32)
    dv = torch.zeros_like(v, dtype=torch.float32)
    for row in range(q.shape[0]):
        for p in plan.calls(q_rank, k_rank, row):
            rows, keys = slice(p.q_start, p.q_end), slice(p.k_start, p.k_end)
            r = slice(row, row + 1)
            g_q, g_k, g_v = plan.kernel.backward(dout[r, :, rows], q[r, :, rows], k[r, :, keys], v[r, :, keys],
                                                 out[r, :, rows], lse[r, :, rows], p.causal, plan.scale)
            dq[r, :, rows] += g_q
            dk[r, :, keys] += g_k
            dv[r, :, keys] += g_v
    return dk, dv


def ring_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, plan: RingPlan
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _single_block(plan, q.shape[0], q.shape[2]):
        return plan.kernel.backward(dout, q, k, v, out, lse, True, plan.scale)
    dq = torch.zeros_like(q, dtype=torch.float32)
    kv = [k, v]
    carried: tuple[list, list[torch.Tensor]] | None = None  # dK/dV travelling with their K/V
    for step in range(plan.world):
        src = (plan.rank - step) % plan.world
        pending = _rotate(kv, plan) if step < plan.world - 1 else None
        dk, dv = block_gradients(dout, q, kv[0], kv[1], out, lse, plan, plan.rank, src, dq)
        if carried is not None:
            _wait(carried[0])
            dk += carried[1][0]
            dv += carried[1][1]
        if plan.world > 1:
            # Pass the accumulators on with the K/V they belong to; after the last step this hop
            # delivers them to their owner.
            carried = _rotate([dk, dv], plan)
        else:
            carried = None
        if pending is not None:
            _wait(pending[0])
            kv = pending[1]
    if carried is not None:
        _wait(carried[0])
        dk, dv = carried[1]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttention(torch.autograd.Function):
    """`out = RingAttention.apply(q, k, v, plan)`; q `[B, Hq, L, D]`, k/v `[B, Hkv, L, D]`."""

    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan):
        out, lse = ring_forward(q, k, v, plan)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.plan)
        return dq, dk, dv, None
