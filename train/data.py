"""Training data: a packed corpus (docs/data_prep.md, "Output") or the embedded default, read in a
seeded order that depends only on (seed, step), never on the number of ranks.

A row becomes model inputs here: labels are shifted on the full row (a label never crosses a
document boundary), position ids restart at every boundary (with PoSE they also skip ahead inside a
document), and short rows are right-padded with ignored labels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from longtune.data_prep.embedded import embedded_documents
from longtune.data_prep.packing import pack_concatenated
from longtune.data_prep.tokenization import encoding_fingerprint
from longtune.data_prep.user_error import UserError
from longtune.data_prep.writer import DOC_LENS_COLUMN, LOSS_MASK_COLUMN, METADATA_FILE, TOKENS_COLUMN
from longtune.parallel.sharding import IGNORE_INDEX

log = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    """A corpus that cannot be used for this recipe."""


def embedded_corpus(tokenizer, seq_len: int) -> datasets.Dataset:
    """The embedded documents, tokenized with BOS/EOS and packed into full rows of `seq_len`."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = tokenizer(list(embedded_documents()), add_special_tokens=False)["input_ids"]
    rows = list(pack_concatenated((bos + ids + eos for ids in encoded), seq_len))
    if not rows:
        raise DataError(f"the embedded corpus is shorter than one row of {seq_len} tokens")
    return datasets.Dataset.from_list(rows)


def load_corpus(path: str | None, tokenizer, seq_len: int) -> datasets.Dataset:
    if path is None:
        return embedded_corpus(tokenizer, seq_len)
    corpus_dir = Path(path)
    if not corpus_dir.is_dir():
        raise DataError(f"data.path {path!r} is not a directory (expected the output of `longtune prep`)")
    try:
        ds = datasets.load_from_disk(str(corpus_dir))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"data.path {path!r} is not a saved dataset: {exc}") from None
    check_tokenizer(corpus_dir, tokenizer)
    missing = {TOKENS_COLUMN, DOC_LENS_COLUMN} - set(ds.column_names)
    if missing:
        raise DataError(f"data.path {path!r} lacks column(s) {', '.join(sorted(missing))}")
    longest = _longest_row(ds)
    if longest > seq_len:
        raise DataError(f"data.path {path!r} has rows of {longest} tokens, longer than train.seq_len {seq_len}")
    return ds


def check_tokenizer(corpus_dir: Path, tokenizer) -> None:
    """Refuse a corpus that `longtune prep` tokenized with another tokenizer than training's: its ids
    would be read as other tokens. Compared by `encoding_fingerprint` (the tokenizer JSON's full hash for
    corpora written before it was recorded); a dataset without prep metadata is not checked."""
    meta_file = corpus_dir / METADATA_FILE
    if not meta_file.is_file():
        return
    try:
        recorded = json.loads(meta_file.read_text()).get("tokenizer") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"data.path {str(corpus_dir)!r}: unreadable {METADATA_FILE} ({exc})") from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not recorded:
        log.warning("data.path %s: tokenizer not compared with the corpus's (no fast tokenizer or no record)",
                    corpus_dir)
        return
    current = backend.to_str()
    if "encoding_fingerprint" in recorded:
        key, mine = "encoding_fingerprint", encoding_fingerprint(current)
    else:
        key, mine = "fingerprint", hashlib.sha256(current.encode()).hexdigest()[:16]
    if recorded.get(key) != mine:
        used = getattr(tokenizer, "name_or_path", "") or "the embedded tokenizer"
        raise DataError(f"data.path {str(corpus_dir)!r} was tokenized with another tokenizer "
                        f"({recorded.get('path')}, {key} {recorded.get(key)}) than training uses ({used}, "
                        f"{mine}); prepare it again with this tokenizer, or train the model it was made for")


def _longest_row(ds: datasets.Dataset) -> int:
    """Longest `input_ids` row, computed on the Arrow column without materializing Python lists."""
    import pyarrow.compute as pc

    if len(ds) == 0:
        return 0
    column = ds.data.column(TOKENS_COLUMN)
    return int(pc.max(pc.list_value_length(column)).as_py())


@dataclass
class MicroBatch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    real_mask: torch.Tensor
    """True for input tokens that are not padding."""

    @property
    def real_tokens(self) -> int:
        return int(self.real_mask.sum())

    @property
    def counted_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> MicroBatch:
        return MicroBatch(self.input_ids.to(device), self.labels.to(device), self.position_ids.to(device),
                          self.real_mask)


