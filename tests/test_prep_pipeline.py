"""data_prep end to end: round trips for every packing strategy, determinism, mixing, synthetic tasks,
shards + merge, the CLI, and every bad-input case. Small corpora made here or the embedded corpus."""

from __future__ import annotations

import json
import os
import sysconfig
from collections import defaultdict
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml

from longtune.data_prep.api import config_from_dict, merge_shards, prepare_corpus
from longtune.data_prep.packing import PACKING_STRATEGIES
from longtune.train.commands.prep import main as prep_main

BOS, EOS, PAD = 1, 2, 0


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from longtune.train.tokenizer import embedded_tokenizer

    path = tmp_path_factory.mktemp("tok")
    embedded_tokenizer().save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def encode(tokenizer, text: str) -> list[int]:
    return [BOS, *tokenizer.encode(text, add_special_tokens=False).ids, EOS]


def make_docs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    from longtune.data_prep.embedded import embedded_documents

    pool = embedded_documents()
    docs = []
    for _ in range(n):
        k = int(rng.integers(1, 4))
        docs.append("\n\n".join(pool[int(i)] for i in rng.integers(0, len(pool), size=k)))
    return docs


def packed_documents(ds):
    """(source, ids, loss_mask) of every non-padding document piece of a packed corpus, in row order."""
    for row in ds:
        start = 0
        for n, s in zip(row["doc_lens"], row["source"], strict=False):
            ids, mask = row["input_ids"][start:start + n], row["loss_mask"][start:start + n]
            start += n
            if s != "<pad>":
                yield s, ids, mask


def run(tok_dir, tmp_path, sources, **kw) -> tuple[datasets.Dataset, dict]:
    cfg = {"output": str(tmp_path / kw.pop("name", "out")), "tokenizer": str(tok_dir), "seq_len": 512,
           "progress": False, "plots": False, "sources": sources, **kw}
    result = prepare_corpus(config_from_dict(cfg))
    return datasets.load_from_disk(str(result.output)), result.metadata


def documents_from_rows(ds) -> dict[int, list[int]]:
    """Split every row by doc_lens and join the pieces of each document in row order."""
    docs: dict[int, list[int]] = defaultdict(list)
    for row in ds:
        assert sum(row["doc_lens"]) == len(row["input_ids"])
        start = 0
        for n, idx in zip(row["doc_lens"], row["doc_index"], strict=False):
            if idx >= 0:
                docs[idx].extend(row["input_ids"][start:start + n])
            start += n
    return docs


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    texts = make_docs(60, 0)
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts[:40])))
    (root / "txt").mkdir()
    for i, t in enumerate(texts[40:]):
        (root / "txt" / f"{i:03d}.txt").write_text(t)
    return root, texts


@pytest.mark.parametrize("strategy", sorted(PACKING_STRATEGIES))
@pytest.mark.parametrize("pad", [1, 8])
def test_round_trip_every_strategy(tok_dir, tokenizer, tmp_path, mixed_inputs, strategy, pad):
    root, texts = mixed_inputs
    sources = [{"type": "jsonl", "name": "j", "paths": [str(root / "a.jsonl")]},
               {"type": "text", "name": "t", "paths": [str(root / "txt")]}]
    ds, meta = run(tok_dir, tmp_path, sources, strategy=strategy, pad_to_multiple=pad, seq_len=512)
    want = [encode(tokenizer, t) for t in texts]  # independent reference: the tokenizer itself
    got = documents_from_rows(ds)
    assert sorted(got) == list(range(len(want)))  # every document exactly once, none invented
    assert [got[i] for i in range(len(want))] == want  # and each one complete, in order
    lens = [len(r) for r in ds["input_ids"]]
    assert max(lens) <= 512 and all(n % pad == 0 for n in lens)
    if strategy == "concat":
        assert all(n == 512 for n in lens[:-1])
    assert meta["truncated_tokens"] == 0 and meta["dropped"] == {}
    assert meta["content_tokens"] == sum(map(len, want))
    assert {s for row in ds["source"] for s in row} <= {"j", "t", "<pad>"}
    if pad > 1:
        for row in ds:  # padding is its own piece and is never a target
            if row["source"][-1] == "<pad>":
                assert set(row["loss_mask"][-row["doc_lens"][-1]:]) == {0}


def test_best_fit_splits_fewer_documents_than_concat(tok_dir, tmp_path, mixed_inputs):
    root, _ = mixed_inputs
    src = [{"type": "jsonl", "name": "j", "paths": [str(root / "a.jsonl")]}]
    _, bfd = run(tok_dir, tmp_path, src, strategy="bfd", name="b")
    _, cat = run(tok_dir, tmp_path, src, strategy="concat", name="c")
    assert bfd["documents_split"] < cat["documents_split"]


