"""What every evaluation shares: the model and tokenizer of a dir, the local long text, greedy decoding."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from longtune.data_prep.user_error import UserError

log = logging.getLogger(__name__)


class EvalError(UserError, ValueError):
    """Bad evaluation input (model dir, lengths, depths, tasks)."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_dir: str
    max_position_embeddings: int
    original_length: int
    """Pre-trained length: rope_parameters' original_max_position_embeddings, else max_position_embeddings."""
    rope_parameters: dict
    device: torch.device


def load_model(model_dir: str | Path, device: str = "auto", dtype: str = "float32",
               attn_implementation: str | None = None) -> LoadedModel:
    """The model (eval mode) and tokenizer of an HF dir; `attn_implementation` None: transformers' default."""
    from transformers import AutoModelForCausalLM

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise EvalError(f"model dir {str(path)!r} does not exist or has no config.json")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_model_dir_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                 attn_implementation=attn_implementation)
    model.to(device).eval()
    config = model.config
    rope = dict(getattr(config, "rope_parameters", None) or {})
    original = int(rope.get("original_max_position_embeddings") or config.max_position_embeddings)
    return LoadedModel(model, tokenizer, str(path), int(config.max_position_embeddings), original, rope,
                       torch.device(device))


def load_model_dir_tokenizer(model_dir: Path):
    """The HF tokenizer saved with the model in `model_dir`; a loader failure is one EvalError line."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - any loader failure is one user-facing line
        raise EvalError(f"model dir {str(model_dir)!r}: cannot load its tokenizer ({exc})") from exc


def long_text_documents() -> list[str]:
    """Local long text: the held-out embedded documents (no download), longest first. The shipped
    recipes train on the `train` split, which leaves these out; pass --text FILE for other text."""
    from longtune.data_prep.embedded import embedded_split

    return sorted(embedded_split("heldout"), key=len, reverse=True)


def text_tokens(tokenizer, documents: list[str], n_tokens: int) -> list[int]:
    """The documents tokenized and joined with EOS until `n_tokens` tokens."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for doc in documents:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise EvalError(f"the evaluation text has only {len(ids)} tokens; {n_tokens} are needed")


@torch.no_grad()
def greedy_generate(lm: LoadedModel, input_ids: list[int], max_new_tokens: int) -> str:
    """Greedy continuation, decoded (special tokens skipped). Stops at EOS."""
    ids = torch.tensor([input_ids], device=lm.device)
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=lm.tokenizer.pad_token_id,
                            eos_token_id=lm.tokenizer.eos_token_id)
    return lm.tokenizer.decode(out[0, len(input_ids):].tolist(), skip_special_tokens=True)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]
