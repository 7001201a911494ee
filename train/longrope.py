"""LongRoPE search: evolutionary search of per-pair rescale factors λ_i (inv_freq_i = θ_i / λ_i) for a
target length, fitness = perplexity at the target length on long texts, written as a transformers
`longrope` config by `longtune longrope-search MODEL_DIR --target-length N --out DIR` (train/commands/).

Search space (LongRoPE, arXiv 2402.13753 §3): λ non-decreasing over the pair index (low frequencies are
interpolated at least as much as high ones), λ_i ∈ [1, 1.25·s] on a 0.01 grid, and optionally n̂ first
positions left un-interpolated. The starting population holds PI (λ = s), NTK-aware (λ_i = s^(2i/(d−2)))
and YaRN (its ramp), so the result is never worse than the best of them: the best candidate is always kept.
transformers' longrope has no n̂: when the best candidate has n̂ > 0 it is reported, and its factors are
exported with n̂ = 0 (their perplexity in transformers is measured and recorded).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


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
