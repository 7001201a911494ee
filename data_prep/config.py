"""The prep config (`longtune prep CONFIG`): YAML validated by pydantic; unknown keys are errors that
name the valid keys, and dotted `key=value` overrides change any field (`sources.0.weight.share=0.3`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import PrepError
from .yaml_config import apply_overrides as apply_dotted_overrides
from .yaml_config import unknown_key_message


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Weight(Strict):
    """How much of a source goes into the corpus: an absolute token budget or a share of the total."""

    tokens: int | None = Field(None, gt=0, description="token budget of this source")
    share: float | None = Field(None, gt=0, le=1, description="share of the corpus's tokens")

    @model_validator(mode="after")
    def _one_of(self) -> Weight:
        if (self.tokens is None) == (self.share is None):
            raise ValueError("a source weight needs exactly one of `tokens` or `share`")
        return self


class Upsample(Strict):
    """Per-source length upsampling (Fu et al. 2024): documents shorter than `threshold` tokens are
    kept with probability `keep_prob`, so long documents gain share without repeating any."""

    threshold: int = Field(..., gt=0, description="documents with fewer tokens are down-sampled")
    keep_prob: float = Field(..., ge=0, le=1, description="probability of keeping a short document")


class SourceBase(Strict):
    name: str = Field(..., min_length=1, description="name written in the `source` column")
    weight: Weight | None = Field(None, description="token budget or share; none = every document")
    min_tokens: int = Field(0, ge=0, description="drop documents with fewer tokens")
    max_tokens: int | None = Field(None, gt=0, description="drop documents with more tokens")
    upsample: Upsample | None = None


class FileSource(SourceBase):
    paths: list[str] = Field(..., min_length=1, description="files, directories or glob patterns")


class TextSource(FileSource):
    """Plain text: one document per file."""

    type: Literal["text"]
    suffixes: list[str] = Field([".txt", ".md", ".rst", ".py"], description="files taken from directories")


class JsonlSource(FileSource):
    type: Literal["jsonl"]
    text_field: str = "text"


class ParquetSource(FileSource):
    type: Literal["parquet"]
    text_field: str = "text"


class CsvSource(FileSource):
    type: Literal["csv"]
    text_field: str = "text"


class HFSource(SourceBase):
    """A dataset saved with `datasets.Dataset.save_to_disk`."""

    type: Literal["hf"]
    path: str
    text_field: str = "text"


class EmbeddedSource(SourceBase):
    """The embedded default corpus (pydoc topics + stdlib docstrings); no files needed."""

    type: Literal["embedded"]
    split: Literal["all", "train", "heldout"] = Field("all", description="`train` leaves out the held-out "
                                                      "documents (about 1 in 10, fixed by content) that "
                                                      "`longtune eval` measures perplexity on; `heldout` is them")


class SyntheticSource(SourceBase):
    samples: int = Field(..., gt=0, description="number of samples to generate")
    length_tokens: int = Field(..., gt=16, description="haystack tokens per sample (with `prompt: landmark`, "
                                                       "prompt tokens per sample)")
    min_length_tokens: int | None = Field(None, gt=16, description="if set, each sample's length is drawn "
                                                                   "uniformly from [min_length_tokens, length_tokens]")
    haystack: str = Field("embedded", description="name of a text source to draw the haystack from, "
                                                  "or `embedded`")
    loss: Literal["answer", "all"] = Field("answer", description="tokens that carry loss: the answer only, "
                                                                 "or every token of the sample")
    seed: int = 0

    @model_validator(mode="after")
    def _length_range(self):
        if self.min_length_tokens is not None and self.min_length_tokens > self.length_tokens:
            raise ValueError(f"min_length_tokens {self.min_length_tokens} is larger than length_tokens "
                             f"{self.length_tokens}")
        return self


class PasskeySource(SyntheticSource):
    """Passkey retrieval: a number hidden in a haystack (`prompt: corpus`), or the Landmark prompt that
    `longtune eval` scores (`prompt: landmark`: task line, filler sentences, needle, question)."""

    type: Literal["passkey"]
    prompt: Literal["corpus", "landmark"] = Field("corpus", description="haystack of corpus text, or the "
                                                                        "Landmark evaluation prompt")
    key: Literal["number", "word"] = Field("number", description="with `prompt: landmark`: an integer key "
                                           "1-50,000, or a one-token word (`longtune eval --passkey-keys word`)")


class NeedleSource(SyntheticSource):
    """Multi-needle retrieval: several key → value facts hidden in a haystack; loss only on the answer."""

    type: Literal["needle"]
    needles: int = Field(3, gt=0, le=32)


SourceConfig = Annotated[
    TextSource | JsonlSource | ParquetSource | CsvSource | HFSource | EmbeddedSource | PasskeySource | NeedleSource,
    Field(discriminator="type"),
]


class Shard(Strict):
    """This run's part of a multi-machine prep: documents whose ordinal % count == index."""

    index: int = Field(0, ge=0)
    count: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _in_range(self) -> Shard:
        if self.index >= self.count:
            raise ValueError(f"shard.index {self.index} must be < shard.count {self.count}")
        return self