def test_drop_last_is_reported_not_silent(tok_dir, tmp_path, mixed_inputs):
    root, _ = mixed_inputs
    src = [{"type": "jsonl", "name": "j", "paths": [str(root / "a.jsonl")]}]
    ds, meta = run(tok_dir, tmp_path, src, strategy="concat", drop_last=True, shuffle=False)
    assert meta["truncated_tokens"] > 0
    kept = sum(map(len, ds["input_ids"]))
    assert meta["truncated_tokens"] == meta["content_tokens"] + meta["truncated_tokens"] - kept
    assert meta["dropped"]["drop_last"] >= 1


def test_identical_hash_across_runs_and_worker_counts(tok_dir, tmp_path, mixed_inputs):
    root, _ = mixed_inputs
    src = [{"type": "jsonl", "name": "j", "paths": [str(root / "a.jsonl")],
            "upsample": {"threshold": 3000, "keep_prob": 0.5}},
           {"type": "text", "name": "t", "paths": [str(root / "txt")]},
           {"type": "passkey", "name": "pk", "samples": 4, "length_tokens": 300}]
    hashes = []
    for name, workers, batch in (("r1", 1, 1 << 20), ("r2", 1, 1 << 20), ("r3", 2, 20_000)):
        ds, meta = run(tok_dir, tmp_path, src, name=name, workers=workers, batch_chars=batch, strategy="concat")
        hashes.append(meta["content_hash"])
        assert len(ds) > 0
    assert hashes[0] == hashes[1] == hashes[2]


def test_token_shares_and_length_upsampling(tok_dir, tokenizer, tmp_path, mixed_inputs):
    root, texts = mixed_inputs
    src = [{"type": "jsonl", "name": "j", "paths": [str(root / "a.jsonl")], "weight": {"share": 0.5},
            "upsample": {"threshold": 1500, "keep_prob": 0.3}},
           {"type": "text", "name": "t", "paths": [str(root / "txt")], "weight": {"share": 0.5}}]
    ds, meta = run(tok_dir, tmp_path, src)
    j, t = meta["sources"]
    for s in (j, t):
        assert abs(s["achieved_share"] - 0.5) < 0.15, s
    assert abs(j["achieved_tokens"] + t["achieved_tokens"] - meta["content_tokens"]) == 0
    # Fu-style: short documents are down-sampled, long ones are never dropped for length
    assert j["dropped"].get("length_upsampling", 0) > 0
    # which of the 40 jsonl documents were written (their ids are unique), and their content lengths
    ordinal_of = {tuple(encode(tokenizer, text)): i for i, text in enumerate(texts[:40])}
    kept_j = sorted(ordinal_of[tuple(ids)] for ids in documents_from_rows(ds).values() if tuple(ids) in ordinal_of)
    n_content = [len(encode(tokenizer, text)) - 2 for text in texts[:40]]
    before_budget = range(kept_j[-1] + 1)  # the share budget only cuts off a tail of documents
    long_docs = [i for i in before_budget if n_content[i] >= 1500]
    short_docs = [i for i in before_budget if n_content[i] < 1500]
    assert long_docs and short_docs
    assert set(long_docs) <= set(kept_j)  # every long document is kept
    assert 0 < len(set(short_docs) - set(kept_j)) < len(short_docs)  # short ones: some dropped, some kept
    assert len(kept_j) == j["documents_kept"]
    src2 = [{"type": "jsonl", "name": "j", "paths": [str(root / "a.jsonl")], "min_tokens": 1500, "max_tokens": 6000}]
    ds2, meta2 = run(tok_dir, tmp_path, src2, name="f")
    for ids in documents_from_rows(ds2).values():
        assert 1500 <= len(ids) - 2 <= 6000
    d = meta2["sources"][0]["dropped"]
    assert d.get("too_short", 0) + d.get("too_long", 0) + meta2["documents"] == 40


def test_token_budget(tok_dir, tmp_path, mixed_inputs):
    root, _ = mixed_inputs
    src = [{"type": "jsonl", "name": "j", "paths": [str(root / "a.jsonl")], "weight": {"tokens": 5000}}]
    ds, meta = run(tok_dir, tmp_path, src)
    s = meta["sources"][0]
    assert s["stopped_at_budget"] and 5000 <= s["achieved_tokens"] < 5000 + 20000


