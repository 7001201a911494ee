"""`longtune eval`: prompts, scoring, perplexity protocols against brute-force references, and the CLI's
outputs and errors, on an untrained tiny model."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import free_port, longtune, run
from longtune.data_prep.synthetic import LANDMARK_FILLER
from longtune.parallel.sharding import padding_multiple
from longtune.train.commands.eval import main
from longtune.train.evaluate import needle, passkey
from longtune.train.evaluate.common import load_model, long_text_documents
from longtune.train.evaluate.perplexity import (
    PROTOCOLS,
    local_window_score,
    run_perplexity,
    sliding_nll,
    sliding_windows,
    token_nll,
)
from longtune.train.evaluate.sequence_parallel import sp_degrees


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(tiny_model_dir, "cpu")


# ---------------------------------------------------------------- perplexity protocols

@pytest.mark.parametrize("n,window,stride", [(40, 16, 8), (37, 10, 9), (25, 25, 7), (9, 32, 4)])
def test_sliding_windows_score_every_token_once(n, window, stride):
    scored = [t for _, end, first in sliding_windows(n, window, stride) for t in range(first, end)]
    assert scored == list(range(1, n))
    assert all(end - begin <= window for begin, end, _ in sliding_windows(n, window, stride))


def test_sliding_nll_equals_token_by_token_reference(lm):
    ids = list(range(3, 43))
    window, stride = 16, 6
    got_sum, got_count = sliding_nll(local_window_score(lm.model, lm.device), ids, window, stride)
    # Press et al.: token t is scored by the first window [k·stride, k·stride + W) that contains it, and
    # sees that window's tokens before it as context.
    ref = []
    with torch.no_grad():
        for t in range(1, len(ids)):
            k = max(0, (t - window) // stride + 1)
            context = ids[k * stride:t + 1]
            logits = lm.model(torch.tensor([context]), use_cache=False).logits[0, -2]
            ref.append(float(F.cross_entropy(logits[None].float(), torch.tensor([ids[t]]))))
    assert got_count == len(ids) - 1
    assert math.isclose(got_sum, sum(ref), rel_tol=1e-5)


def test_single_window_matches_the_hf_loss(lm):
    ids = list(range(5, 69))
    nll = token_nll(lm.model, ids, lm.device)
    with torch.no_grad():
        hf = lm.model(torch.tensor([ids]), labels=torch.tensor([ids]), use_cache=False).loss
    assert nll.numel() == len(ids) - 1
    assert math.isclose(float(nll.mean()), float(hf), rel_tol=1e-5)


# ---------------------------------------------------------------- passkey and needle

@pytest.mark.parametrize("length", [100, 257, 600])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_is_the_landmark_prompt(lm, length, depth):
    tok = lm.tokenizer
    prompt = passkey.build_prompt(tok, length, depth, 31337)
    unit = len(tok(LANDMARK_FILLER, add_special_tokens=False)["input_ids"])
    assert length - unit < len(prompt.input_ids) <= length
    text = tok.decode(prompt.input_ids, skip_special_tokens=True)
    assert text.startswith("There is an important info hidden inside a lot of irrelevant text.")
    assert text.endswith("What is the pass key? The pass key is")
    assert "The pass key is 31337. Remember it. 31337 is the pass key." in text
    before, after = text.split("The pass key is 31337.")
    n_before, n_after = before.count("The grass is green."), after.count("The grass is green.")
    assert n_before == round((n_before + n_after) * depth)


def test_passkey_scores_exact_first_integer(lm, monkeypatch):
    assert passkey.first_integer(" 4821. Remember") == 4821 and passkey.first_integer("no digits") is None

    def oracle(lm_, ids, max_new_tokens):  # answers with the key it finds in the prompt
        return " " + re.search(r"pass key is (\d+)", lm_.tokenizer.decode(ids)).group(1) + "."

    monkeypatch.setattr(passkey, "greedy_generate", oracle)
    res = passkey.run_passkey(lm, [200, 300], [0.0, 1.0], trials=3, seed=1)
    assert [c["accuracy"] for c in res["cells"]] == [1.0] * 4

    monkeypatch.setattr(passkey, "greedy_generate", lambda lm_, ids, n: " 12345 is it")
    res = passkey.run_passkey(lm, [200], [0.5], trials=4, seed=1)
    assert res["cells"][0]["accuracy"] == 0.0  # keys are random in 1…50 000, never all 12345


def test_needle_prompt_and_string_match(lm):
    assert needle.string_match_all(" eat a  Sandwich and sit in DOLORES park.") == 1.0
    assert needle.string_match_all(" eat a sandwich at home") == 0.5
    assert needle.string_match_all(" go surfing") == 0.0
    tok = lm.tokenizer
    hay = tok("The cat sat. The dog ran far away. " * 60, add_special_tokens=False)["input_ids"]
    for depth in (0.0, 0.5, 1.0):
        ids, at = needle.build_prompt(tok, hay, 300, depth)
        assert len(ids) <= 300
        text = tok.decode(ids, skip_special_tokens=True)
        assert needle.NEEDLE.strip() in text and text.endswith("in San Francisco is")
        prefix = tok.decode(ids[:at], skip_special_tokens=True)
        assert prefix == "" or prefix.rstrip().endswith(".")  # at a sentence boundary
        if depth == 0.0:
            assert at == 1  # right after BOS


# ---------------------------------------------------------------- CLI

def test_eval_cli_writes_json_markdown_and_plots(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main([str(tiny_model_dir), "--lengths", "128,256,384", "--depths", "0,0.5,1", "--trials", "2",
               "--ppl-texts", "1", "--stride", "64", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["needle_heatmap.png", "passkey_heatmap.png",
                                                     "perplexity.png", "results.json", "results.md"]
    res = json.loads((out / "results.json").read_text())
    assert res["model"]["max_position_embeddings"] == 256
    assert len(res["passkey"]["cells"]) == 9 and len(res["needle"]["cells"]) == 9
    assert all(0 <= c["accuracy"] <= 1 and c["prompt_tokens"] <= c["length"] for c in res["passkey"]["cells"])
    points = res["perplexity"]["points"]
    assert {(p["protocol"], p["length"]) for p in points} == {
        (proto, n) for proto in ("single_window", "sliding") for n in (128, 256, 384)}
    # an untrained model over a 2048 vocabulary: perplexity near the vocabulary size
    assert all(500 < p["ppl"] < 8000 for p in points)
    assert all(p["tokens_scored"] == 383 for p in points if p["protocol"] == "sliding")
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    md = (out / "results.md").read_text()
    assert "| single_window |" in md and "## Passkey accuracy" in md
    assert "passkey" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["{missing}"], "does not exist or has no config.json"),
    (["{model}", "--lengths", "12x"], "comma-separated whole numbers"),
    (["{model}", "--lengths", "0,128"], "lengths must be positive"),
    (["{model}", "--depths", "0.5,1.5"], "fractions of the context in [0, 1]"),
    (["{model}", "--tasks", "passkey,ruler"], "unknown ruler; valid: passkey, needle, ppl"),
    (["{model}", "--lengths", "40", "--tasks", "passkey"], "shorter than the prompt without filler"),
    (["{model}", "--bogus"], "unrecognized arguments: --bogus"),
    (["{model}", "--sp", "3", "--sp-impl", "ulysses"], "4 query heads are not divisible by the Ulysses degree 3"),
    (["{model}", "--sp", "2", "--tasks", "passkey,ppl"], "--sp 2 supports --tasks ppl only (passkey:"),
    (["{model}", "--sp", "0"], "--sp must be at least 1"),
    (["{model}", "--sp", "2", "--sp-impl", "tree"], "invalid choice: 'tree'"),
    (["{model}", "--sp", "2", "--lengths", "10000000"], "the evaluation text has only"),
])
def test_eval_cli_errors(tiny_model_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    argv = [a.format(model=tiny_model_dir, missing=tmp_path / "nope") for a in args] + ["--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("longtune: error:") and message in err[-1]
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- sequence parallelism (--sp)

SP_LENGTHS = (101, 203)
"""Odd: every window (sliding ones included) is padded to the layout's multiple."""


