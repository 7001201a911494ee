"""The perplexity eval scores a window through the lm_head in chunks of positions (no [length, vocab] fp32
logits): the perplexities equal those of the whole window's logits at once."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def tiny_lm():
    from longtune.train.evaluate.common import load_model

    return lambda path: load_model(path, device="cpu")


def _whole_logits_nll(model, ids: list[int]) -> torch.Tensor:
    """What the eval computed before chunking: the full window's fp32 logits, then the NLL."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x, use_cache=False).logits[0, :-1].float()
    return F.cross_entropy(logits, x[0, 1:], reduction="none").double()


def test_chunked_perplexity_equals_whole_logits(tiny_model_dir, tiny_lm, monkeypatch):
    from longtune.train.evaluate import perplexity
    from longtune.train.evaluate.common import long_text_documents

    lm = tiny_lm(tiny_model_dir)
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(perplexity, "NLL_CHUNK_LOGITS", 37 * vocab)  # chunks of 37 positions: several, uneven
    lengths = [64, 200, 256]
    documents = long_text_documents()
    chunked = perplexity.run_perplexity(lm, lengths, ["single_window", "sliding"], documents, n_docs=2, stride=64)

    def whole(ids: list[int], first: int) -> tuple[float, int]:
        nll = _whole_logits_nll(lm.model, ids)[first - 1:]
        return float(nll.sum()), nll.numel()

    before = perplexity.run_perplexity(lm, lengths, ["single_window", "sliding"], documents, n_docs=2, stride=64,
                                       score=whole)
    for got, want in zip(chunked["points"], before["points"], strict=True):
        assert (got["protocol"], got["length"], got["tokens_scored"]) == \
               (want["protocol"], want["length"], want["tokens_scored"])
        assert math.isclose(got["ppl"], want["ppl"], rel_tol=1e-6), (got, want)


def test_chunks_cover_every_position_once(tiny_model_dir, tiny_lm, monkeypatch):
    from longtune.train.evaluate import perplexity

    lm = tiny_lm(tiny_model_dir)
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(perplexity, "NLL_CHUNK_LOGITS", 5 * vocab)
    ids = list(range(3, 50))
    torch.testing.assert_close(perplexity.token_nll(lm.model, ids, "cpu"), _whole_logits_nll(lm.model, ids),
                               rtol=1e-6, atol=1e-9)
