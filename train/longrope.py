"""LongRoPE search: evolutionary search of per-pair rescale factors λ_i (inv_freq_i = θ_i / λ_i) for a
target length, fitness = perplexity at the target length on long texts, written as a transformers
`longrope` config (`longtune longrope-search MODEL_DIR --target-length N --out DIR`).

Search space (LongRoPE, arXiv 2402.13753 §3): λ non-decreasing over the pair index (low frequencies are
interpolated at least as much as high ones), λ_i ∈ [1, 1.25·s] on a 0.01 grid, and optionally n̂ first
positions left un-interpolated. The starting population holds PI (λ = s), NTK-aware (λ_i = s^(2i/(d−2)))
and YaRN (its ramp), so the result is never worse than the best of them: the best candidate is always kept.
transformers' longrope has no n̂: when the best candidate has n̂ > 0 it is reported, and its factors are
exported with n̂ = 0 (their perplexity in transformers is measured and recorded).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .cli import error_raising_parser

log = logging.getLogger(__name__)


class SearchError(ValueError):
    user_facing = True


# ---------------------------------------------------------------- starting points

def pi_factors(half: int, s: float) -> list[float]:
    return [s] * half


def ntk_factors(half: int, s: float) -> list[float]:
    # b' = b·s^(d/(d−2)) ⇒ θ'_i = θ_i / s^(2i/(d−2)), d = 2·half
    d = 2 * half
    return [s ** (2 * i / (d - 2)) for i in range(half)]


def yarn_factors(half: int, s: float, base: float, original_length: int, beta_fast: float = 32.0,
                 beta_slow: float = 1.0) -> list[float]:
    """λ_i of YaRN's code form (ramp over the pair index between the correction dims)."""
    d = 2 * half

    def correction_dim(n_rot: float) -> float:
        return d * math.log(original_length / (n_rot * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), d - 1)
    high = high if high != low else high + 0.001
    out = []
    for i in range(half):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(1.0 / (ramp / s + (1 - ramp)))
    return out


# ---------------------------------------------------------------- candidates

@dataclass(frozen=True)
class Candidate:
    factors: tuple[float, ...]
    keep_first: int = 0

    def key(self) -> tuple:
        return (self.factors, self.keep_first)


def legalize(factors: list[float], lo: float, hi: float, step: float = 0.01) -> tuple[float, ...]:
    """Clip to [lo, hi], round to the grid, and make non-decreasing (running maximum)."""
    out, running = [], lo
    for f in factors:
        f = min(max(round(round(f / step) * step, 6), lo), hi)
        running = max(running, f)
        out.append(running)
    return tuple(out)


def is_legal(factors, lo: float, hi: float) -> bool:
    return all(lo - 1e-9 <= f <= hi + 1e-9 for f in factors) and all(
        a <= b + 1e-12 for a, b in zip(factors, factors[1:], strict=False))


# ---------------------------------------------------------------- fitness

class ScaledRotary(nn.Module):
    """cos/sin of LongRoPE with per-pair factors, n̂ un-interpolated first positions and the magnitude
    scale; with keep_first = 0 it equals transformers' longrope beyond the original length."""

    def __init__(self, base: float, factors, keep_first: int, scale: float, rotary_dim: int):
        super().__init__()
        theta = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        self.register_buffer("theta", theta, persistent=False)
        self.register_buffer("inv_freq", theta / torch.tensor(factors, dtype=torch.float32), persistent=False)
        self.keep_first, self.scale = keep_first, scale

    @torch.no_grad()
    def forward(self, x, position_ids):
        pos = position_ids[:, :, None].float()
        freqs = pos * self.inv_freq
        if self.keep_first:
            freqs = torch.where(pos < self.keep_first, pos * self.theta, freqs)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(x.dtype), (emb.sin() * self.scale).to(x.dtype)


