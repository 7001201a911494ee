"""The real-model recipes: each validates against its model's published config (rope parameters, heads
against the parallel layout, world size 8), and each trains a few steps with the model swapped for the
tiny flavour of its family and every length, degree and step count shrunk to one CPU process."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file

from conftest import longtune, losses
from longtune.parallel.layout_rules import tensor_parallel_problem
from longtune.parallel.sharding import padding_multiple
from longtune.train.commands.train import preflight
from longtune.train.extension import apply_extension, plan_extension
from longtune.train.model import build_config, resolve_model_source
from longtune.train.recipe import load_recipe, shipped_recipes

# The model configs as their publishers ship them (the fields that matter here).
LLAMA2_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, vocab_size=32000,
                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
LLAMA31_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                  vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                  rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"})
QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072, vocab_size=152064,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=131072, use_sliding_window=False)
MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, vocab_size=32000,
                  rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096)

# recipe → (shipped config, tiny flavour, rope parameters after extension, max_position_embeddings, trains in
# the default suite; the others are `slow`). Llama 3.1's expected rope is its own shipped llama3 scaling:
# the recipe reproduces it; its YaRN variant rescales from the 8K pre-training length instead.
REAL = {
    "llama2-7b-pi-32k": (LLAMA2_7B, "tiny-llama",
                         {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}, 32768, True),
    "llama3.1-8b-128k": (LLAMA31_8B, "tiny-llama",
                         {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192, "rope_theta": 500000.0}, 131072, False),
    "llama3.1-8b-yarn-128k": (LLAMA31_8B, "tiny-llama",
                              {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8192,
                               "rope_theta": 500000.0}, 131072, False),
    "qwen2.5-7b-yarn-128k": (QWEN25_7B, "tiny-qwen2",
                             {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                              "rope_theta": 1000000.0}, 131072, False),
    "mistral-7b-yarn-64k": (MISTRAL_7B, "tiny-mistral",
                            {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
                             "rope_theta": 10000.0}, 65536, False),
}


def test_real_recipes_are_shipped():
    shipped = {name for name in shipped_recipes() if not name.startswith(("tiny-", "demo-"))}
    assert set(REAL) <= shipped


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_recipe_validates_against_its_model(name, tmp_path):
    shipped, _, rope, max_positions, _ = REAL[name]
    model_dir, data_dir = tmp_path / "model", tmp_path / "data"
    model_dir.mkdir()
    data_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(shipped))
    save_file({}, model_dir / "model.safetensors")  # preflight wants weights; their header is all it reads
    recipe = load_recipe(name, [f"model.name_or_path={model_dir}", f"data.path={data_dir}",
                                f"train.output_dir={tmp_path / 'run'}"])
    preflight(recipe)  # what `longtune train` checks before starting any process
    assert recipe.process_count() == 8 and recipe.data_parallel_size(8) == recipe.parallel.dp
    par, tr = recipe.parallel, recipe.train
    assert tr.seq_len % padding_multiple(par.sp.layout, par.sp.ring, par.sp.ulysses) == 0

    config = build_config(resolve_model_source(str(model_dir)), shipped["vocab_size"],
                          recipe.model.config_overrides)
    ext = recipe.extension
    apply_extension(config, plan_extension(config, ext.method, ext.target_length, ext.original_length, ext.factor,
                                           ext.rope_theta, ext.options))
    assert {k: v for k, v in config.rope_parameters.items() if k in rope} == rope
    assert config.max_position_embeddings == max_positions
    assert config.num_attention_heads % par.sp.ulysses == 0
    assert tensor_parallel_problem(config, par.tp) is None
    if getattr(config, "sliding_window", None) is not None:
        assert config.sliding_window >= tr.seq_len, "sliding-window attention would cut the long rows"


def _tiny_swap(name: str, out) -> list[str]:
    recipe = load_recipe(name)
    dp = 2 if recipe.parallel.backend == "deepspeed" else 1  # DeepSpeed wants a launched world
    return [f"model.name_or_path={REAL[name][1]}", "model.dtype=float32", "data.path=null",
            "extension.original_length=256", "extension.factor=null", "extension.target_length=1024",
            f"parallel.dp={dp}", "parallel.sp.ulysses=1", "parallel.sp.ring=1", "memory.tiled_loss_chunk=128",
            "train.seq_len=512", "train.max_steps=2", "train.warmup_steps=1", f"train.global_batch_size={dp}",
            "train.micro_batch_size=1", "train.save_every=0", "train.progress=false", f"train.output_dir={out}"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if REAL[n][4] else pytest.mark.slow) for n in sorted(REAL)])
def test_real_recipe_trains_tiny_swapped(name, tmp_path):
    out = tmp_path / "run"
    longtune("train", name, *_tiny_swap(name, out), timeout=240)
    got = losses(out)
    assert len(got) == 2 and all(0 < loss < 20 for loss in got)
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == REAL[name][2]["rope_type"]
    assert config["max_position_embeddings"] == 1024
