"""LongRoPE search: starting points equal the published formulas, the legal space is monotone and
bounded, the search never ends worse than its PI/NTK/YaRN starts, and its export runs in transformers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoConfig, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from longtune.train.commands.longrope_search import main
from longtune.train.extension import apply_extension, plan_extension
from longtune.train.longrope import ScaledRotary, legalize, ntk_factors, pi_factors, yarn_factors


def _config(d=64, b=10000.0, L=2048):
    return LlamaConfig(hidden_size=4 * d, num_attention_heads=4, num_key_value_heads=2, head_dim=d,
                       intermediate_size=64, num_hidden_layers=1, vocab_size=32, max_position_embeddings=L,
                       rope_parameters={"rope_type": "default", "rope_theta": b})


@pytest.mark.parametrize("method", ["linear", "ntk", "yarn"])
@pytest.mark.parametrize("s", [2.0, 8.0])
def test_starting_factors_reproduce_pi_ntk_yarn(method, s):
    d, b, L = 64, 10000.0, 2048
    theta = b ** (-2.0 * np.arange(d // 2) / d)
    factors = {"linear": pi_factors, "ntk": ntk_factors}.get(method)
    lam = factors(d // 2, s) if factors else yarn_factors(d // 2, s, b, L)
    config = _config(d, b, L)
    apply_extension(config, plan_extension(config, method, target_length=int(L * s)))
    np.testing.assert_allclose(theta / np.array(lam), LlamaRotaryEmbedding(config).inv_freq.double().numpy(),
                               rtol=1e-6)


def test_legalize_is_monotone_bounded_and_on_the_grid():
    rng = np.random.default_rng(0)
    for _ in range(50):
        f = legalize(list(rng.uniform(0.0, 12.0, 16)), 1.0, 5.0)
        assert all(1.0 <= x <= 5.0 for x in f) and list(f) == sorted(f)
        assert all(abs(x * 100 - round(x * 100)) < 1e-6 for x in f)


def test_scaled_rotary_equals_transformers_longrope_beyond_the_original_length():
    d, b, L, s = 32, 10000.0, 256, 4.0
    lam = legalize(list(np.linspace(1.0, 4.5, d // 2)), 1.0, 5.0)
    config = _config(d, b, L)
    apply_extension(config, plan_extension(config, "longrope", 1024, options={"long_factor": list(lam)}))
    pos = torch.arange(600)[None]
    x = torch.zeros(1, 600, 1)
    want = LlamaRotaryEmbedding(config)(x, pos)
    got = ScaledRotary(b, lam, 0, math.sqrt(1 + math.log(s) / math.log(L)), d)(x, pos)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4)  # float32 angles up to 600 rad
    # n̂: the first positions keep the original rotation
    cos, _ = ScaledRotary(b, lam, 8, 1.0, d)(x, pos)
    theta = b ** (-torch.arange(0, d, 2).double() / d)
    torch.testing.assert_close(cos[0, 5, : d // 2].double(), torch.cos(5 * theta), rtol=0, atol=1e-6)
    torch.testing.assert_close(cos[0, 9, : d // 2].double(), torch.cos(9 * theta / torch.tensor(lam).double()),
                               rtol=0, atol=1e-6)


def test_search_on_the_tiny_model_beats_its_starts_and_exports(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "extended"
    rc = main([str(tiny_model_dir), "--target-length", "512", "--out", str(out), "--population", "6",
               "--iterations", "2", "--texts", "1", "--keep-first", "0,4"])
    assert rc == 0
    report = json.loads((out / "longrope_search.json").read_text())
    assert set(report["starting_population"]) == {"pi", "ntk", "yarn"}
    assert report["best_ppl"] <= min(report["starting_population"].values())
    lam = report["long_factor"]
    assert len(lam) == 16 and lam == sorted(lam) and all(1.0 <= x <= 1.25 * 2.0 for x in lam)
    # the dir loads in vanilla transformers and gives the perplexity the search measured
    assert math.isclose(report["exported_ppl_transformers"], report["exported_ppl_search"], rel_tol=1e-4)
    config = AutoConfig.from_pretrained(out)
    assert config.max_position_embeddings == 512
    assert config.rope_parameters["rope_type"] == "longrope"
    assert config.rope_parameters["long_factor"] == lam and config.rope_parameters["short_factor"] == [1.0] * 16
    assert "searched" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["{missing}", "--target-length", "512"], "does not exist or has no config.json"),
    (["{model}", "--target-length", "256"], "must exceed the model's length 256"),
    (["{model}", "--target-length", "512", "--keep-first", "4,x"], "comma-separated integers"),
    (["{model}"], "--target-length"),
])
def test_search_errors(tiny_model_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    argv = [a.format(model=tiny_model_dir, missing=tmp_path / "nope") for a in args] + ["--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("longtune: error:") and message in err
    assert not out.exists()
