"""Passkey retrieval with the Landmark-attention prompt (used by PI, YaRN, LongLoRA, LongRoPE), scored by
exact match of the first integer (or, with one-token word keys, the first word) the model generates, on a
lengths × depths grid."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from longtune.data_prep.synthetic import KEY_FORMS, draw_key, landmark_prompt

from .common import EvalError, LoadedModel, encode, greedy_generate


@dataclass(frozen=True)
class PasskeyPrompt:
    input_ids: list[int]
    key: int | str
    needle_start: int
    """Token index where the needle begins."""


def build_prompt(tokenizer, length: int, depth: float, key: int | str) -> PasskeyPrompt:
    """A prompt of at most `length` tokens (BOS included) with the needle after `depth` of the filler.

    The filler is whole Landmark sentences repeated; the total length is within one filler sentence
    of `length`. The format is data_prep's (`landmark_prompt`), so prepared passkey samples match it."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    try:
        ids, start = landmark_prompt(lambda text: encode(tokenizer, text), bos, length, depth, key)
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    return PasskeyPrompt(ids, key, start)


def first_integer(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def first_word(text: str) -> str | None:
    match = re.search(r"[A-Za-z]+", text)
    return match.group() if match else None


def answer_matches(answer: str, key: str, key_form: str) -> bool:
    """Exact match of the first integer (`number` keys) or the first word (`word` keys) of the answer."""
    if key_form == "word":
        return first_word(answer) == key
    return first_integer(answer) == int(key)


def run_passkey(lm: LoadedModel, lengths: list[int], depths: list[float], trials: int, seed: int,
                max_new_tokens: int = 8, progress: Callable[[], None] | None = None,
                key_form: str = "number") -> dict:
    """Accuracy per (length, depth) over `trials` random keys (seeded per cell): integers 1–50 000, or
    one-token words with `key_form="word"`."""
    if key_form not in KEY_FORMS:
        raise EvalError(f"unknown passkey key form {key_form!r}; valid: {', '.join(KEY_FORMS)}")
    cells = []
    for length in lengths:
        for depth in depths:
            rng = random.Random(f"{seed}-{length}-{depth}")
            hits, samples = 0, []
            for _ in range(trials):
                key = draw_key(rng, key_form)
                prompt = build_prompt(lm.tokenizer, length, depth, key)
                answer = greedy_generate(lm, prompt.input_ids, max_new_tokens)
                ok = answer_matches(answer, key, key_form)
                hits += ok
                if len(samples) < 2:
                    samples.append({"key": int(key) if key_form == "number" else key, "output": answer, "correct": ok})
                if progress:
                    progress()
            cells.append({"length": length, "depth": depth, "prompt_tokens": len(prompt.input_ids),
                          "needle_distance": len(prompt.input_ids) - prompt.needle_start,
                          "accuracy": hits / trials, "trials": trials, "samples": samples})
    return {"prompt": "landmark", "keys": key_form,
            "scoring": f"exact match of the first generated {'word' if key_form == 'word' else 'integer'}",
            "max_new_tokens": max_new_tokens, "cells": cells}
