"""Perplexity under sequence parallelism (`longtune eval --sp N`): every rank holds 1/N of each window,
attention goes through the `longtune_sp` ring / Ulysses attention, and the token NLL is summed over ranks.

The window is padded to the layout's multiple with ignored labels (as in training), so any length runs;
no rank builds an L×L mask or holds the logits of more than its own L/N tokens (and those in chunks of positions:
`perplexity.chunked_token_nll`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longtune.parallel.dims import (
    ParallelDims,
    all_reduce_sum,
    build_mesh,
    device_for,
    init_process_group,
    launched_world,
)
from longtune.parallel.layout_rules import attention_heads, kv_heads_problem
from longtune.parallel.sharding import IGNORE_INDEX

from .common import LoadedModel
from .perplexity import WindowScore, chunked_token_nll

SP_IMPLS = ("ulysses", "ring", "zigzag")
"""`--sp-impl`: Ulysses all-to-all over heads, or ring attention with contiguous (`ring`) or causal-balanced
(`zigzag`) chunks — the `parallel.sp` choices of a recipe."""


def sp_degrees(impl: str, degree: int) -> tuple[int, int, str]:
    """(ring, ulysses, sharding layout) of `--sp DEGREE --sp-impl IMPL`."""
    if impl == "ulysses":
        return 1, degree, "contiguous"
    return degree, 1, "contiguous" if impl == "ring" else "zigzag"


def sp_problem(config, impl: str, degree: int) -> str | None:
    """Why `config`'s model cannot run `--sp DEGREE --sp-impl IMPL`, or None."""
    _, ulysses, _ = sp_degrees(impl, degree)
    problem = kv_heads_problem(*attention_heads(config), ulysses)
    if problem:
        return f"--sp {degree} --sp-impl ulysses: {problem} (--sp-impl zigzag or ring split the sequence, " \
               "not the heads)"
    return None


@dataclass(frozen=True)
class SequenceParallelEval:
    """This rank's place in the `--sp` group: degrees, layout, process groups and device."""

    impl: str
    dims: ParallelDims
    layout: str
    rank: int
    groups: dict
    device: str

    @property
    def note(self) -> str:
        return (f"sequence parallel: sp={self.dims.sp} ({self.impl}), each of {self.dims.sp} processes held "
                f"1/{self.dims.sp} of every window, token NLL summed across them")

    def window_score(self, lm: LoadedModel) -> WindowScore:
        """`perplexity.WindowScore` of `lm` (loaded with `ATTN_IMPLEMENTATION`) on this rank's shard."""
        # Imported here: it registers the attention with transformers, which `longtune eval` without --sp
        # does not need to import up front.
        from longtune.parallel.sp_input import shard_micro_batch

        def score(ids: list[int], first: int) -> tuple[float, int]:
            x = torch.tensor([ids])
            labels = torch.full_like(x, IGNORE_INDEX)
            labels[0, first - 1:-1] = x[0, first:]  # shifted on the full window, then sharded
            shard = shard_micro_batch(x, labels, torch.arange(len(ids))[None], torch.ones_like(x, dtype=torch.bool),
                                      dims=self.dims, rank=self.rank, layout=self.layout,
                                      pad_id=lm.tokenizer.pad_token_id or 0, groups=self.groups)
            local = shard.labels[0].to(lm.device)
            nll = chunked_token_nll(lm.model, local, input_ids=shard.input_ids.to(lm.device),
                                    position_ids=shard.position_ids.to(lm.device), sp_context=shard.context)
            total, count = all_reduce_sum([float(nll.sum()), float((local != IGNORE_INDEX).sum())],
                                          torch.device(lm.device))
            return total, int(count)
        return score


def join_sequence_parallel(impl: str, degree: int, device: str) -> SequenceParallelEval:
    """Join the process group of the `degree` launched processes and build the sp groups."""
    rank, local_rank, world = launched_world()
    if device in ("auto", "cuda") and torch.cuda.is_available():
        device = str(device_for(local_rank))
    elif device == "auto":
        device = "cpu"
    init_process_group()
    ring, ulysses, layout = sp_degrees(impl, degree)
    dims = ParallelDims(world, sp_ring=ring, sp_ulysses=ulysses)
    mesh = build_mesh(dims, torch.device(device).type)
    groups = {"sp_ring": mesh.get_group("sp_ring"), "sp_ulysses": mesh.get_group("sp_ulysses")}
    return SequenceParallelEval(impl, dims, layout, rank, groups, device)

