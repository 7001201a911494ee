"""Prep throughput and memory: `longtune prep` tokens/s per core against raw tokenizer encoding of the
same text in the same run, and peak RSS at 1× and 4× corpus size.

    OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false python benchmarks/prep_throughput.py [--mb 8]

The corpus is the embedded corpus (pydoc topics + stdlib docstrings) written as text files, repeated
to reach the size; the tokenizer is the embedded tiny one. Each prep runs in a fresh subprocess with
one worker, so its peak RSS (ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from longtune.data_prep.api import load_prep_config, prepare_corpus
t = time.perf_counter()
res = prepare_corpus(load_prep_config(sys.argv[1]))
wall = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mib": ru.ru_maxrss / 1024,
                  "tokens": res.metadata["content_tokens"], "fill": res.metadata["fill_efficiency"]}))
"""


def write_corpus(root: Path, mb: float) -> int:
    from longtune.data_prep.embedded import embedded_documents

    docs = list(embedded_documents())
    root.mkdir(parents=True)
    size, i = 0, 0
    while size < mb * 1e6:
        text = docs[i % len(docs)] + f"\n(copy {i // len(docs)})\n"
        (root / f"{i:07d}.txt").write_text(text)
        size += len(text.encode())
        i += 1
    return size


def raw_encode_tokens_per_s(root: Path, tok_json: Path) -> tuple[float, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_json))
    texts = [p.read_text() for p in sorted(root.iterdir())]
    t = time.process_time()
    n = 0
    for k in range(0, len(texts), 256):
        n += sum(len(e.ids) for e in tok.encode_batch_fast(texts[k:k + 256], add_special_tokens=False))
    return n / (time.process_time() - t), n


def run_prep(root: Path, tok_dir: Path, out: Path, seq_len: int) -> dict:
    cfg = out.with_suffix(".yaml")
    cfg.write_text(json.dumps({"output": str(out), "tokenizer": str(tok_dir), "seq_len": seq_len,
                               "strategy": "bfd", "progress": False, "plots": False, "workers": 1,
                               "sources": [{"type": "text", "name": "corpus", "paths": [str(root)]}]}))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(cfg)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=8.0, help="size of the 1× corpus in MB")
    parser.add_argument("--seq-len", type=int, default=32768)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from longtune.train.tokenizer import embedded_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        embedded_tokenizer().save_pretrained(str(tmp / "tok"))
        rows = []
        for scale in (1, 4):
            root = tmp / f"corpus{scale}"
            size = write_corpus(root, args.mb * scale)
            raw_tps, _ = raw_encode_tokens_per_s(root, tmp / "tok" / "tokenizer.json")
            prep = run_prep(root, tmp / "tok", tmp / f"out{scale}", args.seq_len)
            rows.append((scale, size / 1e6, prep["tokens"], raw_tps, prep["tokens"] / prep["cpu_s"],
                         prep["peak_rss_mib"], prep["fill"]))
    print("| corpus | MB | tokens | raw encode tok/s/core | prep tok/s/core | prep / raw | peak RSS MiB | fill |")
    print("|---|---|---|---|---|---|---|---|")
    for scale, mb, tokens, raw, prep, rss, fill in rows:
        print(f"| {scale}× | {mb:.1f} | {tokens:,} | {raw:,.0f} | {prep:,.0f} | {prep / raw:.2f} | {rss:.0f} | "
              f"{100 * fill:.3f} % |")


if __name__ == "__main__":
    main()
