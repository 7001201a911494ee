"""Extension writes rope parameters that transformers turns into the published inverse frequencies.

The full per-method formula tests belong to the extension work item; these pin the config contract.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from longtune.train.extension import ExtensionError, apply_extension, plan_extension
from longtune.train.model import build_config, resolve_model_source


def _config():
    return build_config(resolve_model_source("tiny-llama"), 512, {})


def _inv_freq(config) -> torch.Tensor:
    params = config.rope_parameters
    if params["rope_type"] == "default":
        d = config.hidden_size // config.num_attention_heads
        return 1.0 / (params["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](config)[0].double()


def test_linear_interpolation_divides_frequencies_by_the_factor():
    config = _config()
    base = _inv_freq(config)
    apply_extension(config, plan_extension(config, "linear", target_length=1024))
    assert config.max_position_embeddings == 1024 and config.rope_parameters["factor"] == 4.0
    assert config.rope_parameters["rope_theta"] == 10000.0
    torch.testing.assert_close(_inv_freq(config), base / 4, rtol=1e-6, atol=0)


def test_ntk_aware_base_change():
    config = _config()
    d = config.hidden_size // config.num_attention_heads
    apply_extension(config, plan_extension(config, "ntk", target_length=2048))
    assert math.isclose(config.rope_parameters["rope_theta"], 10000.0 * 8 ** (d / (d - 2)), rel_tol=1e-12)


def test_yarn_parameters():
    config = _config()
    apply_extension(config, plan_extension(config, "yarn", target_length=2048, options={"beta_fast": 16}))
    p = config.rope_parameters
    assert p["rope_type"] == "yarn" and p["factor"] == 8.0 and p["original_max_position_embeddings"] == 256
    assert p["beta_fast"] == 16
    _, attention_scaling = ROPE_INIT_FUNCTIONS["yarn"](config)
    assert math.isclose(attention_scaling, 0.1 * math.log(8.0) + 1.0, rel_tol=1e-6)


def test_bad_extension_settings():
    config = _config()
    with pytest.raises(ExtensionError, match="shorter than the original length 256"):
        plan_extension(config, "linear", target_length=128)
    with pytest.raises(ExtensionError, match="unknown beta_fastest"):
        apply_extension(config, plan_extension(config, "yarn", target_length=512,
                                               options={"beta_fastest": 1}))
    with pytest.raises(ExtensionError, match="head_dim/2 = 16"):
        apply_extension(config, plan_extension(config, "longrope", target_length=512,
                                               options={"short_factor": [1.0], "long_factor": [1.0]}))
