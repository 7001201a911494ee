"""The DeepSpeed config comes from the recipe; a user JSON adds fields, "auto" takes the recipe's value,
and a contradiction is an error that names the key."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from longtune.parallel.deepspeed_backend import (
    DeepSpeedConfigError,
    generate_deepspeed_config,
    load_deepspeed_config,
    merge_user_config,
)
from longtune.train.loop import backend_settings
from longtune.train.recipe import RECIPES_DIR, load_recipe
from longtune.train.recipe_layout import layout_from_recipe


def _settings(*overrides: str, dp: int = 2):
    """(optimizer settings, layout) of tiny-smoke under deepspeed: 2 micro-batches of 4 rows per step, `dp` ranks."""
    recipe = load_recipe("tiny-smoke", ["parallel.backend=deepspeed", *overrides])
    layout = replace(layout_from_recipe(recipe, 1), dp=dp)
    return backend_settings(recipe), layout


def test_generated_config_follows_the_recipe():
    s, layout = _settings("parallel.deepspeed.zero_stage=3", "memory.offload.optimizer=true",
                  "memory.offload.params=true", "train.grad_clip=0.5", "model.dtype=bfloat16")
    cfg = generate_deepspeed_config(s, layout, on_gpu=False)
    assert cfg["train_batch_size"] == 4 * 2 * 2 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"] == {"enabled": True}
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert cfg["optimizer"]["params"]["lr"] == s.lr and "torch_adam" not in cfg["optimizer"]["params"]
    assert generate_deepspeed_config(*_settings(), on_gpu=False)["optimizer"]["params"]["torch_adam"]


def test_user_json_adds_fields_and_auto_takes_the_recipe_value():
    gen = generate_deepspeed_config(*_settings(), on_gpu=False)
    merged = merge_user_config(gen, {"gradient_clipping": "auto", "zero_optimization": {
        "stage": "auto", "overlap_comm": True}, "comms_logger": {"enabled": False}})
    assert merged["gradient_clipping"] == gen["gradient_clipping"]
    assert merged["zero_optimization"] == {**gen["zero_optimization"], "overlap_comm": True}
    assert merged["comms_logger"] == {"enabled": False}


def test_contradicting_user_value_is_an_error():
    gen = generate_deepspeed_config(*_settings(), on_gpu=False)
    with pytest.raises(DeepSpeedConfigError, match=r"zero_optimization.stage = 3 contradicts the recipe's 2"):
        merge_user_config(gen, {"zero_optimization": {"stage": 3}})
    with pytest.raises(DeepSpeedConfigError, match="not_a_key is \"auto\" but the recipe does not"):
        merge_user_config(gen, {"not_a_key": "auto"})


def test_shipped_template_merges_cleanly(tmp_path):
    template = RECIPES_DIR / "deepspeed" / "zero3-extra.json"
    cfg = load_deepspeed_config(*_settings("parallel.deepspeed.zero_stage=3", f"parallel.deepspeed.config={template}"),
                                on_gpu=False)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["zero_optimization"]["overlap_comm"] is True
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(DeepSpeedConfigError, match="broken.json"):
        load_deepspeed_config(*_settings(f"parallel.deepspeed.config={broken}"), on_gpu=False)
    json.loads(template.read_text())
