"""Export: an HF model dir (safetensors, config, tokenizer) that vanilla `from_pretrained` loads."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig


def export_hf_model(state_dict: dict[str, torch.Tensor], config: PretrainedConfig, tokenizer,
                    out_dir: Path, dtype: str = "float32") -> Path:
    """The full `state_dict` (fp32 master weights) written in `dtype` (`train.export_dtype`), its config saying
    so. Written to `out_dir.partial`, then renamed: an export that dies leaves no dir that looks done."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    config = copy.deepcopy(config)
    config.use_cache = True  # training turns the KV cache off; generation wants it back
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict({k: v.to(torch_dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    model.tie_weights()
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return out_dir