@pytest.fixture(scope="module")
def one_process_points(lm) -> dict:
    res = run_perplexity(lm, list(SP_LENGTHS), list(PROTOCOLS), long_text_documents(), 1, 64)
    return {(p["protocol"], p["length"]): p for p in res["points"]}


@pytest.mark.multiproc
@pytest.mark.parametrize("impl", ["zigzag", "ulysses"])
def test_eval_sp_perplexity_equals_one_process(tiny_model_dir, tmp_path, one_process_points, impl):
    ring, ulysses, layout = sp_degrees(impl, 2)
    assert all(n % padding_multiple(layout, ring, ulysses) for n in SP_LENGTHS)
    out = tmp_path / "eval"
    args = [str(tiny_model_dir), "--lengths", ",".join(map(str, SP_LENGTHS)), "--ppl-texts", "1", "--stride",
            "64", "--sp", "2", "--sp-impl", impl, "--out", str(out), "--no-progress"]
    if impl == "zigzag":  # as a user runs it: longtune starts the 2 processes itself
        longtune("eval", *args, timeout=120)
    else:  # under a launcher that already started them
        run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(free_port()), "-m", "longtune.train.commands.eval", *args], timeout=120)
    res = json.loads((out / "results.json").read_text())
    assert "passkey" not in res and "needle" not in res  # --sp defaults to --tasks ppl
    points = res["perplexity"]["points"]
    assert {(p["protocol"], p["length"]) for p in points} == set(one_process_points)
    for p in points:
        want = one_process_points[(p["protocol"], p["length"])]
        assert p["tokens_scored"] == want["tokens_scored"]
        assert math.isclose(p["nll"], want["nll"], rel_tol=1e-5), (p, want)
    assert all(f"sp=2 ({impl})" in note for note in res["perplexity"]["protocols"].values())
    assert f"sp=2 ({impl})" in (out / "results.md").read_text()
