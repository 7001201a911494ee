"""Training refuses a packed corpus that `longtune prep` tokenized with another tokenizer."""

from __future__ import annotations

import json

import pytest

from conftest import longtune
from longtune.data_prep.api import config_from_dict, prepare_corpus
from longtune.data_prep.user_error import UserError
from longtune.data_prep.writer import METADATA_FILE
from longtune.train.data import DataError, load_corpus
from longtune.train.tokenizer import embedded_tokenizer


def prep(tokenizer_dir, out) -> None:
    prepare_corpus(config_from_dict({
        "output": str(out), "tokenizer": str(tokenizer_dir), "seq_len": 128, "progress": False, "plots": False,
        "sources": [{"type": "embedded", "name": "e", "weight": {"tokens": 3000}}]}))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """A corpus made with the embedded tokenizer (tiny-smoke's) and one made with a smaller one."""
    root = tmp_path_factory.mktemp("corpora")
    for name, vocab in (("same", 2048), ("other", 1024)):
        embedded_tokenizer(vocab).save_pretrained(str(root / f"tok-{name}"))
        prep(root / f"tok-{name}", root / name)
    return root


def test_same_tokenizer_loads(corpora):
    assert len(load_corpus(str(corpora / "same"), embedded_tokenizer(), 128)) > 0


def test_other_tokenizer_is_one_clear_error(corpora):
    with pytest.raises(DataError, match="tokenized with another tokenizer") as err:
        load_corpus(str(corpora / "other"), embedded_tokenizer(), 128)
    assert isinstance(err.value, UserError) and "tok-other" in str(err.value)


def test_corpus_from_before_the_encoding_fingerprint_is_compared_by_the_full_one(corpora, tmp_path):
    import shutil

    for name, ok in (("same", True), ("other", False)):
        old = tmp_path / name
        shutil.copytree(corpora / name, old)
        meta = json.loads((old / METADATA_FILE).read_text())
        del meta["tokenizer"]["encoding_fingerprint"]
        (old / METADATA_FILE).write_text(json.dumps(meta))
        if ok:
            load_corpus(str(old), embedded_tokenizer(), 128)
        else:
            with pytest.raises(DataError, match="fingerprint"):
                load_corpus(str(old), embedded_tokenizer(), 128)


def test_train_cli_stops_before_training(corpora, tmp_path):
    proc = longtune("train", "tiny-smoke", f"data.path={corpora / 'other'}", f"train.output_dir={tmp_path / 'r'}",
                    "train.seq_len=128", check=False, timeout=180)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("longtune: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "tokenized with another tokenizer" in errors[0]
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
