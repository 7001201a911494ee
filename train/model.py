"""Building the model: a local HF causal-LM dir of a supported family, or a tiny flavour built from
a config with a seeded random init. Always `use_cache=False` for training (packed inputs need it)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from longtune.data_prep.user_error import UserError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

_TINY_COMMON: dict[str, Any] = dict(
    hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

TINY_FLAVOURS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(model_type="llama", **_TINY_COMMON),
    "tiny-mistral": dict(model_type="mistral", sliding_window=None, **_TINY_COMMON),
    "tiny-qwen2": dict(model_type="qwen2", **_TINY_COMMON),
    "tiny-qwen3": dict(model_type="qwen3", head_dim=32, **_TINY_COMMON),
}
"""Tiny flavours: 2 layers, hidden 128, 4 query / 2 KV heads; the vocabulary is the tokenizer's."""


SHIPPED_MODELS = ("tiny-base-256",)
"""Model dirs shipped with longtune under `recipes/models/` (weights, config, tokenizer, the recipe and
metrics that produced them): `model.name_or_path: tiny-base-256` is the base model of the main job."""


def shipped_model_dir(name: str) -> Path:
    from .recipe import RECIPES_DIR

    return RECIPES_DIR / "models" / name


class ModelSourceError(UserError, ValueError):
    """The model named in the recipe cannot be found or used."""


@dataclass(frozen=True)
class ModelSource:
    name_or_path: str
    is_tiny: bool

    @property
    def model_dir(self) -> str | None:
        return None if self.is_tiny else self.name_or_path


def resolve_model_source(name_or_path: str) -> ModelSource:
    """Check the recipe's model before any heavy work."""
    if name_or_path in TINY_FLAVOURS:
        return ModelSource(name_or_path, is_tiny=True)
    if name_or_path in SHIPPED_MODELS:
        name_or_path = str(shipped_model_dir(name_or_path))
    path = Path(name_or_path)
    if not path.is_dir():
        raise ModelSourceError(f"model.name_or_path {name_or_path!r} is neither a local model dir nor a "
                               f"tiny flavour ({', '.join(TINY_FLAVOURS)}) nor a shipped model "
                               f"({', '.join(SHIPPED_MODELS)}); longtune does not download")
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"model dir {name_or_path!r} has no config.json")
    return ModelSource(str(path), is_tiny=False)


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
"""Weight files `from_pretrained` loads (sharded ones come with their `*.index.json`)."""


def check_model_files(source: ModelSource) -> None:
    """A model dir's files are usable, read cheaply before any worker starts: config.json is a JSON object,
    weights are there (every shard an index names), every safetensors file has a readable header whose
    tensors the file covers (a truncated download fails here)."""
    import json

    if source.is_tiny:
        return
    root = Path(source.name_or_path)
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelSourceError(f"model dir {str(root)!r}: config.json is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelSourceError(f"model dir {str(root)!r}: config.json is not a JSON object")
    weights = sorted({p for pattern in WEIGHT_PATTERNS for p in root.glob(pattern)})
    for index in sorted(root.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelSourceError(f"model dir {str(root)!r}: {index.name} is not a readable weight index "
                                   f"({exc})") from None
        missing = sorted(s for s in shards if not (root / s).is_file())
        if missing:
            raise ModelSourceError(f"model dir {str(root)!r}: {index.name} names missing weight files: "
                                   f"{', '.join(missing)}")
    if not weights:
        raise ModelSourceError(f"model dir {str(root)!r} has a config but no weights (model.safetensors, "
                               "model-*.safetensors or pytorch_model.bin)")
    from safetensors import safe_open

    for path in weights:
        if path.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as exc:  # SafetensorError, OSError: a truncated or foreign file
            raise ModelSourceError(f"model dir {str(root)!r}: {path.name} is not a complete safetensors file "
                                   f"(truncated?): {exc}") from None


def build_config(source: ModelSource, vocab_size: int, overrides: dict[str, Any],
                 trust_remote_code: bool = False) -> PretrainedConfig:
    from transformers import AutoConfig

    if source.is_tiny:
        fields = dict(TINY_FLAVOURS[source.name_or_path], vocab_size=vocab_size)
        model_type = fields.pop("model_type")
        config = AutoConfig.for_model(model_type, **fields)
    else:
        try:
            config = AutoConfig.from_pretrained(source.name_or_path, trust_remote_code=trust_remote_code,
                                                local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:  # bad JSON, an unknown model_type, remote code refused
            raise ModelSourceError(f"model dir {source.name_or_path!r}: cannot read its config "
                                   f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        if config.model_type not in SUPPORTED_FAMILIES:
            log.warning("model_type %r is not one of the tested families (%s)", config.model_type,
                        ", ".join(SUPPORTED_FAMILIES))
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ModelSourceError(f"model.config_overrides: {config.model_type} config has no field {key!r}")
        setattr(config, key, value)
    config.use_cache = False
    return config


def build_model(source: ModelSource, config: PretrainedConfig, *, device: str | torch.device,
                attn_implementation: str, seed: int, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model in fp32 on `device`; `device="meta"` gives the structure only (weights come later).

    The config is deep-copied: transformers mutates it when it sets the attention implementation.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    kwargs = dict(attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                  dtype=torch.float32)
    if str(device) == "meta":
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, **kwargs)
    if source.is_tiny:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        return model.to(device)
    model = AutoModelForCausalLM.from_pretrained(source.name_or_path, config=config, local_files_only=True, **kwargs)
    return model.to(device)
