"""Every extension method against an independent implementation of its published formula.

The references below are written from the papers (PI, NTK-aware, dynamic NTK, YaRN code form, llama3,
LongRoPE, ABF) in float64 numpy; the numbers under test are the cos/sin that transformers' rotary
embedding produces from the config we export, after a save → load round trip.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from longtune.train.extension import (
    ExtensionError,
    apply_extension,
    extend_model_dir,
    plan_extension,
)

# ---------------------------------------------------------------- independent references (float64)

def ref_theta(d: int, b: float) -> np.ndarray:
    """θ_i = b^(−2i/d), i = 0 … d/2 − 1."""
    return b ** (-2.0 * np.arange(d // 2) / d)


def ref_pi(d, b, s):
    return ref_theta(d, b) / s  # m → m/s


def ref_ntk(d, b, s):
    return ref_theta(d, b * s ** (d / (d - 2)))


def ref_dynamic(d, b, s, L, seq_len):
    if seq_len <= L:
        return ref_theta(d, b)
    return ref_theta(d, b * (s * seq_len / L - (s - 1)) ** (d / (d - 2)))


def ref_yarn(d, b, s, L, beta_fast=32.0, beta_slow=1.0):
    """YaRN reference-code form: ramp linear in the pair index between the correction dims."""
    def correction_dim(n_rot):  # the pair index whose wavelength fits n_rot times into L
        return d * math.log(L / (n_rot * 2 * math.pi)) / (2 * math.log(b))
    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), d - 1)
    if low == high:
        high += 0.001
    i = np.arange(d // 2)
    ramp = np.clip((i - low) / (high - low), 0.0, 1.0)  # 0: keep (high freq), 1: interpolate (low freq)
    theta = ref_theta(d, b)
    return theta / s * ramp + theta * (1 - ramp), 0.1 * math.log(s) + 1.0


def ref_llama3(d, b, s, L, low=1.0, high=4.0):
    theta = ref_theta(d, b)
    out = np.empty_like(theta)
    for i, t in enumerate(theta):
        wavelength = 2 * math.pi / t
        if wavelength < L / high:
            out[i] = t
        elif wavelength > L / low:
            out[i] = t / s
        else:
            smooth = (L / wavelength - low) / (high - low)
            out[i] = (1 - smooth) * t / s + smooth * t
    return out


def ref_longrope(d, b, factors):
    return ref_theta(d, b) / np.asarray(factors, dtype=np.float64)


def ref_cos_sin(inv_freq, positions, scale=1.0):
    angles = np.outer(positions, inv_freq)
    angles = np.concatenate([angles, angles], axis=1)  # HF rotate_half layout: [θ, θ]
    return np.cos(angles) * scale, np.sin(angles) * scale


# ---------------------------------------------------------------- helpers

GEOMETRIES = [  # (head_dim, base, original length)
    (32, 10000.0, 256),  # the tiny model
    (64, 10000.0, 2048),  # SmolLM-135M-like
    (128, 500000.0, 8192),  # Llama-3-like
]


def _config(d, b, L):
    return LlamaConfig(hidden_size=4 * d, num_attention_heads=4, num_key_value_heads=2, head_dim=d,
                       intermediate_size=64, num_hidden_layers=1, vocab_size=32, max_position_embeddings=L,
                       rope_parameters={"rope_type": "default", "rope_theta": b})


def _roundtrip(config, tmp_path):
    config.save_pretrained(tmp_path)
    return AutoConfig.from_pretrained(tmp_path)


def _cos_sin(config, positions):
    rope = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, len(positions), 1, dtype=torch.float32)
    cos, sin = rope(x, torch.tensor([positions]))
    return cos[0].double().numpy(), sin[0].double().numpy()


def _assert_cos_sin(config, inv_freq, positions, scale=1.0, rtol=2e-5):
    cos, sin = _cos_sin(config, positions)
    ref_cos, ref_sin = ref_cos_sin(inv_freq, positions, scale)
    # float32 angles: absolute error grows with position·inv_freq; compare with a position-aware tolerance
    atol = 4e-6 * max(positions) * scale + 1e-6
    np.testing.assert_allclose(cos, ref_cos, rtol=rtol, atol=atol)
    np.testing.assert_allclose(sin, ref_sin, rtol=rtol, atol=atol)


def _inv_freq(config):
    return LlamaRotaryEmbedding(config).inv_freq.double().numpy()


def _extend(tmp_path, d, b, L, method, s, **kw):
    config = _config(d, b, L)
    apply_extension(config, plan_extension(config, method, target_length=int(L * s), **kw))
    return _roundtrip(config, tmp_path)


FACTORS = [2.0, 4.0, 8.0, 16.0]


# ---------------------------------------------------------------- anchors from the published numbers

def test_references_reproduce_published_numbers():
    # NTK base at |D| 64 for s = 2/4/8 and YaRN ramp bounds 8.1 → 20.1 for |D| 64, b 1e4, L 2048
    # (extension-and-eval.md §1, computed from the papers); √(1/t) for s = 2…32.
    for s, base in ((2, 20452), (4, 41829), (8, 85550)):
        assert round(10000 * s ** (64 / 62)) == base
    fcd = [64 * math.log(2048 / (n * 2 * math.pi)) / (2 * math.log(10000)) for n in (32, 1)]
    assert [round(x, 1) for x in fcd] == [8.1, 20.1]
    assert [round(0.1 * math.log(s) + 1, 3) for s in (2, 4, 8, 16, 32)] == [1.069, 1.139, 1.208, 1.277, 1.347]


# ---------------------------------------------------------------- per-method formula tests

@pytest.mark.parametrize("d,b,L", GEOMETRIES)
@pytest.mark.parametrize("s", FACTORS)
def test_linear_pi(tmp_path, d, b, L, s):
    config = _extend(tmp_path, d, b, L, "linear", s)
    assert config.max_position_embeddings == int(L * s)
    assert config.rope_parameters["rope_theta"] == b
    np.testing.assert_allclose(_inv_freq(config), ref_pi(d, b, s), rtol=1e-6)
    _assert_cos_sin(config, ref_pi(d, b, s), [0, 1, 7, L - 1, int(L * s) - 1])


@pytest.mark.parametrize("d,b,L", GEOMETRIES)
@pytest.mark.parametrize("s", FACTORS)
def test_ntk_aware_base(tmp_path, d, b, L, s):
    config = _extend(tmp_path, d, b, L, "ntk", s)
    assert config.rope_parameters["rope_type"] == "default"
    assert math.isclose(config.rope_parameters["rope_theta"], b * s ** (d / (d - 2)), rel_tol=1e-12)
    np.testing.assert_allclose(_inv_freq(config), ref_ntk(d, b, s), rtol=1e-6)
    _assert_cos_sin(config, ref_ntk(d, b, s), [0, 3, L, int(L * s) - 1])


def test_ntk_alpha_option_overrides_the_base_scale(tmp_path):
    config = _extend(tmp_path, 64, 10000.0, 2048, "ntk", 4.0, options={"alpha": 8.0})
    assert config.max_position_embeddings == 8192
    np.testing.assert_allclose(_inv_freq(config), ref_ntk(64, 10000.0, 8.0), rtol=1e-6)


@pytest.mark.parametrize("d,b,L", GEOMETRIES)
@pytest.mark.parametrize("s", [2.0, 8.0])
def test_dynamic_ntk(tmp_path, d, b, L, s):
    config = _extend(tmp_path, d, b, L, "dynamic", s)
    # transformers rescales relative to max_position_embeddings, which therefore keeps L
    assert config.max_position_embeddings == L and config.rope_parameters["factor"] == s
    for seq_len in (L // 2, L, 3 * L):
        positions = list(range(seq_len))
        rope = LlamaRotaryEmbedding(config)
        cos, _ = rope(torch.zeros(1, seq_len, 1), torch.tensor([positions]))
        ref_cos, _ = ref_cos_sin(ref_dynamic(d, b, s, L, seq_len), positions)
        np.testing.assert_allclose(cos[0].double().numpy(), ref_cos, atol=4e-6 * seq_len + 1e-6)


@pytest.mark.parametrize("d,b,L", GEOMETRIES)
@pytest.mark.parametrize("s", FACTORS)
def test_yarn_ramp_and_temperature(tmp_path, d, b, L, s):
    config = _extend(tmp_path, d, b, L, "yarn", s)
    p = config.rope_parameters
    assert p["original_max_position_embeddings"] == L and p["rope_theta"] == b
    assert config.max_position_embeddings == int(L * s)
    inv, mscale = ref_yarn(d, b, s, L)
    np.testing.assert_allclose(_inv_freq(config), inv, rtol=1e-6)
    assert math.isclose(LlamaRotaryEmbedding(config).attention_scaling, mscale, rel_tol=1e-9)
    # cos and sin carry the attention temperature √(1/t) = 0.1·ln s + 1
    _assert_cos_sin(config, inv, [0, 1, L - 1, int(L * s) - 1], scale=mscale)
    # the first pairs (high frequency) keep their frequency, the last ones are interpolated by s
    theta = ref_theta(d, b)
    assert math.isclose(_inv_freq(config)[0], theta[0], rel_tol=1e-6)
    assert math.isclose(_inv_freq(config)[-1], theta[-1] / s, rel_tol=1e-6)


def test_yarn_beta_options(tmp_path):
    config = _extend(tmp_path, 64, 10000.0, 2048, "yarn", 4.0, options={"beta_fast": 16, "beta_slow": 2})
    inv, _ = ref_yarn(64, 10000.0, 4.0, 2048, beta_fast=16, beta_slow=2)
    np.testing.assert_allclose(_inv_freq(config), inv, rtol=1e-6)
    assert not np.allclose(inv, ref_yarn(64, 10000.0, 4.0, 2048)[0])  # the options matter


@pytest.mark.parametrize("d,b,L", GEOMETRIES)
@pytest.mark.parametrize("s", FACTORS)
def test_llama3_smoothing(tmp_path, d, b, L, s):
    config = _extend(tmp_path, d, b, L, "llama3", s)
    p = config.rope_parameters
    assert (p["low_freq_factor"], p["high_freq_factor"], p["original_max_position_embeddings"]) == (1.0, 4.0, L)
    ref = ref_llama3(d, b, s, L)
    np.testing.assert_allclose(_inv_freq(config), ref, rtol=1e-6)
    _assert_cos_sin(config, ref, [0, 5, L, int(L * s) - 1])


def test_llama3_published_setting(tmp_path):
    # Llama 3.1: factor 8, low 1, high 4, L 8192, θ 500 000; the band in between is smoothed
    config = _extend(tmp_path, 128, 500000.0, 8192, "llama3", 8.0)
    ref = ref_llama3(128, 500000.0, 8.0, 8192)
    theta = ref_theta(128, 500000.0)
    smoothed = (ref != theta) & ~np.isclose(ref, theta / 8)
    assert smoothed.sum() >= 2  # the ramp region is exercised
    np.testing.assert_allclose(_inv_freq(config), ref, rtol=1e-6)


def test_llama3_custom_band(tmp_path):
    config = _extend(tmp_path, 64, 10000.0, 2048, "llama3", 4.0,
                     options={"low_freq_factor": 2.0, "high_freq_factor": 8.0})
    np.testing.assert_allclose(_inv_freq(config), ref_llama3(64, 10000.0, 4.0, 2048, 2.0, 8.0), rtol=1e-6)


@pytest.mark.parametrize("d,b,L", GEOMETRIES)
@pytest.mark.parametrize("s", [2.0, 8.0])
def test_longrope_factors(tmp_path, d, b, L, s):
    rng = np.random.default_rng(int(s) + d)
    long_factor = sorted(float(x) for x in rng.uniform(1.0, 1.25 * s, d // 2))
    short_factor = sorted(float(x) for x in rng.uniform(1.0, 1.5, d // 2))
    config = _extend(tmp_path, d, b, L, "longrope", s,
                     options={"long_factor": long_factor, "short_factor": short_factor})
    p = config.rope_parameters
    assert p["long_factor"] == long_factor and p["short_factor"] == short_factor
    assert config.max_position_embeddings == int(L * s)
    magnitude = math.sqrt(1 + math.log(s) / math.log(L))
    # up to L positions: short factors; beyond: long factors for the whole sequence
    for seq_len, factors in ((L, short_factor), (L + 1, long_factor)):
        positions = list(range(seq_len))
        rope = LlamaRotaryEmbedding(config)
        cos, sin = rope(torch.zeros(1, seq_len, 1), torch.tensor([positions]))
        ref_cos, ref_sin = ref_cos_sin(ref_longrope(d, b, factors), positions, magnitude)
        np.testing.assert_allclose(cos[0].double().numpy(), ref_cos, atol=4e-6 * seq_len + 1e-6)
        np.testing.assert_allclose(sin[0].double().numpy(), ref_sin, atol=4e-6 * seq_len + 1e-6)


@pytest.mark.parametrize("new_base", [500000.0, 5e6])
def test_abf_changes_only_the_base(tmp_path, new_base):
    config = _extend(tmp_path, 64, 10000.0, 2048, "abf", 4.0, rope_theta=new_base)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": new_base}
    assert config.max_position_embeddings == 8192
    np.testing.assert_allclose(_inv_freq(config), ref_theta(64, new_base), rtol=1e-6)


def test_partial_rotary_factor_is_kept_and_used(tmp_path):
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         intermediate_size=64, num_hidden_layers=1, vocab_size=32, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.5})
    apply_extension(config, plan_extension(config, "ntk", target_length=4096))
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    # the NTK exponent uses the rotating dims (32), not the head dim (64)
    assert math.isclose(config.rope_parameters["rope_theta"], 10000.0 * 4 ** (32 / 30), rel_tol=1e-12)


# ---------------------------------------------------------------- export: load in vanilla transformers

ALL_METHODS = {
    "linear": {}, "ntk": {}, "dynamic": {}, "yarn": {}, "llama3": {}, "abf": {"rope_theta": 160000.0},
    "longrope": {"options": {"long_factor": [1.0 + 0.2 * i for i in range(16)]}},
}


@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_exported_dir_loads_and_rope_parameters_survive_save_load_save(tmp_path, tiny_model_dir, method):
    out = tmp_path / "extended"
    params = extend_model_dir(tiny_model_dir, out, method, target_length=1024, **ALL_METHODS[method])
    first = json.loads((out / "config.json").read_text())
    assert first["rope_parameters"] == params
    assert first["rope_parameters"]["rope_theta"] > 0  # never dropped (the rope_scaling pitfall)
    assert first["max_position_embeddings"] == (256 if method == "dynamic" else 1024)

    model = AutoModelForCausalLM.from_pretrained(out)  # vanilla transformers, no remote code
    assert model.config.max_position_embeddings == first["max_position_embeddings"]
    assert model.config.rope_parameters == params
    model.save_pretrained(tmp_path / "again")
    second = json.loads((tmp_path / "again" / "config.json").read_text())
    assert second["rope_parameters"] == first["rope_parameters"]
    assert second["max_position_embeddings"] == first["max_position_embeddings"]

    # the loaded model's rotary embedding computes what the saved parameters say
    reloaded = AutoConfig.from_pretrained(tmp_path / "again")
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, LlamaRotaryEmbedding(reloaded).inv_freq)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 13]])).logits
    assert torch.isfinite(logits).all()


def test_extend_model_dir_refuses_existing_output_and_leaves_nothing_on_error(tmp_path, tiny_model_dir):
    out = tmp_path / "x"
    with pytest.raises(ExtensionError, match="unknown extension method 'pose'"):
        extend_model_dir(tiny_model_dir, out, "pose", target_length=1024)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()
    with pytest.raises(ExtensionError, match="already exists"):
        extend_model_dir(tiny_model_dir, out, "yarn", target_length=1024)


def test_option_and_length_errors():
    config = _config(64, 10000.0, 2048)
    with pytest.raises(ExtensionError, match="unknown beta_fast; valid: none"):
        apply_extension(config, plan_extension(config, "linear", 4096, options={"beta_fast": 3}))
    with pytest.raises(ExtensionError, match="low_freq_factor 4.0 must be below high_freq_factor 2.0"):
        apply_extension(config, plan_extension(config, "llama3", 4096,
                                               options={"low_freq_factor": 4.0, "high_freq_factor": 2.0}))
    with pytest.raises(ExtensionError, match="positive numbers"):
        apply_extension(config, plan_extension(config, "longrope", 4096, options={"long_factor": [0.0] * 32}))
    apply_extension(config, plan_extension(config, "yarn", 4096))
    with pytest.raises(ExtensionError, match="already uses rope_type 'yarn'"):
        plan_extension(config, "yarn", 8192)

