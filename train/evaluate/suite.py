"""The evaluation suite of one model dir: passkey, needle and perplexity at the chosen lengths (what `longtune
eval` and `longtune demo` run), returned as one results dict (`report.write_report` writes it)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm

from .common import load_model, long_text_documents
from .sequence_parallel import join_sequence_parallel


def default_lengths(max_positions: int) -> list[int]:
    """M/4, M/2, M, 2M (at least 128 tokens each) for M = max_position_embeddings."""
    m = max_positions
    return sorted({n for n in (m // 4, m // 2, m, 2 * m) if n >= 128})


def evaluate(model_dir: Path, lengths: list[int] | None, depths: list[float], tasks: list[str],
             protocols: list[str], trials: int, ppl_texts: int, stride: int, texts: list[str] | None,
             seed: int, device: str, dtype: str, progress: bool, sp: int = 1, sp_impl: str = "zigzag",
             passkey_keys: str = "number") -> dict:
    """The results of `tasks`; with `sp` > 1 (perplexity only) on each of the `sp` launched processes."""
    from longtune.parallel.sp_attention import ATTN_IMPLEMENTATION

    from .needle import run_needle
    from .passkey import build_prompt, run_passkey
    from .perplexity import run_perplexity

    sp_eval = join_sequence_parallel(sp_impl, sp, device) if sp > 1 else None
    lm = load_model(model_dir, sp_eval.device if sp_eval else device, dtype,
                    attn_implementation=ATTN_IMPLEMENTATION if sp_eval else None)
    if sp_eval:
        from longtune.parallel.sp_rope import apply_length_aware_rope

        apply_length_aware_rope(lm.model, sp_eval.groups)
    lengths = lengths or default_lengths(lm.max_position_embeddings)
    documents = texts if texts is not None else long_text_documents()
    if "passkey" in tasks:  # fail before any work if the smallest length cannot hold the prompt
        build_prompt(lm.tokenizer, min(lengths), 0.0, 50000)
    n_ppl = ppl_texts * len(lengths) * len(protocols) if "ppl" in tasks else 0
    total = (trials * len(lengths) * len(depths) if "passkey" in tasks else 0) + \
        (len(lengths) * len(depths) if "needle" in tasks else 0) + n_ppl
    bar = tqdm(total=total, desc="longtune eval", unit="step", disable=not progress, file=sys.stderr)
    results: dict = {
        "model": {"dir": str(model_dir), "max_position_embeddings": lm.max_position_embeddings,
                  "original_length": lm.original_length, "rope_parameters": lm.rope_parameters},
        "lengths": lengths, "depths": depths, "seed": seed,
        "text_source": "user files" if texts is not None else
        "held-out embedded documents (in no shipped training corpus)",
    }
    started = time.perf_counter()
    try:
        if "passkey" in tasks:
            bar.set_postfix_str("passkey")
            results["passkey"] = run_passkey(lm, lengths, depths, trials, seed, progress=bar.update,
                                             key_form=passkey_keys)
        if "needle" in tasks:
            bar.set_postfix_str("needle")
            results["needle"] = run_needle(lm, lengths, depths, documents, progress=bar.update)
        if "ppl" in tasks:
            bar.set_postfix_str("perplexity")
            ppl = run_perplexity(lm, lengths, protocols, documents, ppl_texts, stride, progress=bar.update,
                                 score=sp_eval.window_score(lm) if sp_eval else None)
            if sp_eval:
                ppl["protocols"] = {k: f"{v}; {sp_eval.note}" for k, v in ppl["protocols"].items()}
            results["perplexity"] = ppl
    finally:
        bar.close()
    results["seconds"] = round(time.perf_counter() - started, 2)
    return results
