"""Synthetic long-context retrieval samples as weighted sources: passkey and multi-needle, built on a
haystack of corpus text, with loss only on the answer tokens. A registry maps `type` to a builder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

KEY_WORDS = ("amber", "basalt", "cobalt", "delta", "ember", "fjord", "granite", "harbor", "indigo", "juniper",
             "kestrel", "lantern", "meadow", "nimbus", "obsidian", "pepper", "quartz", "raven", "saffron",
             "timber", "umber", "velvet", "willow", "xenon", "yarrow", "zephyr", "acorn", "bramble",
             "cinder", "dune", "elm", "falcon")


def haystack_pool(texts: Iterable[str], encode: Callable[[str], np.ndarray], want: int) -> np.ndarray:
    """At least `want` tokens of haystack text (repeated if the haystack source is smaller)."""
    parts, have = [], 0
    for text in texts:
        ids = encode(text + "\n\n")
        parts.append(ids)
        have += len(ids)
        if have >= want:
            break
    if not have:
        raise ValueError("the haystack source has no text")
    pool = np.concatenate(parts)
    return np.tile(pool, -(-want // len(pool)))[:max(want, len(pool))]


def _passkey(rng: np.random.Generator) -> tuple[list[str], str, str]:
    key = int(rng.integers(10000, 100000))
    needle = f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
    return [needle], "\nWhat is the pass key? The pass key is", f" {key}."


def _needles(count: int) -> Callable[[np.random.Generator], tuple[list[str], str, str]]:
    def build(rng: np.random.Generator) -> tuple[list[str], str, str]:
        keys = [KEY_WORDS[i] for i in rng.choice(len(KEY_WORDS), size=count, replace=False)]
        values = [int(v) for v in rng.integers(1000, 10000, size=count)]
        needles = [f"\nThe special magic number for {k} is: {v}.\n" for k, v in zip(keys, values, strict=False)]
        question = f"\nWhat are the special magic numbers for {', '.join(keys)}? They are:"
        return needles, question, " " + ", ".join(str(v) for v in values) + "."
    return build


SYNTHETIC_TASKS: dict[str, Callable] = {
    "passkey": lambda source: _passkey,
    "needle": lambda source: _needles(source.needles),
}


def synthetic_samples(source, pool: np.ndarray, encode: Callable[[str], np.ndarray], bos: list[int],
                      eos: list[int], ordinals: Iterable[int]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(ordinal, ids, loss_mask) per sample: BOS, haystack with needles at random depths, question,
    answer (mask 1), EOS. Sample k depends only on (source.seed, k)."""
    task = SYNTHETIC_TASKS[source.type](source)
    n = source.length_tokens
    for k in ordinals:
        rng = np.random.default_rng([source.seed, k])
        needles, question, answer = task(rng)
        start = int(rng.integers(0, len(pool) - n + 1))
        hay = pool[start:start + n]
        cuts = sorted(int(c) for c in rng.integers(0, n + 1, size=len(needles)))
        parts, prev = [np.asarray(bos, np.int32)], 0
        for cut, needle in zip(cuts, needles, strict=False):
            parts += [hay[prev:cut], encode(needle)]
            prev = cut
        parts += [hay[prev:], encode(question)]
        prompt = np.concatenate(parts).astype(np.int32)
        ans = encode(answer)
        ids = np.concatenate([prompt, ans, np.asarray(eos, np.int32)])
        mask = np.zeros(len(ids), np.uint8)
        mask[len(prompt):len(prompt) + len(ans)] = 1
        yield k, ids, mask