def test_synthetic_passkey_and_needles(tok_dir, tokenizer, tmp_path):
    src = [{"type": "passkey", "name": "pk", "samples": 3, "length_tokens": 700},
           {"type": "needle", "name": "nd", "samples": 3, "length_tokens": 700, "needles": 3}]
    ds, meta = run(tok_dir, tmp_path, src, seq_len=1024, strategy="bfd")
    assert "loss_mask" in ds.column_names
    seen = 0
    for _, ids, mask in packed_documents(ds):
        answer = tokenizer.decode([i for i, m in zip(ids, mask, strict=False) if m])
        prompt = tokenizer.decode([i for i, m in zip(ids, mask, strict=False) if not m])
        values = [v.strip(" .") for v in answer.split(",")]
        assert values and all(v.isdigit() for v in values), answer
        for v in values:  # each answer is hidden in the haystack, and is the only target
            assert v in prompt
        assert mask[0] == 0 and mask[-1] == 0  # BOS and EOS are not targets
        seen += 1
    assert seen == 6


def test_landmark_passkey_samples_are_the_eval_prompt(tok_dir, tmp_path):
    """`prompt: landmark` samples are exactly `longtune eval`'s passkey prompt (built independently by the
    eval code from the sample's own key and needle position) plus the answer; lengths within the range;
    `loss: all` puts every token of the sample in the loss."""
    from transformers import PreTrainedTokenizerFast

    from longtune.train.evaluate.passkey import build_prompt

    hf_tok = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    src = [{"type": "passkey", "name": "pk", "prompt": "landmark", "samples": 6, "min_length_tokens": 100,
            "length_tokens": 300}]
    ds, _ = run(tok_dir, tmp_path, src, seq_len=512, strategy="bfd")
    lengths = []
    for _, ids, mask in packed_documents(ds):
        answer = [i for i, m in zip(ids, mask, strict=False) if m]
        key = int(hf_tok.decode(answer).strip(" ."))
        prompt = ids[:len(ids) - len(answer) - 1]
        assert ids[-1] == EOS and mask[len(prompt):len(prompt) + len(answer)] == [1] * len(answer)
        units = hf_tok.decode(prompt).count("The grass is green")
        depth_units = hf_tok.decode(prompt).split("The pass key is")[0].count("The grass is green")
        for length in range(len(prompt), len(prompt) + 60):  # the eval prompt with as many filler units
            ref = build_prompt(hf_tok, length, depth_units / units if units else 0.0, key)
            if ref.input_ids == prompt:
                break
        else:
            raise AssertionError(f"sample with key {key} is not an eval prompt: {hf_tok.decode(prompt)!r}")
        lengths.append(len(prompt))
    assert len(lengths) == 6 and all(100 - 40 <= n <= 300 for n in lengths) and len(set(lengths)) > 1

    src[0]["loss"] = "all"
    ds, _ = run(tok_dir, tmp_path, src, seq_len=512, strategy="bfd", name="all")
    for row in ds:
        real = sum(n for n, s in zip(row["doc_lens"], row["source"], strict=False) if s != "<pad>")
        assert sum(row["loss_mask"]) == real


def test_text_documents_mixed_with_synthetic_ones_keep_their_loss(tok_dir, tmp_path):
    """A loss_mask column exists once a synthetic source is mixed in; text documents stay all targets."""
    src = [{"type": "embedded", "name": "text", "weight": {"tokens": 3000}},
           {"type": "passkey", "name": "pk", "samples": 3, "length_tokens": 200}]
    ds, _ = run(tok_dir, tmp_path, src, seq_len=512, strategy="bfd")
    per_source: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for source, ids, mask in packed_documents(ds):
        per_source[source][0] += sum(mask)
        per_source[source][1] += len(ids)
    assert per_source["text"][0] == per_source["text"][1] > 0
    assert 0 < per_source["pk"][0] < per_source["pk"][1] / 10


def test_synthetic_length_range_is_checked(tok_dir, tmp_path):
    src = [{"type": "passkey", "name": "pk", "samples": 2, "min_length_tokens": 400, "length_tokens": 300}]
    with pytest.raises(Exception, match="min_length_tokens 400 is larger than length_tokens 300"):
        run(tok_dir, tmp_path, src)


