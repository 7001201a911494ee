"""Prep throughput and memory: `longtune prep` tokens/s per core against raw tokenizer encoding of the
same text in the same run, and peak RSS at 1×, 4× and 16× corpus size.

    OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false python benchmarks/prep_throughput.py [--mb 8] [--scales 1 4 16]

The corpus is the embedded corpus (pydoc topics + stdlib docstrings) written as text files, repeated
to reach the size; the tokenizer is the embedded tiny one.

Raw: `tokenizers` `encode_batch_fast` over the corpus's texts (already in memory), 256 at a time, CPU time
(`time.process_time`) of the encode calls only. Prep: `prepare_corpus(load_prep_config(...))` with one
worker in a fresh subprocess, CPU time measured inside that process around the call, so Python interpreter
and library start-up (imports, ~3 s, paid once per process whatever the corpus size) are excluded and shown
apart; everything prep does is included: listing and reading the files, tokenizing, the token store,
packing, hashing and writing the Arrow files. One worker means no child processes, so process_time is all
of prep's CPU. Both rates are over the same text tokens (prep's bos/eos are not counted). The two are
measured alternately `--repeats` times and the best (least disturbed) time of each is reported, because
other jobs on a shared machine slow both down by tens of percent from one run to the next; "each repeat"
lists the ratio of every raw/prep pair too. Peak RSS is the
prep subprocess's own high-water mark (VmHWM; the largest over the repeats), start-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from longtune.data_prep.api import load_prep_config, prepare_corpus
t, w = time.process_time(), time.perf_counter()
res = prepare_corpus(load_prep_config(sys.argv[1]))
cpu, wall = time.process_time() - t, time.perf_counter() - w
ru = resource.getrusage(resource.RUSAGE_SELF)
# VmHWM: the peak RSS of this process image. (ru_maxrss is not: Linux carries the parent's peak over
# fork + exec, and the parent holds the whole corpus's text for the raw measurement.)
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "startup_cpu_s": ru.ru_utime + ru.ru_stime - cpu,
                  "peak_rss_mib": (hwm[0] if hwm else ru.ru_maxrss) / 1024, "tokens": res.metadata["content_tokens"],
                  "fill": res.metadata["fill_efficiency"], "hash": res.metadata["content_hash"]}))
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


def raw_encode_cpu_s(root: Path, tok_json: Path) -> tuple[float, int]:
    """CPU seconds of raw batch encoding of every file's text, and the number of tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_json))
    texts = [p.read_text() for p in sorted(root.iterdir())]
    t = time.process_time()
    n = 0
    for k in range(0, len(texts), 256):
        n += sum(len(e.ids) for e in tok.encode_batch_fast(texts[k:k + 256], add_special_tokens=False))
    return time.process_time() - t, n


def run_prep(root: Path, tok_dir: Path, out: Path, seq_len: int) -> dict:
    cfg = out.with_suffix(".yaml")
    cfg.write_text(json.dumps({"output": str(out), "tokenizer": str(tok_dir), "seq_len": seq_len,
                               "strategy": "bfd", "progress": False, "plots": False, "workers": 1,
                               "overwrite": True,
                               "sources": [{"type": "text", "name": "corpus", "paths": [str(root)]}]}))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(cfg)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=8.0, help="size of the 1× corpus in MB")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16], help="corpus sizes, in multiples of --mb")
    parser.add_argument("--repeats", type=int, default=3, help="alternating raw/prep measurements per size (best kept)")
    parser.add_argument("--seq-len", type=int, default=32768)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from longtune.train.tokenizer import embedded_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        embedded_tokenizer().save_pretrained(str(tmp / "tok"))
        rows = []
        for scale in args.scales:
            root = tmp / f"corpus{scale}"
            size = write_corpus(root, args.mb * scale)
            raws, preps = [], []
            for _ in range(args.repeats):
                raws.append(raw_encode_cpu_s(root, tmp / "tok" / "tokenizer.json"))
                preps.append(run_prep(root, tmp / "tok", tmp / f"out{scale}", args.seq_len))
            assert len({p["hash"] for p in preps}) == 1, "prep output differs between repeats"
            text_tokens = raws[0][1]
            raw_cpu = min(r[0] for r in raws)
            prep_cpu = min(p["cpu_s"] for p in preps)
            paired = " ".join(f"{r[0] / p['cpu_s']:.2f}" for r, p in zip(raws, preps, strict=True))
            rows.append((scale, size / 1e6, text_tokens, text_tokens / raw_cpu, text_tokens / prep_cpu,
                         max(p["peak_rss_mib"] for p in preps), preps[0]["fill"],
                         min(p["startup_cpu_s"] for p in preps), paired, preps[0]["hash"][:12]))
            shutil.rmtree(root)
            shutil.rmtree(tmp / f"out{scale}", ignore_errors=True)
    print(f"best of {args.repeats}, 1 worker, bfd, seq_len {args.seq_len:,}")
    print("| corpus | MB | text tokens | raw encode tok/s/core | prep tok/s/core | prep / raw | each repeat | "
          "peak RSS MiB | RSS vs 1× | fill | start-up CPU s (excluded) | content hash |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rss0 = rows[0][5]
    for scale, mb, tokens, raw, prep, rss, fill, startup, paired, digest in rows:
        print(f"| {scale}× | {mb:.1f} | {tokens:,} | {raw:,.0f} | {prep:,.0f} | {prep / raw:.2f} | {paired} | "
              f"{rss:.0f} | {100 * (rss / rss0 - 1):+.1f} % | {100 * fill:.3f} % | {startup:.1f} | {digest} |")


if __name__ == "__main__":
    main()
