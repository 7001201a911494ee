"""Loss parallelism under tensor parallelism: per-rank peak memory of `longtune train` at tp = 2 where the
logits dominate (tiny-llama, hidden 128, with a 32,000-token vocabulary), the replicated lm_head against the
vocabulary-parallel one, with and without the tiled loss.

    OMP_NUM_THREADS=1 python benchmarks/loss_parallel.py [--seq-len 2048] [--vocab 32000] [--steps 3]

The replicated row is the path longtune takes when a model ties lm_head to its input embeddings (both stay
replicated, every tp rank computes the full length × vocabulary logits and the loss on them): the same
model with `tie_word_embeddings`, which has V × H fewer parameters (weights, gradients and AdamW state: the
`params MiB` column), so the comparison favours that row. Memory is the run's max RSS per rank
(`peak_mem_gib` of metrics.jsonl, the worst rank) with glibc's mmap threshold fixed
(`MALLOC_MMAP_THRESHOLD_=65536`, benchmarks/memory_model.py: RSS is then live memory plus the process
baseline); the memory model's logits / loss term is shown beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_model import env, measure_baseline  # noqa: E402  (benchmarks/memory_model.py)

ROWS: list[tuple[str, bool, tuple[str, ...]]] = [
    ("replicated lm_head, full logits", True, ()),
    ("loss-parallel (vocab-parallel lm_head)", False, ()),
    ("loss-parallel + tiled loss (chunk 256)", False, ("memory.tiled_loss=true", "memory.tiled_loss_chunk=256")),
]
"""(name, tie_word_embeddings, extra overrides), each at tp = 2."""


def overrides(tied: bool, extra: tuple[str, ...], seq_len: int, vocab: int, steps: int, out: Path) -> list[str]:
    config = json.dumps({"vocab_size": vocab, "tie_word_embeddings": tied}).replace('"', "")
    return ["parallel.tp=2", f"train.seq_len={seq_len}", f"train.max_steps={steps}", "train.global_batch_size=1",
            "train.micro_batch_size=1", "train.warmup_steps=0", "train.export=false", "train.progress=false",
            f"model.config_overrides={config}", *extra, f"train.output_dir={out}"]


def measure(args: list[str]) -> dict:
    from longtune.train.metrics import read_metrics

    cmd = [str(Path(sys.executable).parent / "longtune"), "train", "tiny-smoke", *args]
    proc = subprocess.run(cmd, env=env("fixed"), capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    rows = read_metrics(Path(args[-1].split("=", 1)[1]))
    return {"peak_gib": rows[-1]["peak_mem_gib"], "loss": rows[-1]["loss"], "step_s": rows[-1]["step_time_s"]}


def modelled(args: list[str]) -> tuple[float, float, float]:
    """(logits / loss term, parameter bytes per rank, whole peak above the process baseline) of the memory
    model, in MiB."""
    from longtune.parallel.memory_model import logits_loss_bytes, memory_breakdown
    from longtune.train.recipe import load_recipe
    from longtune.train.recipe_layout import layout_from_recipe, shape_for_recipe

    recipe = load_recipe("tiny-smoke", args)
    shape, layout = shape_for_recipe(recipe), layout_from_recipe(recipe, 2)
    head = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 1 + 1 / layout.tp)  # lm_head: V / tp rows
    peak = memory_breakdown(shape, layout, recipe.train.seq_len, host_is_device=True).peak_device
    return logits_loss_bytes(shape, layout, recipe.train.seq_len) / 2**20, 16 * head / 2**20, peak / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=3)
    opts = parser.parse_args(argv)
    print(f"tp = 2, tiny-llama (hidden 128, 2 layers), vocabulary {opts.vocab}, {opts.seq_len} tokens, "
          f"{opts.steps} steps; peak RSS of the worst rank")
    print("| row | peak GiB / rank | memory model GiB (error) | model: logits + loss MiB / rank | embeddings + "
          "lm_head params MiB (w, g, AdamW) | loss (last step) | step s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="longtune-loss-parallel-") as tmp:
        for i, (name, tied, extra) in enumerate(ROWS):
            args = overrides(tied, extra, opts.seq_len, opts.vocab, opts.steps, Path(tmp) / f"run{i}")
            got = measure(args)
            # The same processes stopped before the model: python, torch, transformers, gloo (the model's baseline).
            baseline = measure_baseline(2, tuple(args[:-1]), Path(tmp), "fixed")["rss"]
            logits_mib, params_mib, peak_mib = modelled(args)
            predicted = (baseline + peak_mib * 2**20) / 2**30
            print(f"| {name} | {got['peak_gib']:.3f} | {predicted:.3f} ({predicted / got['peak_gib'] - 1:+.1%}) | "
                  f"{logits_mib:.0f} | {params_mib:.0f} | {got['loss']:.4f} | {got['step_s']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