def test_shards_merge_to_every_document_once(tok_dir, tokenizer, tmp_path, mixed_inputs):
    root, texts = mixed_inputs
    src = [{"type": "jsonl", "name": "j", "paths": [str(root / "a.jsonl")]}]
    dirs = []
    for i in range(2):
        run(tok_dir, tmp_path, src, name=f"s{i}", shard={"index": i, "count": 2})
        dirs.append(str(tmp_path / f"s{i}"))
    result = merge_shards(str(tmp_path / "merged"), dirs)
    ds = datasets.load_from_disk(str(result.output))
    got = sorted(map(tuple, documents_from_rows(ds).values()))
    assert got == sorted(tuple(encode(tokenizer, t)) for t in texts[:40])
    assert result.metadata["documents"] == 40


# --- bad input -------------------------------------------------------------------------------

@pytest.fixture
def bad_inputs(tmp_path):
    good = {"text": "A good document about pass keys and long contexts.\n" * 5}
    lines = [json.dumps(good).encode(), b'{"text": "unterminated', json.dumps({"body": "no text field"}).encode(),
             b'{"text": "caf\xe9 latin-1"}', json.dumps({"text": 42}).encode(), json.dumps({"text": "   \n "}).encode(),
             json.dumps(good).encode()]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "empty.txt").write_text("")
    (tmp_path / "txt" / "latin1.txt").write_bytes(b"caf\xe9\n" * 10)
    (tmp_path / "txt" / "ok.txt").write_text("fine text\n" * 20)
    os.symlink(tmp_path / "nowhere", tmp_path / "txt" / "dangling.txt")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    (tmp_path / "rows.csv").write_text("id,body\n1,hello\n")
    return tmp_path


def bad_sources(root: Path) -> list[dict]:
    return [{"type": "jsonl", "name": "j", "paths": [str(root / "bad.jsonl")]},
            {"type": "text", "name": "t", "paths": [str(root / "txt" / "*.txt")]},
            {"type": "parquet", "name": "p", "paths": [str(root / "broken.parquet")]},
            {"type": "csv", "name": "c", "paths": [str(root / "rows.csv")]}]


def test_every_bad_input_is_counted_with_its_reason(tok_dir, bad_inputs, tmp_path):
    ds, meta = run(tok_dir, tmp_path, bad_sources(bad_inputs), name="o")
    by = {s["name"]: s["dropped"] for s in meta["sources"]}
    assert by["j"] == {"malformed_json": 1, "missing_field": 1, "non_utf8": 1, "not_text": 1, "empty": 1}
    assert by["t"] == {"empty": 1, "non_utf8": 1, "unreadable": 1}
    assert by["p"] == {"unreadable": 1}
    assert by["c"] == {"missing_field": 1}
    assert meta["documents"] == 3
    reasons = {(e["source"], e["reason"]) for e in meta["bad_input_examples"]}
    assert ("j", "malformed_json") in reasons and ("t", "unreadable") in reasons
    assert all(e["where"] for e in meta["bad_input_examples"])


@pytest.mark.parametrize("which", [0, 1, 2, 3])
def test_strict_mode_fails_clearly_and_leaves_no_output(tok_dir, bad_inputs, tmp_path, capsys, which):
    cfg = {"output": str(tmp_path / "strict"), "tokenizer": str(tok_dir), "seq_len": 256, "strict": True,
           "progress": False, "plots": False, "sources": [bad_sources(bad_inputs)[which]]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert prep_main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longtune: error:") and "strict" in err[0]
    assert not (tmp_path / "strict").exists() and not (tmp_path / "strict.partial").exists()


def test_cli_config_errors(tok_dir, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "o"), "tokenizer": str(tok_dir), "seq_len": 256,
                                    "sources": [{"type": "embedded", "name": "e", "wieght": 1}]}))
    assert prep_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longtune: error:") and "'weight'" in err and "valid keys here" in err
    assert prep_main([str(path), "sources.0.type=nope"]) == 2
    assert "unknown source type" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "o"), "tokenizer": str(tok_dir), "seq_len": 100,
                                    "pad_to_multiple": 8, "sources": [{"type": "text", "name": "x",
                                                                       "paths": [str(tmp_path / "none*")]}]}))
    assert prep_main([str(path)]) == 2
    assert "not divisible by pad_to_multiple 8" in capsys.readouterr().err
    assert prep_main([str(path), "seq_len=128"]) == 2
    assert "matches no file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_cli_yaml_syntax_error_is_one_line_with_its_position(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("output: o\nsources:\n  - {type: csv, name: c\n  paths: [a]\nseq_len: 3\n")
    assert prep_main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"longtune: error: config {path}:4:") and "invalid YAML" in err[0]


