"""Public Python API of data preparation."""

from __future__ import annotations

from .config import PrepConfig, config_from_dict, load_prep_config
from .errors import PrepError
from .pipeline import PrepResult, prepare_corpus
from .shards import merge_shards
from .writer import METADATA_FILE

__all__ = ["METADATA_FILE", "PrepConfig", "PrepError", "PrepResult", "config_from_dict", "load_prep_config",
           "merge_shards", "prepare_corpus"]
