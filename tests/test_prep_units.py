"""Small pieces of data_prep on their own: pre-splitting, packing plans, mixing draws, shipped configs."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from longtune.data_prep.config import load_prep_config
from longtune.data_prep.mixing import shard_part, uniform_draw
from longtune.data_prep.packing import PACKING_STRATEGIES, pack_concatenated, plan_best_fit, unpack_documents
from longtune.data_prep.segments import split_stream, split_text

REPO = Path(__file__).resolve().parent.parent


def test_split_text_joins_back_and_bounds_segments():
    rng = random.Random(0)
    text = "".join(rng.choice(["word ", "x\n", "\n\n", "  ", "longwordwithoutspaces" * 5]) for _ in range(20000))
    for max_chars in (1000, 4096):
        segs = list(split_text(text, max_chars))
        assert "".join(segs) == text and max(map(len, segs)) <= max_chars
        chunks = [text[i:i + 777] for i in range(0, len(text), 777)]
        assert list(split_stream(chunks, max_chars)) == segs


@pytest.mark.parametrize("strategy", sorted(PACKING_STRATEGIES))
def test_plans_cover_every_token_once(strategy):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 3000, size=500)
    lengths[[3, 70]] = [9000, 20000]
    rows = list(PACKING_STRATEGIES[strategy](lengths, np.arange(500), 4096, False))
    covered = {}
    for row in rows:
        assert 0 < sum(n for _, _, n in row) <= 4096
        for doc, start, n in row:
            covered.setdefault(doc, []).append((start, n))
    for doc, pieces in covered.items():
        pieces.sort()
        pos = 0
        for start, n in pieces:
            assert start == pos
            pos += n
        assert pos == lengths[doc]
    assert len(covered) == 500


def test_best_fit_is_tight_and_only_splits_overlong_documents():
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 2000, size=5000)
    rows = list(plan_best_fit(lengths, np.arange(5000), 8192))
    assert lengths.sum() / (len(rows) * 8192) > 0.995
    assert all(start == 0 and n == lengths[doc] for row in rows for doc, start, n in row)


def test_pack_concatenated_unchanged():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    rows = list(pack_concatenated(docs, 4, drop_last=False))
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert list(unpack_documents(rows)) == [[1, 2, 3], [4], [5], [6, 7, 8], [9]]


def test_mixing_draws_are_reproducible_and_shards_sum():
    draws = [uniform_draw(0, "web", i) for i in range(20000)]
    assert draws == [uniform_draw(0, "web", i) for i in range(20000)]
    assert abs(np.mean(np.asarray(draws) < 0.1) - 0.1) < 0.01
    assert sum(shard_part(1001, i, 4) for i in range(4)) == 1001


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "prep").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_prep_configs_parse(path):
    cfg = load_prep_config(path)
    assert cfg.sources and cfg.seq_len % cfg.pad_to_multiple == 0


def test_tokenizer_and_config_by_shipped_name(tmp_path, monkeypatch):
    from longtune.data_prep.config import shipped_prep_config
    from longtune.data_prep.tokenization import SHIPPED_DIR, load_tokenizer_spec, resolve_tokenizer_path

    monkeypatch.chdir(tmp_path)  # outside the checkout: repo-relative paths do not exist here
    model = SHIPPED_DIR / "models" / "tiny-base-256"
    assert resolve_tokenizer_path("tiny-base-256") == model
    assert resolve_tokenizer_path("recipes/models/tiny-base-256") == model
    assert load_tokenizer_spec("tiny-base-256").eos_id is not None
    assert resolve_tokenizer_path("no-such-model") == Path("no-such-model")
    assert shipped_prep_config(Path("embedded-smoke")) == SHIPPED_DIR / "prep" / "embedded-smoke.yaml"
    cfg = load_prep_config("embedded-smoke", [f"output={tmp_path / 'o'}"])
    assert resolve_tokenizer_path(cfg.tokenizer) == model
