"""`longtune longrope-search MODEL_DIR --target-length N --out DIR`: search LongRoPE rescale factors
(`longrope.search`) with perplexity at the target length as fitness, and write the extended model dir with
the best factors as a transformers `longrope` config, plus `longrope_search.json` (the search's record)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from pathlib import Path

import torch

from longtune.data_prep.user_error import UserError

from ..longrope import Candidate, ScaledRotary, perplexity, search
from . import command_main, error_raising_parser

log = logging.getLogger(__name__)


class SearchError(UserError, ValueError):
    """Bad search arguments or a model the search cannot start from."""


def build_parser() -> argparse.ArgumentParser:
    p = error_raising_parser(SearchError, prog="longtune longrope-search",
                description="Search LongRoPE rescale factors and write an extended model dir.")
    p.add_argument("model_dir")
    p.add_argument("--target-length", type=int, required=True, help="context length to extend to (tokens)")
    p.add_argument("--out", required=True, help="new model dir (must not exist)")
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--texts", type=int, default=2, help="long texts the fitness averages over")
    p.add_argument("--text", nargs="+", help="text files (default: the embedded documents)")
    p.add_argument("--keep-first", default="0",
                   help="n̂ choices, e.g. 0,4,16 (transformers cannot apply n̂ > 0: such a result is "
                        "reported, and the export uses the best n̂ = 0 candidate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    return p


def run_search(args) -> dict:
    from transformers import AutoModelForCausalLM

    from ..evaluate.common import load_model, long_text_documents, text_tokens
    from ..extension import extend_model_dir

    model_dir, out = Path(args.model_dir), Path(args.out)
    if not (model_dir / "config.json").is_file():
        raise SearchError(f"model dir {str(model_dir)!r} does not exist or has no config.json")
    if out.exists():
        raise SearchError(f"output dir {str(out)!r} already exists")
    try:
        keep_options = tuple(sorted({int(v) for v in args.keep_first.split(",")}))
    except ValueError:
        raise SearchError(f"--keep-first {args.keep_first!r}: expected comma-separated integers") from None
    lm = load_model(model_dir, args.device)
    rope = lm.rope_parameters
    if rope.get("rope_type", "default") != "default":
        raise SearchError(f"model already uses rope_type {rope['rope_type']!r}; search needs the original rope")
    L = lm.max_position_embeddings
    if args.target_length <= L:
        raise SearchError(f"--target-length {args.target_length} must exceed the model's length {L}")
    if any(k < 0 or k >= L for k in keep_options):
        raise SearchError(f"--keep-first values must be in [0, {L})")
    s = args.target_length / L
    config = lm.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    base = float(rope.get("rope_theta", 10000.0))
    scale = math.sqrt(1 + math.log(s) / math.log(L))  # transformers' longrope default attention_factor
    docs = [Path(f).read_text(encoding="utf-8", errors="replace") for f in args.text] if args.text \
        else long_text_documents()
    texts = [torch.tensor(text_tokens(lm.tokenizer, docs[i::args.texts], args.target_length), device=lm.device)
             for i in range(args.texts)]

    def fitness(c: Candidate) -> float:
        return perplexity(lm.model, ScaledRotary(base, c.factors, c.keep_first, scale, rotary_dim), texts)

    from tqdm import tqdm
    with tqdm(desc="longrope search", unit="eval", file=sys.stderr) as bar:
        result = search(fitness, rotary_dim // 2, s, base, L, population=args.population,
                        iterations=args.iterations, keep_first_options=keep_options, seed=args.seed,
                        progress=bar.update)
    export = result.best
    if export.keep_first:
        log.warning("best candidate keeps n̂ = %d positions un-interpolated, which transformers' longrope "
                    "cannot express; exporting its factors with n̂ = 0", export.keep_first)
        export = Candidate(export.factors, 0)
    export_ppl = fitness(export)
    params = extend_model_dir(model_dir, out, "longrope", args.target_length,
                              options={"long_factor": list(export.factors),
                                       "short_factor": [1.0] * (rotary_dim // 2)})
    # the exported dir, loaded by vanilla transformers, gives the perplexity the search measured
    exported = AutoModelForCausalLM.from_pretrained(out).to(lm.device).eval()
    exported_ppl = perplexity(exported, exported.model.rotary_emb, texts)
    report = {"target_length": args.target_length, "original_length": L, "factor": s,
              "bounds": list(result.bounds), "fitness": f"perplexity, single window of {args.target_length} "
              f"tokens, {args.texts} texts", "starting_population": result.starts,
              "best_ppl": result.best_ppl, "best_keep_first": result.best.keep_first,
              "exported_ppl_search": export_ppl, "exported_ppl_transformers": exported_ppl,
              "long_factor": list(export.factors), "history": result.history, "rope_parameters": params}
    (out / "longrope_search.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


@command_main
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    existed = out.exists()  # then run_search refuses it: a user's dir is never removed
    try:
        report = run_search(args)
    except BaseException:
        if not existed and out.exists() and not (out / "longrope_search.json").exists():
            shutil.rmtree(out)  # no half-written model dir
        raise
    starts = ", ".join(f"{k} {v:.2f}" for k, v in report["starting_population"].items())
    print(f"perplexity at {report['target_length']}: start {starts}; searched {report['best_ppl']:.2f} "
          f"(exported, in transformers: {report['exported_ppl_transformers']:.2f})")
    print(f"wrote {args.out}")
    return 0
