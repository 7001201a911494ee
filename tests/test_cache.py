"""The on-disk cache of derived text: a hit returns what was stored, a new key rebuilds, and an unusable
or disabled cache still returns the derived value."""

from __future__ import annotations

from longtune.data_prep.cache import cache_key, cached_text


def test_hit_miss_and_new_key(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGTUNE_CACHE_DIR", str(tmp_path))
    builds = []

    def build(value):
        return lambda: builds.append(value) or value

    key = cache_key(["a", "b"])
    assert cached_text("thing", key, build("first")) == "first"
    assert cached_text("thing", key, build("second")) == "first"        # a hit: not rebuilt
    assert cached_text("thing", cache_key(["a", "c"]), build("third")) == "third"
    assert builds == ["first", "third"]
    assert not list(tmp_path.glob(".*.tmp"))                            # no temporary file left behind


def test_disabled_or_unwritable_cache_still_derives(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGTUNE_CACHE_DIR", "")
    assert cached_text("thing", "k", lambda: "x") == "x"
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    monkeypatch.setenv("LONGTUNE_CACHE_DIR", str(blocker / "sub"))
    assert cached_text("thing", "k", lambda: "y") == "y"


def test_embedded_corpus_from_cache_equals_a_fresh_parse(tmp_path, monkeypatch):
    from longtune.data_prep import embedded

    monkeypatch.setenv("LONGTUNE_CACHE_DIR", str(tmp_path))
    embedded.embedded_documents.cache_clear()
    try:
        first = embedded.embedded_documents()                           # parsed and stored
        embedded.embedded_documents.cache_clear()
        second = embedded.embedded_documents()                          # read back
    finally:
        embedded.embedded_documents.cache_clear()
    assert first == second == tuple(embedded._read_documents(embedded._source_files()))
    assert len(list(tmp_path.glob("embedded-corpus-*.json"))) == 1
