"""Model building: tiny flavours of every family, HF dirs, the meta device, clear errors."""

from __future__ import annotations

import pytest
import torch

from longtune.train.model import (
    TINY_FLAVOURS,
    ModelSourceError,
    build_config,
    build_model,
    resolve_model_source,
)
from longtune.train.tokenizer import embedded_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


def test_embedded_tokenizer_is_deterministic_and_round_trips(tokenizer):
    from tokenizers import Tokenizer

    from longtune.train.tokenizer import train_embedded_tokenizer_json

    trained_now = Tokenizer.from_str(train_embedded_tokenizer_json(len(tokenizer)))  # bypasses the disk cache
    assert trained_now.get_vocab() == tokenizer.get_vocab()
    text = "def passkey(value): return 'The pass key is 71432.'"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0


@pytest.mark.parametrize("flavour", sorted(TINY_FLAVOURS))
def test_tiny_flavours_build_and_run(flavour, tokenizer):
    source = resolve_model_source(flavour)
    config = build_config(source, len(tokenizer), {})
    assert config.model_type == TINY_FLAVOURS[flavour]["model_type"] and config.use_cache is False
    model = build_model(source, config, device="cpu", attn_implementation="sdpa", seed=0)
    again = build_model(source, config, device="cpu", attn_implementation="sdpa", seed=0)
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), f"seeded init differs at {name}"
    ids = torch.randint(3, len(tokenizer), (2, 16))
    logits = model(input_ids=ids).logits
    assert logits.shape == (2, 16, len(tokenizer)) and torch.isfinite(logits).all()
    meta = build_model(source, config, device="meta", attn_implementation="sdpa", seed=0)
    assert all(p.is_meta for p in meta.parameters())


def test_config_overrides(tokenizer):
    source = resolve_model_source("tiny-qwen2")
    config = build_config(source, len(tokenizer), {"num_hidden_layers": 3})
    assert config.num_hidden_layers == 3
    with pytest.raises(ModelSourceError, match="qwen2 config has no field 'num_layerz'"):
        build_config(source, len(tokenizer), {"num_layerz": 3})


def test_hf_dir_source(tmp_path, tokenizer):
    source = resolve_model_source("tiny-mistral")
    config = build_config(source, len(tokenizer), {})
    model = build_model(source, config, device="cpu", attn_implementation="sdpa", seed=1)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    dir_source = resolve_model_source(str(tmp_path))
    assert not dir_source.is_tiny
    loaded = build_model(dir_source, build_config(dir_source, len(tokenizer), {}), device="cpu",
                         attn_implementation="sdpa", seed=99)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSourceError, match="neither a local model dir nor a tiny flavour"):
        resolve_model_source(str(tmp_path / "nope"))
    with pytest.raises(ModelSourceError, match="has no config.json"):
        resolve_model_source(str(tmp_path))