def pose_positions(length: int, target_length: int, chunks: int, rng: random.Random) -> list[int]:
    """PoSE position ids (Zhu et al. 2023) for one document of `length` tokens.

    The document is cut into `chunks` contiguous chunks at uniformly drawn points (every chunk at least one
    token); chunk i keeps consecutive positions shifted by a skip u_i, with u_0 = 0 and u_i drawn uniformly
    from [u_{i-1}, target_length - length] as in the paper. Positions therefore start at 0, increase
    strictly, count up by one inside a chunk, and stay below `target_length`."""
    n = min(chunks, length)
    room = target_length - length
    if n < 2 or room <= 0:
        return list(range(length))
    cuts = [0, *sorted(rng.sample(range(1, length), n - 1)), length]
    positions, skip = [], 0
    for i in range(n):
        if i:
            skip = rng.randint(skip, room)
        positions.extend(range(cuts[i] + skip, cuts[i + 1] + skip))
    return positions


@dataclass(frozen=True)
class PoseSpec:
    """PoSE settings of a run: rows of train.seq_len whose positions span `target_length`."""

    chunks: int
    target_length: int
    seed: int

    def rng(self, stream_pos: int) -> random.Random:
        """The skips of the row at `stream_pos` of the data stream: seeded by (seed, position) only, so
        they do not depend on the number of ranks and repeat exactly on resume."""
        return random.Random(f"pose:{self.seed}:{stream_pos}")


def row_to_example(input_ids: list[int], doc_lens: list[int], document_masking: bool,
                   loss_mask: list[int] | None = None, pose: tuple[PoseSpec, random.Random] | None = None
                   ) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, position_ids) for one packed row; labels are already shifted.

    With `pose`, every document (the whole row without document masking) gets PoSE positions."""
    labels = list(input_ids[1:]) + [IGNORE_INDEX]
    positions: list[int] = []

    def doc_positions(n: int) -> list[int]:
        return pose_positions(n, pose[0].target_length, pose[0].chunks, pose[1]) if pose else list(range(n))

    if document_masking:
        end = 0
        for n in doc_lens:
            end += n
            labels[end - 1] = IGNORE_INDEX  # the last token of a piece predicts nothing
            positions.extend(doc_positions(n))
    else:
        positions = doc_positions(len(input_ids))
    if loss_mask is not None:
        # loss_mask marks the tokens that count as targets.
        labels = [lab if i + 1 < len(loss_mask) and loss_mask[i + 1] else IGNORE_INDEX
                  for i, lab in enumerate(labels)]
    return list(input_ids), labels, positions


def collate(rows: list[dict], pad_id: int, document_masking: bool, pose: PoseSpec | None = None,
            stream_positions: list[int] | None = None) -> MicroBatch:
    """`stream_positions` (the rows' places in the data stream) seed PoSE's skips."""
    examples = [row_to_example(r[TOKENS_COLUMN], r[DOC_LENS_COLUMN], document_masking, r.get(LOSS_MASK_COLUMN),
                               (pose, pose.rng(stream_positions[i])) if pose else None)
                for i, r in enumerate(rows)]
    width = max(len(ids) for ids, _, _ in examples)
    ids_t = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos_t = torch.zeros((len(rows), width), dtype=torch.long)
    real_t = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, labels, positions) in enumerate(examples):
        n = len(ids)
        ids_t[i, :n] = torch.tensor(ids)
        lab_t[i, :n] = torch.tensor(labels)
        pos_t[i, :n] = torch.tensor(positions)
        real_t[i, :n] = True
        # Padding continues as one more "document" so it never joins a real one.
        pos_t[i, n:] = torch.arange(width - n)
    return MicroBatch(ids_t, lab_t, pos_t, real_t)


class StepBatches:
    """The micro-batches of one optimizer step for one data-parallel rank.

    Step `s` takes rows `[s·G, (s+1)·G)` of an endless stream that is a fresh seeded permutation
    of the corpus every epoch; dp rank `r` takes the `r`-th contiguous slice of `G / dp` rows and
    splits it into micro-batches. The union over ranks is the same for every dp degree.
    """

    def __init__(self, corpus: datasets.Dataset, *, seed: int, global_batch: int, micro_batch: int,
                 dp: int, dp_rank: int, pad_id: int, document_masking: bool, pose: PoseSpec | None = None) -> None:
        if len(corpus) == 0:
            raise DataError("the corpus has no rows")
        self.corpus, self.seed = corpus, seed
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp, self.dp_rank = dp, dp_rank
        self.pad_id, self.document_masking, self.pose = pad_id, document_masking, pose
        self._perms: dict[int, list[int]] = {}

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.dp * self.micro_batch)

    def _row_index(self, stream_pos: int) -> int:
        epoch, offset = divmod(stream_pos, len(self.corpus))
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.corpus), generator=gen).tolist()}
        return self._perms[epoch][offset]

    def for_step(self, step: int) -> list[MicroBatch]:
        per_rank = self.global_batch // self.dp
        start = step * self.global_batch + self.dp_rank * per_rank
        indices = [self._row_index(start + i) for i in range(per_rank)]
        batches = []
        for m in range(0, per_rank, self.micro_batch):
            rows = [self.corpus[j] for j in indices[m:m + self.micro_batch]]
            stream = list(range(start + m, start + m + len(rows)))
            batches.append(collate(rows, self.pad_id, self.document_masking, self.pose, stream))
        return batches
