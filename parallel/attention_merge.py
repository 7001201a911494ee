"""Merging partial attention results by their log-sum-exps.

Attention of a query over keys split into blocks A and B is
`out = (e^lse_A · out_A + e^lse_B · out_B) / (e^lse_A + e^lse_B)` and `lse = log(e^lse_A + e^lse_B)`.
Written with the new lse subtracted first so nothing overflows. Callers merge only rows that the
block covers, so a row is never merged from two empty (−inf) results.
"""

from __future__ import annotations

import torch


def merge_partial_attention(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
                            block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge `(block_out, block_lse)` into `(out, lse)`.

    out, block_out: `[..., S, D]`; lse, block_lse: `[..., S]` (fp32). `lse = -inf` marks rows with
    nothing accumulated yet. Returns new tensors (fp32 out).
    """
    new_lse = torch.logaddexp(lse, block_lse)
    keep = torch.exp(lse - new_lse).unsqueeze(-1)
    take = torch.exp(block_lse - new_lse).unsqueeze(-1)
    return keep * out + take * block_out.to(out.dtype), new_lse
