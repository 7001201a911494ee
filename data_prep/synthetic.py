"""Synthetic long-context retrieval samples as weighted sources: passkey and multi-needle, built on a
haystack of corpus text (or, for passkey, the Landmark filler that `longtune eval` uses), with loss on
the answer tokens (or on every token). A registry maps `type` to a builder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

KEY_WORDS = ("amber", "basalt", "cobalt", "delta", "ember", "fjord", "granite", "harbor", "indigo", "juniper",
             "kestrel", "lantern", "meadow", "nimbus", "obsidian", "pepper", "quartz", "raven", "saffron",
             "timber", "umber", "velvet", "willow", "xenon", "yarrow", "zephyr", "acorn", "bramble",
             "cinder", "dune", "elm", "falcon")


# The Landmark-attention passkey prompt (used by PI, YaRN, LongLoRA, LongRoPE). `longtune eval`'s
# passkey task builds its prompts here too, so training samples and evaluation prompts share one format.
LANDMARK_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.")
LANDMARK_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
LANDMARK_QUESTION = " What is the pass key? The pass key is"
LANDMARK_MAX_KEY = 50000
# Keys of `key: word`: one word each, every one a single token of the embedded tokenizer (checked by a test),
# so the answer is found, not copied digit by digit. Scoring compares the first generated word.
WORD_KEYS = ("access", "address", "archive", "binary", "block", "buffer", "byte", "class", "code", "color",
             "command", "context", "copy", "data", "debug", "decimal", "dict", "error", "file", "flag", "float",
             "frame", "function", "generator", "global", "group", "hash", "header", "host", "index", "input",
             "integer", "item", "iterator", "keyword", "length", "level", "line", "list", "literal", "locale",
             "mapping", "message", "method", "module", "name", "number", "object", "operator", "option",
             "output", "package", "pair", "path", "pattern", "point", "port", "process", "program", "protocol",
             "range", "screen", "server", "socket")
KEY_FORMS = ("number", "word")


def draw_key(rng, form: str) -> str:
    """A passkey: an integer 1 … LANDMARK_MAX_KEY (`number`) or one of WORD_KEYS (`word`). `rng` is a numpy
    Generator or a `random.Random`."""
    if form == "word":
        i = rng.integers(len(WORD_KEYS)) if hasattr(rng, "integers") else rng.randrange(len(WORD_KEYS))
        return WORD_KEYS[int(i)]
    if form != "number":
        raise ValueError(f"unknown passkey key form {form!r}; valid: {', '.join(KEY_FORMS)}")
    return str(int(rng.integers(1, LANDMARK_MAX_KEY + 1)) if hasattr(rng, "integers")
               else rng.randint(1, LANDMARK_MAX_KEY))


def landmark_needle(key: int | str) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key."


def landmark_prompt(encode: Callable[[str], list[int]], bos: list[int], length: int, depth: float,
                    key: int | str) -> tuple[list[int], int]:
    """(prompt ids of at most `length` tokens, index where the needle begins): BOS, task, whole filler
    sentences with the needle after `depth` of them, question. Within one filler sentence of `length`."""
    head, needle, tail = encode(LANDMARK_TASK), encode(landmark_needle(key)), encode(LANDMARK_QUESTION)
    unit = encode(LANDMARK_FILLER)
    fixed = len(bos) + len(head) + len(needle) + len(tail)
    if length < fixed:
        raise ValueError(f"passkey length {length} is shorter than the prompt without filler ({fixed} tokens)")
    n_units = (length - fixed) // len(unit)
    before = round(n_units * depth)
    ids = list(bos) + list(head) + list(unit) * before
    start = len(ids)
    ids += list(needle) + list(unit) * (n_units - before) + list(tail)
    return ids, start


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


def _sample_length(source, rng: np.random.Generator) -> int:
    if not source.min_length_tokens:  # fixed length: no draw, so fixed-length samples stay as they were
        return source.length_tokens
    return int(rng.integers(source.min_length_tokens, source.length_tokens + 1))


def _landmark_sample(source, encode: Callable[[str], np.ndarray], bos: list[int], eos: list[int],
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    key = draw_key(rng, getattr(source, "key", "number"))
    prompt, _ = landmark_prompt(lambda t: encode(t).tolist(), bos, _sample_length(source, rng), float(rng.random()),
                                key)
    ans = encode(f" {key}.")
    ids = np.concatenate([np.asarray(prompt, np.int32), ans, np.asarray(eos, np.int32)]).astype(np.int32)
    mask = np.zeros(len(ids), np.uint8)
    mask[len(prompt):len(prompt) + len(ans)] = 1
    return ids, mask


def synthetic_samples(source, pool: np.ndarray, encode: Callable[[str], np.ndarray], bos: list[int],
                      eos: list[int], ordinals: Iterable[int]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(ordinal, ids, loss_mask) per sample: BOS, haystack with needles at random depths, question,
    answer (mask 1), EOS; with `loss: all` the mask is 1 everywhere. Sample k depends only on
    (source.seed, k)."""
    for k, ids, mask in _samples(source, pool, encode, bos, eos, ordinals):
        if getattr(source, "loss", "answer") == "all":
            mask = np.ones(len(ids), np.uint8)
        yield k, ids, mask


def _samples(source, pool: np.ndarray, encode: Callable[[str], np.ndarray], bos: list[int],
             eos: list[int], ordinals: Iterable[int]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    task = SYNTHETIC_TASKS[source.type](source)
    for k in ordinals:
        rng = np.random.default_rng([source.seed, k])
        if getattr(source, "prompt", "corpus") == "landmark":
            yield k, *_landmark_sample(source, encode, bos, eos, rng)
            continue
        n = _sample_length(source, rng)
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