class PrepConfig(Strict):
    output: str = Field(..., description="output dataset dir (written as OUTPUT.partial, renamed at the end)")
    tokenizer: str = Field(..., description="HF tokenizer dir, a tokenizer.json file, or a shipped model's "
                           "name (tiny-base-256)")
    seq_len: int = Field(..., gt=0, description="tokens per row")
    strategy: Literal["concat", "bfd"] = Field("bfd", description="concat = concatenate-and-chunk; "
                                               "bfd = global best-fit decreasing")
    sources: list[SourceConfig] = Field(..., min_length=1)
    total_tokens: int | None = Field(None, gt=0, description="corpus size that `share` weights refer to; "
                                     "none = as large as the scarcest shared source allows")
    add_bos: bool = True
    add_eos: bool = True
    bos_token: str | None = Field(None, description="override of the tokenizer's BOS token")
    eos_token: str | None = None
    pad_token: str | None = None
    pad_to_multiple: int = Field(1, ge=1, description="pad rows to a multiple of this (e.g. 2 × SP degree)")
    drop_last: bool = Field(False, description="concat: drop the last, partial row")
    shuffle: bool = Field(True, description="concat: shuffle document order with `seed`")
    loss_mask: bool | None = Field(None, description="write a loss_mask column; none = only when needed")
    seed: int = 0
    workers: int = Field(1, ge=1, description="tokenizer processes")
    batch_chars: int = Field(1 << 20, gt=0, description="characters per tokenizer task")
    max_segment_chars: int = Field(100_000, ge=1000, description="huge documents are pre-split, where "
                                   "the tokenizer starts a new word, into segments of at most this many characters")
    strict: bool = Field(False, description="stop at the first bad input instead of counting it")
    allow_empty: bool = Field(False, description="write a corpus of 0 rows when every document is dropped "
                              "(otherwise that is an error)")
    progress: bool = True
    plots: bool = True
    overwrite: bool = False
    shard: Shard = Shard()

    @model_validator(mode="after")
    def _cross_checks(self) -> PrepConfig:
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dup)}")
        if self.seq_len % self.pad_to_multiple:
            raise ValueError(f"seq_len {self.seq_len} is not divisible by pad_to_multiple {self.pad_to_multiple}")
        shares = [s.weight.share for s in self.sources if s.weight and s.weight.share is not None]
        if sum(shares) > 1 + 1e-9:
            raise ValueError(f"source shares sum to {sum(shares):.4f} > 1")
        if shares and self.total_tokens is None and len(shares) != len(self.sources):
            raise ValueError("token shares without total_tokens need a share on every source")
        for s in self.sources:
            if isinstance(s, SyntheticSource) and s.haystack != "embedded" and s.haystack not in names:
                raise ValueError(f"source {s.name!r}: haystack {s.haystack!r} is not a source name "
                                 f"(sources: {', '.join(names)})")
        return self

    def wants_loss_mask(self) -> bool:
        if self.loss_mask is not None:
            return self.loss_mask
        return self.pad_to_multiple > 1 or any(isinstance(s, SyntheticSource) for s in self.sources)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    return apply_dotted_overrides(data, overrides, PrepError)


def load_prep_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PrepConfig:
    """Read, override and validate a prep config; every problem becomes one PrepError. A name that is
    not a file can be a shipped prep config (`longtune prep embedded-smoke`)."""
    path = shipped_prep_config(Path(path))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise PrepError(f"config {path}: cannot read it ({exc})") from None
    except yaml.YAMLError as exc:
        raise PrepError(yaml_error_line(path, exc)) from None
    if not isinstance(data, dict):
        raise PrepError(f"config {path}: the top level must be a mapping, got {type(data).__name__}")
    return config_from_dict(apply_overrides(data, list(overrides)), source=str(path))


def shipped_prep_config(path: Path) -> Path:
    from .tokenization import SHIPPED_DIR

    shipped = SHIPPED_DIR / "prep" / f"{path.name.removesuffix('.yaml')}.yaml"
    return shipped if not path.exists() and path.parent == Path(".") and shipped.is_file() else path


def yaml_error_line(path: Path, exc: yaml.YAMLError) -> str:
    """A YAML syntax error as one line: `config FILE:LINE:COLUMN: invalid YAML: problem (context)`."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{problem} ({context})" if context else problem
    return f"config {where}: invalid YAML: " + " ".join(text.split())


def config_from_dict(data: dict[str, Any], source: str = "config") -> PrepConfig:
    try:
        return PrepConfig.model_validate(data)
    except ValidationError as exc:
        raise PrepError(f"{source}: " + "; ".join(_describe(err, data) for err in exc.errors())) from None


def _describe(err: dict[str, Any], data: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc) or "config"
    if err["type"] == "extra_forbidden":
        return unknown_key_message(loc, _valid_keys(loc[:-1]))
    if err["type"] == "value_error":
        return f"{where}: " + err["msg"].removeprefix("Value error, ") if loc else err["msg"].removeprefix(
            "Value error, ")
    if err["type"] == "union_tag_invalid":
        return f"{where}: unknown source type {err.get('input', {}).get('type')!r}; valid: {', '.join(SOURCE_TYPES)}"
    return f"{where}: {err['msg']} (got {err.get('input')!r})"


SOURCE_TYPES = {cls.model_fields["type"].annotation.__args__[0]: cls
                for cls in (TextSource, JsonlSource, ParquetSource, CsvSource, HFSource, EmbeddedSource,
                            PasskeySource, NeedleSource)}


def _valid_keys(path: list[str]) -> list[str]:
    """Valid keys of the section at `path` (a loc from pydantic: sources.<i>.<type>.field...)."""
    cls: type[BaseModel] = PrepConfig
    i = 0
    while i < len(path):
        name = path[i]
        if name in SOURCE_TYPES and cls is PrepConfig:
            cls = SOURCE_TYPES[name]
        elif name.isdigit():
            pass
        elif name == "sources" and cls is PrepConfig:
            pass
        else:
            field = cls.model_fields.get(name)
            ann = field.annotation if field else None
            args = getattr(ann, "__args__", ())
            sub = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if sub is None:
                return []
            cls = sub
        i += 1
    return list(cls.model_fields)
