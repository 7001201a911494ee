"""The main job: the shipped base model really solves passkey at its length, and `longtune demo` runs
prep → extension with sp = 2 → evaluation → comparison end to end (shrunk: 256 → 512, 2 steps)."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import longtune
from longtune.data_prep.synthetic import landmark_prompt
from longtune.train.evaluate.common import encode, load_model, load_tokenizer
from longtune.train.evaluate.passkey import run_passkey
from longtune.train.model import shipped_model_dir
from longtune.train.recipe import RECIPES_DIR, load_recipe

BASE = shipped_model_dir("tiny-base-256")


def test_shipped_base_model_retrieves_passkeys_at_its_length():
    """Far above chance (a random 1-5 digit key: ~0), on keys the model never saw (eval seed ≠ prep seed).
    The issue's target is 95 % at 256; the shipped model gets 0.96 at 256 and 0.97 at 128 in its own eval (eval.md)."""
    lm = load_model(BASE)
    assert lm.max_position_embeddings == 256
    result = run_passkey(lm, [128, 256], [0.0, 0.25, 0.5, 0.75, 1.0], trials=4, seed=123)
    cells = result["cells"]
    accuracy = sum(c["accuracy"] for c in cells) / len(cells)
    assert accuracy >= 0.6, cells


def test_shipped_base_model_ships_its_provenance():
    """Three stages (examples/base-model/train.sh): each stage's resolved recipe and loss log, each stage
    trained from the previous one's export, and every log complete."""
    for name in ("config.json", "model.safetensors", "tokenizer.json", "prep.yaml", "eval.md", "README.md"):
        assert (BASE / name).is_file(), name
    previous = None
    for suffix in ("", "-stage2", "-stage3"):
        steps = [json.loads(line) for line in (BASE / f"metrics{suffix}.jsonl").read_text().splitlines() if line]
        recipe = yaml.safe_load((BASE / f"recipe{suffix}.yaml").read_text())
        assert steps[-1]["step"] == recipe["train"]["max_steps"] == len(steps), suffix
        if previous is None:
            assert recipe["model"]["name_or_path"] == "tiny-llama" and steps[-1]["loss"] < steps[0]["loss"] / 4
        else:
            assert recipe["model"]["name_or_path"] == f"{previous['train']['output_dir']}/model", suffix
            assert recipe["data"] == previous["data"] and recipe["train"]["seed"] != previous["train"]["seed"]
        previous = recipe


@pytest.mark.parametrize("stage", [2, 3])
def test_shipped_base_stage_recipes_are_the_ones_that_trained_it(stage):
    """train.sh's stage recipes resolve to the recipes shipped with the weights (no silent drift)."""
    resolved = load_recipe(str(RECIPES_DIR / f"tiny-base-256-stage{stage}.yaml"), []).model_dump(mode="json")
    assert resolved == yaml.safe_load((BASE / f"recipe-stage{stage}.yaml").read_text())


def test_shipped_base_prep_trains_the_eval_prompts_at_256():
    """`longtune eval` at 256 tokens builds prompts of 5 filler sentences; the base model's prep must hold
    samples with as many sentences for every key length, whole (prompt + answer + EOS) within a 256 row."""
    prep = yaml.safe_load((BASE / "prep.yaml").read_text())
    longest = max(s["length_tokens"] for s in prep["sources"] if s["type"] == "passkey")
    tok = load_tokenizer(BASE)
    for key in (7, 42, 3995, 39954, 12345, 50000):  # answers of 2 … 6 tokens
        evaluated, _ = landmark_prompt(lambda t: encode(tok, t), [tok.bos_token_id], 256, 0.0, key)
        trained, _ = landmark_prompt(lambda t: encode(tok, t), [tok.bos_token_id], longest, 0.0, key)
        assert len(trained) == len(evaluated), (key, len(trained), len(evaluated))  # same sentence count
        assert len(trained) + len(encode(tok, f" {key}.")) + 1 <= prep["seq_len"], key


def test_demo_end_to_end_small(tmp_path):
    out = tmp_path / "demo"
    done = longtune("demo", "--out", str(out), "--target-length", "512", "--steps", "2", "--trials", "1",
                    "--methods", "pi,yarn", "--depths", "0,1", check=False, timeout=380)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["models"]) == {"base", "pi", "yarn"}
    for row in summary["models"].values():
        assert set(row["passkey"]) == {"256", "512"} and row["ppl_ratio"] > 0
    table = (out / "results.md").read_text()
    assert "| base |" in table and "| pi |" in table and "| yarn |" in table
    for png in ("passkey_heatmaps.png", "perplexity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| base |" in done.stdout  # the summary is printed at the end
    for method in ("pi", "yarn"):
        config = json.loads((out / method / "model" / "config.json").read_text())
        assert config["max_position_embeddings"] == 512


def test_demo_rejects_bad_arguments(tmp_path):
    done = longtune("demo", "--out", str(tmp_path / "d"), "--methods", "pi,rope", check=False)
    assert done.returncode == 2 and "unknown rope" in done.stderr
    done = longtune("demo", "--out", str(tmp_path / "d"), "--target-length", "128", check=False)
    assert done.returncode == 2 and "must exceed" in done.stderr
    done = longtune("demo", "--out", str(tmp_path / "d"), "--nproc", "3", check=False)
    assert done.returncode == 2 and "divisor of 4" in done.stderr
    assert not (tmp_path / "d").exists()
