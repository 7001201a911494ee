"""End-to-end single-process runs of the tiny model: learning, resume, export, bf16."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import PARITY_ARGS, assert_close_curves, longtune, losses, metrics

METRIC_KEYS = {"step", "loss", "lr", "tokens", "tokens_per_s", "peak_mem_gib"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    # wandb runs offline here (no network): the optional logger's code path is exercised too.
    proc = longtune("train", "tiny-smoke", f"train.output_dir={out}", "train.wandb.mode=offline",
                    timeout=180, WANDB_MODE="offline")
    return out, proc


def test_tiny_smoke_loss_falls_over_30_steps(smoke_run):
    out, _ = smoke_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all(METRIC_KEYS <= set(r) for r in rows)
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.7, f"loss fell only from {first:.3f} to {last:.3f}"
    assert all(r["tokens"] == 8 * 256 for r in rows)


def test_run_dir_contents(smoke_run):
    out, _ = smoke_run
    assert (out / "recipe.yaml").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000030"]
    assert not list(out.glob("**/*.partial"))
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run dir missing"


def test_export_loads_in_vanilla_transformers_and_generates(smoke_run):
    out, _ = smoke_run
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.use_cache is True
    prompt = tok("The import statement", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 8
    assert isinstance(tok.decode(generated[0]), str)
    # The exported weights are the trained ones: on unseen rows they beat the early-training loss.
    from longtune.train.data import StepBatches, load_corpus
    from longtune.train.loss import token_loss_sum

    corpus = load_corpus(None, tok, 256)
    batches = StepBatches(corpus, seed=0, global_batch=8, micro_batch=8, dp=1, dp_rank=0, pad_id=0,
                          document_masking=True).for_step(30)
    with torch.no_grad():
        mb = batches[0]
        logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits
        loss = token_loss_sum(logits, mb.labels).item() / mb.counted_tokens
    assert loss < metrics(out)[2]["loss"] - 0.5


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    full = tmp_path / "full"
    args = [*PARITY_ARGS[:1], "train.max_steps=6", "train.save_every=3", "train.keep_checkpoints=5",
            "train.progress=false", "train.export=false"]
    longtune("train", *args, f"train.output_dir={full}")
    # An interrupted run: the same dir as it stood after step 3 (checkpoint 3, metrics up to 6 are
    # trimmed by the resume itself).
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000006")
    proc = longtune("train", *args, f"train.output_dir={cut}")
    assert "resumed from" in proc.stderr and "at step 3" in proc.stderr
    a, b = metrics(full), metrics(cut)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for ma, mb in zip(a[3:], b[3:], strict=True):
        assert (ma["loss"], ma["lr"], ma["grad_norm"]) == (mb["loss"], mb["lr"], mb["grad_norm"])


def test_bf16_follows_fp32(reference_run, tmp_path):
    longtune("train", *PARITY_ARGS, "model.dtype=bfloat16", f"train.output_dir={tmp_path}")
    assert_close_curves(losses(tmp_path), losses(reference_run), rel=2e-2)