def test_every_document_dropped_is_an_error_unless_allowed(tok_dir, tmp_path, capsys):
    (tmp_path / "a.csv").write_text('title,body\nx,"hello world"\ny,"more text"\n')  # no `text` column
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "o"), "tokenizer": str(tok_dir), "seq_len": 128,
                                    "progress": False, "plots": False,
                                    "sources": [{"type": "csv", "name": "c", "paths": [str(tmp_path / "a.csv")]}]}))
    assert prep_main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longtune: error:") and "0 rows" in err[0], err
    assert "missing_field 1" in err[0] and "allow_empty" in err[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    assert prep_main([str(path), "allow_empty=true"]) == 0
    assert json.loads((tmp_path / "o" / "longtune_corpus.json").read_text())["rows"] == 0
    assert prep_main([str(path), "allow_empty=maybe", "overwrite=true"]) == 2  # validated by the schema
    assert "allow_empty" in capsys.readouterr().err


def test_cli_writes_corpus_metadata_and_plots(tok_dir, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "o"), "tokenizer": str(tok_dir), "seq_len": 1024,
                                    "progress": False, "sources": [{"type": "embedded", "name": "e"}]}))
    assert prep_main([str(path), "strategy=bfd", "sources.0.weight.tokens=60000"]) == 0
    out = capsys.readouterr().out
    assert "fill" in out and "content hash" in out
    meta = json.loads((tmp_path / "o" / "longtune_corpus.json").read_text())
    assert meta["config"]["sources"][0]["weight"] == {"tokens": 60000, "share": None}
    for name in ("doc_lengths.png", "shares.png", "fill.png"):
        assert (tmp_path / "o" / "report" / name).stat().st_size > 1000
    assert prep_main([str(path)]) == 2  # the output exists: refused, not overwritten
    assert "exists" in capsys.readouterr().err


def test_trainer_reads_the_output(tok_dir, tmp_path):
    from longtune.train.data import load_corpus

    _, meta = run(tok_dir, tmp_path, [{"type": "embedded", "name": "e", "weight": {"tokens": 20000}}], seq_len=512)
    ds = load_corpus(str(tmp_path / "out"), None, 512)
    assert len(ds) == meta["rows"]


def test_huge_document_is_pre_split_and_round_trips(tok_dir, tokenizer, tmp_path):
    from longtune.data_prep.embedded import embedded_documents

    text = "\n\n".join(embedded_documents())[:2_000_000]
    (tmp_path / "huge.txt").write_text(text)
    ds, meta = run(tok_dir, tmp_path, [{"type": "text", "name": "h", "paths": [str(tmp_path / "huge.txt")]}],
                   seq_len=4096, max_segment_chars=20_000, batch_chars=200_000)
    (ids,) = documents_from_rows(ds).values()
    # cuts fall where the pre-tokenizer starts a new word anyway: same ids as encoding it whole
    assert ids == encode(tokenizer, text)
    assert meta["documents_split"] == 1


def test_pydoc_topics_round_trips_token_for_token(tok_dir, tokenizer, tmp_path):
    """The standard library's pydoc topics (756 K characters, indented lines): pre-split at the default
    max_segment_chars, prepared ids equal whole-document encoding."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    ds, meta = run(tok_dir, tmp_path, [{"type": "text", "name": "topics", "paths": [str(path)]}],
                   seq_len=8192, strategy="concat", shuffle=False)
    (ids,) = documents_from_rows(ds).values()
    assert ids == encode(tokenizer, path.read_bytes().decode("utf-8"))
    assert meta["content_tokens"] == len(ids) > 200_000


def test_fill_at_32k_on_stdlib_sources(tok_dir, tmp_path):
    lib = sysconfig.get_paths()["stdlib"]
    src = [{"type": "text", "name": "stdlib", "paths": [f"{lib}/*.py", f"{lib}/email/**/*.py", f"{lib}/asyncio/*.py",
                                                         f"{lib}/idlelib/*.py", f"{lib}/test/test_*.py"]}]
    ds, bfd = run(tok_dir, tmp_path, src, seq_len=32768, strategy="bfd", name="b")
    # concatenate-and-chunk on the same documents, in input order, from the same lengths
    lengths = [len(ids) for _, ids in sorted(documents_from_rows(ds).items())]
    cat_split = sum(1 for row in PACKING_STRATEGIES["concat"](lengths, range(len(lengths)), 32768, False)
                    for _, start, n in row if start == 0 and n < lengths[_])
    print(f"bfd fill {bfd['fill_efficiency']:.5f}, split docs bfd {bfd['documents_split']} vs concat "
          f"{cat_split} ({bfd['rows']} rows)")
    assert bfd["fill_efficiency"] >= 0.995
    assert bfd["documents_split"] < cat_split