def perplexity(model, rotary: nn.Module, texts: list[torch.Tensor]) -> float:
    """Token-weighted perplexity of `texts` (each one window, all tokens scored) with `rotary`."""
    model.model.rotary_emb = rotary.to(texts[0].device)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in texts:
            logits = model(ids[None], use_cache=False).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum")
            total, count = total + float(nll), count + ids.numel() - 1
    return math.exp(total / count)


# ---------------------------------------------------------------- search

@dataclass
class SearchResult:
    best: Candidate
    best_ppl: float
    starts: dict[str, float]
    history: list[dict]
    bounds: tuple[float, float]


def search(fitness, half: int, s: float, base: float, original_length: int, *, population: int = 16,
           iterations: int = 6, mutations: int = 6, crossovers: int = 6, parents: int = 6,
           mutation_prob: float = 0.3, keep_first_options: tuple[int, ...] = (0,), seed: int = 0,
           progress=None) -> SearchResult:
    """Evolutionary search (LongRoPE Algorithm 1, scaled down): keep the `parents` best, add mutated and
    crossed-over children, repeat. `fitness(candidate) -> perplexity` (lower is better)."""
    lo, hi = 1.0, 1.25 * s
    rng = random.Random(seed)
    cache: dict[tuple, float] = {}

    def score(c: Candidate) -> float:
        if c.key() not in cache:
            cache[c.key()] = fitness(c)
            if progress:
                progress()
        return cache[c.key()]

    starts = {"pi": pi_factors(half, s), "ntk": ntk_factors(half, s),
              "yarn": yarn_factors(half, s, base, original_length)}
    seeds = {name: Candidate(legalize(f, lo, hi), 0) for name, f in starts.items()}
    start_ppl = {name: score(c) for name, c in seeds.items()}

    def mutate(c: Candidate) -> Candidate:
        f = list(c.factors)
        for i in range(half):
            if rng.random() < mutation_prob:
                f[i] *= math.exp(rng.gauss(0.0, 0.15))
        keep = rng.choice(keep_first_options) if rng.random() < mutation_prob else c.keep_first
        return Candidate(legalize(f, lo, hi), keep)

    def crossover(a: Candidate, b: Candidate) -> Candidate:
        f = [x if rng.random() < 0.5 else y for x, y in zip(a.factors, b.factors, strict=True)]
        return Candidate(legalize(f, lo, hi), rng.choice((a.keep_first, b.keep_first)))

    pool = list(seeds.values())
    while len(pool) < population:
        pool.append(mutate(rng.choice(list(seeds.values()))))
    history = []
    for it in range(iterations + 1):
        ranked = sorted({c.key(): c for c in pool}.values(), key=score)
        history.append({"iteration": it, "best_ppl": score(ranked[0]), "evaluated": len(cache)})
        if it == iterations:
            break
        top = ranked[:parents]
        children = [mutate(rng.choice(top)) for _ in range(mutations)]
        children += [crossover(*rng.sample(top, 2)) for _ in range(crossovers) if len(top) > 1]
        pool = top + children
    best = min((c for c in pool), key=score)
    return SearchResult(best, score(best), start_ppl, history, (lo, hi))


# ---------------------------------------------------------------- CLI

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

    from .evaluate.common import load_model, long_text_documents, text_tokens
    from .extension import extend_model_dir

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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        report = run_search(args)
    except SearchError as exc:
        print(f"longtune: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        return int(exc.code or 0)
    except BaseException:
        out = Path(args.out) if "args" in locals() else None
        if out is not None and out.exists() and not (out / "longrope_search.json").exists():
            shutil.rmtree(out)  # no half-written model dir
        raise
    starts = ", ".join(f"{k} {v:.2f}" for k, v in report["starting_population"].items())
    print(f"perplexity at {report['target_length']}: start {starts}; searched {report['best_ppl']:.2f} "
          f"(exported, in transformers: {report['exported_ppl_transformers']:.2f})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
