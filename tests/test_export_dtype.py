"""`train.export_dtype`: the HF export written in bfloat16 / float16 loads back with plain `from_pretrained` in
that dtype, holding the trained fp32 weights rounded once; float32 (the default) writes them unchanged."""

from __future__ import annotations

import pytest
import torch

from conftest import longtune


def _trained_state(seed: int = 0):
    from longtune.train.model import build_config, build_model, resolve_model_source
    from longtune.train.tokenizer import embedded_tokenizer

    tokenizer = embedded_tokenizer()
    source = resolve_model_source("tiny-llama")
    config = build_config(source, len(tokenizer), {})
    model = build_model(source, config, device="cpu", attn_implementation="sdpa", seed=seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, config, tokenizer


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_export_in_a_dtype_reloads_in_that_dtype(tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    from longtune.train.export import export_hf_model

    state, config, tokenizer = _trained_state()
    out = export_hf_model(state, config, tokenizer, tmp_path / "model", dtype)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    want_dtype = getattr(torch, dtype)
    assert loaded.dtype == want_dtype
    got = loaded.state_dict()
    assert got.keys() == state.keys()
    for name, value in state.items():
        assert got[name].dtype == want_dtype, name
        assert torch.equal(got[name], value.to(want_dtype)), name
    assert state["lm_head.weight"].dtype == torch.float32  # the caller's fp32 weights are left as they were


def test_the_recipe_key_reaches_the_export(tmp_path):
    from longtune.train.recipe import RecipeError, load_recipe

    assert load_recipe("tiny-smoke").train.export_dtype == "float32"
    with pytest.raises(RecipeError, match="export_dtype"):
        load_recipe("tiny-smoke", ["train.export_dtype=int8"])
    longtune("train", "tiny-smoke", "train.max_steps=1", "train.progress=false", "train.export_dtype=bfloat16",
             f"train.output_dir={tmp_path}")
    import json

    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
