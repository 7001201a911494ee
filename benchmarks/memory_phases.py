"""Where in a training step the peak memory is: the resident set sampled every 0.3 ms, labelled by the module
running (forward, or recomputed inside backward), for one row of benchmarks/max_length.py.

    OMP_NUM_THREADS=1 python benchmarks/memory_phases.py --row 8 --seq-len 12288

Runs `longtune train` (the row's recipe, 3 steps) under this file as a wrapper: global module hooks set the
label, a sampler thread keeps the largest RSS per label, each rank writes them as JSON; the table lists, per
rank, the labels by their largest RSS (glibc's mmap threshold fixed, as in max_length.py, so RSS is live
memory). It tells which phase of a layer's backward holds the peak (the memory model's `layer_backward_phases`):
e.g. under recompute + tiled MLP, the MLP's recompute ("bwd-recompute Linear" inside TiledMLP) and not the
attention's all-to-all. The sampler can miss a peak shorter than its period; max_length.py's max RSS is exact.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LABELLED = ("LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "TiledMLP", "Linear", "LlamaRMSNorm", "Embedding",
            "SequenceChunkedLayer", "TiledLMHead", "DeferredNorm")


def _sampled_worker(out_prefix: str, argv: list[str]) -> None:
    """In the training process: hooks + sampler, then `python -m longtune.train argv`."""
    import torch

    page = os.sysconf("SC_PAGE_SIZE")
    state: dict = {"label": "setup", "by": {}}
    names: dict[int, str] = {}
    stack: list[str] = []
    out = Path(f"{out_prefix}.{os.environ.get('RANK', '0')}.json")

    def sample() -> None:
        n = 0
        while True:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page
            label = state["label"]
            if rss > state["by"].get(label, 0):
                state["by"][label] = rss
            n += 1
            if n % 3000 == 0:  # the process may end without atexit (torchrun's workers)
                out.write_text(json.dumps(state["by"]))
            time.sleep(0.0003)

    def pre(module, args):
        name = names.setdefault(id(module), type(module).__name__)
        if name in LABELLED:
            stack.append(state["label"])
            in_backward = torch._C._current_graph_task_id() != -1
            state["label"] = ("bwd-recompute " if in_backward else "fwd ") + name

    def post(module, args, output):
        if names.get(id(module)) in LABELLED and stack:
            state["label"] = stack.pop()

    def labelled(fn, label):
        def call(*a, **k):
            prev, state["label"] = state["label"], label
            try:
                return fn(*a, **k)
            finally:
                state["label"] = prev
        return call

    torch.nn.modules.module.register_module_forward_pre_hook(pre)
    torch.nn.modules.module.register_module_forward_hook(post)
    torch.Tensor.backward = labelled(torch.Tensor.backward, "backward (outside labelled modules)")
    torch.optim.AdamW.step = labelled(torch.optim.AdamW.step, "optimizer step")
    threading.Thread(target=sample, daemon=True).start()
    sys.argv = ["longtune.train", *argv]
    try:
        runpy.run_module("longtune.train", run_name="__main__")
    finally:
        out.write_text(json.dumps(state["by"]))


def main(argv: list[str] | None = None) -> int:
    import max_length as ml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", type=int, default=5, help="row of max_length.ROWS (1-12; default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--top", type=int, default=8, help="labels shown per rank")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _sampled_worker(args.worker[0], args.worker[1:])
        return 0
    if not 1 <= args.row < len(ml.ROWS):
        parser.error(f"--row must be 1-{len(ml.ROWS) - 1} (row 0, stock HF, is not a longtune run)")
    name, nproc, overrides = ml.ROWS[args.row]
    config = json.dumps(ml.model_config(args.hidden)).replace('"', "")
    with tempfile.TemporaryDirectory(prefix="longtune-memory-phases-") as tmp:
        prefix = f"{tmp}/phases"
        worker = [str(Path(__file__).resolve()), "--worker", prefix, "tiny-smoke", *ml.LONGTUNE_BASE,
                  *ml.resolved(overrides, args.seq_len),
                  f"model.config_overrides={config}", f"train.seq_len={args.seq_len}", f"train.output_dir={tmp}/run"]
        launch = [sys.executable, *worker] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *worker]
        done = subprocess.run(launch, env=ml.run_env(), capture_output=True, text=True, timeout=1800)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        print(f"{name}, {args.seq_len} tokens: largest RSS (MiB) per label")
        for rank in range(nproc):
            by = json.loads(Path(f"{prefix}.{rank}.json").read_text())
            ordered = sorted(by.items(), key=lambda kv: -kv[1])
            print(f"rank {rank}: peak {ordered[0][1] / 2**20:.1f} in {ordered[0][0]!r}")
            for label, rss in ordered[:args.top]:
                print(f"  {rss / 2**20:8.1f}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
