"""Needle in a haystack (gkamradt's needle and question) over local long text, scored by string match
(RULER's `string_match_all`: the fraction of reference phrases contained in the answer, case-insensitive)."""

from __future__ import annotations

from collections.abc import Callable

from .common import EvalError, LoadedModel, encode, greedy_generate, text_tokens

NEEDLE = " The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day. "
QUESTION = ("\n\nQuestion: What is the best thing to do in San Francisco?\n"
            "Answer: The best thing to do in San Francisco is")
REFERENCES = ("eat a sandwich", "dolores park")
SENTENCE_END = (".", "!", "?", "\n")


def string_match_all(answer: str, references=REFERENCES) -> float:
    text = " ".join(answer.lower().split())
    return sum(ref in text for ref in references) / len(references)


def build_prompt(tokenizer, haystack: list[int], length: int, depth: float) -> tuple[list[int], int]:
    """(prompt ids of at most `length` tokens, needle token index): the needle goes at the sentence
    boundary at or before `depth` of the haystack part."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    needle, question = encode(tokenizer, NEEDLE), encode(tokenizer, QUESTION)
    budget = length - len(bos) - len(needle) - len(question)
    if budget < 1:
        raise EvalError(f"needle length {length} is shorter than needle and question "
                        f"({length - budget} tokens)")
    if len(haystack) < budget:
        raise EvalError(f"the haystack has {len(haystack)} tokens; {budget} are needed")
    context = haystack[:budget]
    cut = int(budget * depth)
    while 0 < cut < budget and not tokenizer.decode(context[cut - 1:cut]).rstrip(" ").endswith(SENTENCE_END):
        cut -= 1
    ids = bos + context[:cut] + needle + context[cut:] + question
    return ids, len(bos) + cut


def run_needle(lm: LoadedModel, lengths: list[int], depths: list[float], documents: list[str],
               max_new_tokens: int = 16, progress: Callable[[], None] | None = None) -> dict:
    haystack = text_tokens(lm.tokenizer, documents, max(lengths))
    cells = []
    for length in lengths:
        for depth in depths:
            ids, at = build_prompt(lm.tokenizer, haystack, length, depth)
            answer = greedy_generate(lm, ids, max_new_tokens)
            cells.append({"length": length, "depth": depth, "prompt_tokens": len(ids), "needle_at": at,
                          "score": string_match_all(answer), "output": answer})
            if progress:
                progress()
    return {"needle": NEEDLE.strip(), "question": QUESTION.strip(), "references": list(REFERENCES),
            "scoring": "string_match_all (fraction of reference phrases in the answer)",
            "max_new_tokens": max_new_tokens, "cells": cells}
