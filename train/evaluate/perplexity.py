"""Perplexity against evaluation length under a named protocol.

- `single_window` ("truncated" in YaRN): each document cut to the evaluation length W, one forward
  pass, every predicted token scored.
- `sliding` (Press et al.; PI §3.2): over one text of N tokens, windows of W tokens start every
  `stride` tokens (capped at W/2); each window scores only the tokens the previous window did not.

Both report the token-weighted mean NLL (exp of the sum of token NLLs / number of scored tokens);
YaRN's script instead averages per-window means, which weights short last windows more.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from longtune.parallel.sharding import IGNORE_INDEX

from .common import LoadedModel, text_tokens

PROTOCOLS = ("single_window", "sliding")


NLL_CHUNK_LOGITS = 1 << 26
"""Logits that exist at once while a window is scored (256 MiB in fp32): the lm_head and the log-softmax run
over chunks of positions, so a long window never holds its whole [length, vocab] logits."""


@torch.no_grad()
def chunked_token_nll(model, labels: torch.Tensor, **inputs) -> torch.Tensor:
    """NLL (float64) of `labels` [n] (0 where IGNORE_INDEX) at the first n positions of a batch-1 forward of
    `inputs`: the decoder's hidden states through the lm_head in chunks of positions (the logits of the model's
    own forward, one chunk at a time)."""
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state[0, :labels.shape[0]]
    head = model.get_output_embeddings()
    step = max(1, NLL_CHUNK_LOGITS // head.weight.shape[0])
    return torch.cat([F.cross_entropy(head(hidden[i:i + step]).float(), labels[i:i + step],
                                      ignore_index=IGNORE_INDEX, reduction="none").double()
                      for i in range(0, labels.shape[0], step)])


def token_nll(model, ids: list[int], device) -> torch.Tensor:
    """NLL of ids[1:] given their prefix inside this window, float64 on CPU (len(ids) − 1 values)."""
    x = torch.tensor([ids], device=device)
    return chunked_token_nll(model, x[0, 1:], input_ids=x).cpu()


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) per window; every token from index 1 on is scored exactly once."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        first = max(prev_end, begin + 1)  # the window's first token has no context inside it
        if end > first:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


def effective_stride(stride: int, window: int) -> int:
    """The stride, capped at half the window: with stride ≥ window the first token of every window would
    be left unscored (it has no context inside its window)."""
    return max(1, min(stride, window // 2))


WindowScore = Callable[[list[int], int], tuple[float, int]]
"""`score(ids, first)`: (sum of NLL, count) of the tokens `ids[first:]` (first ≥ 1), each given the tokens
of the window before it."""


def local_window_score(model, device) -> WindowScore:
    """Scores a window with one forward pass on this process (`token_nll`)."""
    def score(ids: list[int], first: int) -> tuple[float, int]:
        nll = token_nll(model, ids, device)[first - 1:]  # nll[j] is the loss of token 1 + j
        return float(nll.sum()), nll.numel()
    return score


def sliding_nll(score: WindowScore, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """(sum of NLL, scored tokens) of the sliding-window protocol over `ids`."""
    total, count = 0.0, 0
    for begin, end, first in sliding_windows(len(ids), window, stride):
        s, c = score(ids[begin:end], first - begin)
        total, count = total + s, count + c
    return total, count


def perplexity_texts(tokenizer, documents: list[str], n_docs: int, n_tokens: int) -> list[list[int]]:
    """The `n_docs` token streams of `n_tokens` each that the protocols score (document i, i + n_docs, …)."""
    return [text_tokens(tokenizer, documents[i::n_docs], n_tokens) for i in range(n_docs)]


def run_perplexity(lm: LoadedModel, lengths: list[int], protocols: list[str], documents: list[str],
                   n_docs: int, stride: int, progress: Callable[[], None] | None = None,
                   score: WindowScore | None = None) -> dict:
    """Every (protocol, length) point; `score` defaults to one forward pass per window on this process."""
    score = score or local_window_score(lm.model, lm.device)
    results = []
    longest = max(lengths)
    streams = perplexity_texts(lm.tokenizer, documents, n_docs, longest)
    for protocol in protocols:
        for length in lengths:
            total, count = 0.0, 0
            for ids in streams:
                if protocol == "single_window":
                    s, c = score(ids[:length], 1)
                else:
                    s, c = sliding_nll(score, ids, length, effective_stride(stride, length))
                total, count = total + s, count + c
                if progress:
                    progress()
            mean = total / count
            point = {"protocol": protocol, "length": length, "nll": mean, "ppl": math.exp(mean),
                     "tokens_scored": count}
            if protocol == "sliding":
                point["stride"] = effective_stride(stride, length)
            results.append(point)
    return {"protocols": {
                "single_window": "each text cut to the evaluation length, one forward pass, all tokens scored",
                "sliding": f"windows of the evaluation length every {stride} tokens (at most half a window) "
                           f"over {longest}-token texts, each token scored once",
            }, "aggregation": "token-weighted mean NLL over all texts", "texts": n_docs,
            "text_tokens": longest, "stride": stride, "points": results}
