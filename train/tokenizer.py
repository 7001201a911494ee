"""Tokenizers: the model dir's own, a user-given one, or the embedded byte-level BPE that the tiny
flavours use, trained in under a second on the embedded corpus (no download)."""

from __future__ import annotations

import functools
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from longtune.data_prep.user_error import UserError

EMBEDDED_VOCAB_SIZE = 2048
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


@functools.lru_cache(maxsize=4)
def _embedded_tokenizer_json(vocab_size: int) -> str:
    """The trained tokenizer's JSON, from longtune's on-disk cache when it holds this corpus, vocabulary
    size and `tokenizers` version (`longtune.data_prep.cache`)."""
    import tokenizers

    from longtune.data_prep.cache import cache_key, cached_text
    from longtune.data_prep.embedded import corpus_fingerprint

    key = cache_key([tokenizers.__version__, str(vocab_size), *SPECIAL_TOKENS.values(), corpus_fingerprint()])
    return cached_text(f"embedded-tokenizer-{vocab_size}", key, lambda: train_embedded_tokenizer_json(vocab_size))


def train_embedded_tokenizer_json(vocab_size: int) -> str:
    """Byte-level BPE trained on the embedded corpus, as JSON (no cache)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from longtune.data_prep.embedded import embedded_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(embedded_documents(), trainer)
    return tok.to_str()


def embedded_tokenizer(vocab_size: int = EMBEDDED_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the embedded corpus; deterministic for a given Python version."""
    from tokenizers import Tokenizer

    fast = Tokenizer.from_str(_embedded_tokenizer_json(vocab_size))
    return PreTrainedTokenizerFast(tokenizer_object=fast, **SPECIAL_TOKENS)


class TokenizerSourceError(UserError, ValueError):
    """A `model.tokenizer` that is not on this machine."""


def check_tokenizer_source(source: str | None) -> None:
    """`model.tokenizer` must be a local dir or a tokenizer.json file: a Hub repo id is refused before
    transformers could try to fetch it (longtune does not download)."""
    if source is None:
        return
    path = Path(source)
    if not (path.is_dir() or (path.is_file() and path.suffix == ".json")):
        raise TokenizerSourceError(f"model.tokenizer {source!r} is neither a local tokenizer dir nor a "
                                   "tokenizer.json file; longtune does not download")


def load_run_tokenizer(source: str | None, model_dir: str | None, trust_remote_code: bool = False
                       ) -> PreTrainedTokenizerBase:
    """`source` (a dir or tokenizer.json) if given, else the model dir's tokenizer, else the embedded one.
    Local files only: nothing is fetched from the Hub."""
    if source is not None:
        check_tokenizer_source(source)
        path = Path(source)
        if path.is_file() and path.suffix == ".json":
            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=True)
    if model_dir is not None:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    return embedded_tokenizer()
