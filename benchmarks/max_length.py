"""Maximum trainable length under one memory budget: stock HF against longtune's memory techniques.

    OMP_NUM_THREADS=1 python benchmarks/max_length.py [--hidden 256] [--budget-gib G] [--only N,...]
        [--lengths L,...] [--stock-lengths L,...] [--steps 3] [--threads 1] [--json OUT]

One Llama-architecture model whose vocabulary-to-hidden ratio is Llama-3-8B's (128,256 / 4,096 ≈ 31), at the
width `--hidden` (`model_config`: 256 → vocabulary 8,000, 4 query / 1 KV heads; 1,024 → vocabulary 32,000, 16 /
4 heads), 8 layers, intermediate 3.5 × hidden (as Llama-3), untied embeddings, fp32, AdamW. Rows:

(a) stock HF: transformers' `LlamaForCausalLM` with sdpa, `gradient_checkpointing_enable()`, the model's own
    loss (`labels=`), `torch.optim.AdamW`; a plain script, nothing of longtune imported.
(b) `longtune train` on one process adding one technique at a time: full recompute, tiled loss, tiled MLP,
    checkpoint offload (host tier), then the disk tier for the checkpoints, optimizer swap to disk, nested
    norm checkpoints and gradient offload to disk (all on at the end).
(c) `longtune train` with every technique and sp = 2 and 4 (Ulysses, gloo processes).
(d) `longtune train` on one process with every saver of the disk tier and sequence-chunked layers (chunks of
    CHUNK_TOKENS: each layer's working set is one chunk's, keys/values wait in files).

**The budget** is the peak resident memory of a process (max RSS, `getrusage`), everything included:
interpreter, libraries, weights, gradients, AdamW state, activations. glibc's mmap threshold is fixed at
64 KiB (`MALLOC_MMAP_THRESHOLD_=65536`) so that every tensor is its own mapping, returned on free, and max RSS
is live memory plus the process baseline (see benchmarks/memory_model.py). Nothing enforces the budget; a
length "fits" when a real run at that length peaks at or below it: for (a) one optimizer step after a warm-up
step, for longtune three optimizer steps (see LONGTUNE_BASE).
For sp > 1 the budget is per process (each rank its own peak). On CPU, host memory *is* the process's memory:
checkpoint offload to host memory moves tensors between two places of the same budget, so it cannot raise the
maximum here (on a GPU it moves them out of device memory); the disk tier (files in the run dir, on this
machine's disk) takes them out of the process, as host offload takes them out of a GPU.

Per row: peaks at two probe lengths give the bytes per token (a linear fit; the O(L²) attention terms are
absent with sdpa/flash without a mask), the fit predicts the maximum length under the budget, rounded down to a
multiple of `--granularity`, and a run at that length confirms it (its measured peak is printed next to the
budget). Tokens/s is from the confirming step, and at a common length that every row fits (`--common-length`).
With `--lengths` a row runs at those lengths instead of the search: the longest that fits is a confirmed lower
bound of its maximum (for lengths whose runs take hours); `--stock-lengths` does the same for (a).
`--threads` sets the runs' OMP_NUM_THREADS (default 1); it changes their speed, not what they hold (glibc's
arenas do not matter under the fixed mmap threshold).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_model import _launch, env, measure_baseline  # noqa: E402  (benchmarks/memory_model.py)


def model_config(hidden: int) -> dict:
    """Llama-3-8B's proportions at a smaller width: vocabulary / hidden = 31.25 (Llama-3-8B: 128,256 / 4,096 =
    31.3), intermediate 3.5 × hidden, head dim 64, GQA with 4 query heads per KV head, 8 layers."""
    heads = hidden // 64
    return dict(vocab_size=int(31.25 * hidden), hidden_size=hidden, num_hidden_layers=8,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), intermediate_size=hidden * 7 // 2,
                max_position_embeddings=131072, tie_word_embeddings=False)


WARMUP_TOKENS = 128
"""(a)'s first optimizer step runs at this length, so that the measured step has AdamW's state allocated."""

LONGTUNE_BASE = ("model.name_or_path=tiny-llama", "train.max_steps=3", "train.global_batch_size=1",
                 "train.micro_batch_size=1", "train.export=false", "train.progress=false", "train.warmup_steps=0",
                 "train.lr=1e-4", "train.grad_clip=0", "data.document_masking=false")
"""Three steps of one full-length row, plain causal attention as in (a). The third is the steady state: AdamW's
state exists from the second, and under sp DDP's buckets are resident from the third (DDP allocates new buckets
after the first iteration; their pages become resident as the second step's backward writes into them, so a
two-step run peaks up to one gradient copy lower than training does)."""

ALL_ON = ("memory.recompute=full", "memory.tiled_loss=true", "memory.tiled_loss_chunk=256", "memory.tiled_mlp=true",
          "memory.tiled_mlp_chunk=256", "memory.offload.checkpoints=true")

DISK = ("memory.offload.tier=disk", "memory.offload.optimizer_swap=true",
        "memory.recompute_modules=[input_layernorm,post_attention_layernorm]", "memory.offload.gradients=true")
"""The disk tier (files under the run dir, on this machine's disk): checkpoints, then AdamW's state between steps;
then the two norms of each layer as checkpoints nested in the layer's (their fp32 x·rsqrt is not kept); then each
gradient from its accumulation in backward to the step."""

CHUNK_TOKENS = 2048
"""(d): each decoder layer runs on chunks of this many tokens (`memory.sequence_chunks` = length / this)."""

CHUNKED = ("memory.recompute=full", "memory.tiled_loss=true", "memory.tiled_loss_chunk=256", "memory.tiled_mlp=true",
           "memory.tiled_mlp_chunk=256", "memory.offload.checkpoints=true", "memory.offload.tier=disk",
           "memory.offload.optimizer_swap=true", "memory.offload.gradients=true", "memory.sequence_chunks={chunks}")
"""(d): every saver of the disk-tier row but the nested norm checkpoints (a chunk's norms are one chunk's), with
sequence-chunked layers: keys/values and layer inputs in files, one chunk's working set per layer."""

ROWS: list[tuple[str, int, tuple[str, ...]]] = [
    ("(a) stock HF: sdpa + gradient checkpointing", 1, ()),
    ("(b) longtune, nothing on", 1, ()),
    ("(b) + recompute (full)", 1, ALL_ON[:1]),
    ("(b) + tiled loss", 1, ALL_ON[:3]),
    ("(b) + tiled MLP", 1, ALL_ON[:5]),
    ("(b) + checkpoint offload = all on", 1, ALL_ON),
    ("(b) + checkpoint offload to disk", 1, (*ALL_ON, *DISK[:1])),
    ("(b) + optimizer swap to disk", 1, (*ALL_ON, *DISK[:2])),
    ("(b) + nested norm checkpoints", 1, (*ALL_ON, *DISK[:3])),
    ("(b) + gradient offload to disk = all on, disk tier", 1, (*ALL_ON, *DISK)),
    ("(c) all on, sp = 2 (Ulysses)", 2, (*ALL_ON, "parallel.sp.ulysses=2")),
    ("(c) all on, sp = 4 (Ulysses)", 4, (*ALL_ON, "parallel.sp.ulysses=4")),
    ("(d) all on, disk tier, sequence chunks of 2,048 tokens", 1, CHUNKED),
]
"""(name, processes, longtune overrides); the first row is stock HF (no longtune)."""


def stock_step(hidden: int, seq_len: int, out: Path) -> None:
    """(a), in this process: stock transformers training, a warm-up step and one measured step."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    baseline = _vm_rss()
    model = LlamaForCausalLM(LlamaConfig(**model_config(hidden), attn_implementation="sdpa"))
    model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for length in (WARMUP_TOKENS, seq_len):
        ids = torch.randint(0, model.config.vocab_size, (1, length))
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.write_text(json.dumps({"peak": peak, "baseline": baseline, "tokens_per_s": seq_len / elapsed,
                               "loss": loss.item()}))


def _vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmRSS")


IN_FLIGHT_MIB = "16"
"""The offload tiers' bound on bytes in flight (written behind or read ahead; LONGTUNE_OFFLOAD_IN_FLIGHT_MIB). On
a GPU they are host memory; here they are the process's own, so the bound is small."""


THREADS = ["1"]
"""The runs' OMP_NUM_THREADS (`--threads`)."""


def run_env() -> dict[str, str]:
    return {**env("fixed"), "LONGTUNE_OFFLOAD_IN_FLIGHT_MIB": IN_FLIGHT_MIB, "OMP_NUM_THREADS": THREADS[0]}


def resolved(overrides: tuple[str, ...], seq_len: int) -> list[str]:
    """A row's overrides at `seq_len` (the chunk count of (d) follows the length)."""
    return [o.format(chunks=max(1, seq_len // CHUNK_TOKENS)) for o in overrides]


def measure(row: tuple[str, int, tuple[str, ...]], hidden: int, seq_len: int, work: Path) -> dict:
    """One run of a row at `seq_len`: {'peak': max RSS above the process baseline (worst rank), 'baseline':
    resident bytes before the model is built, 'tokens_per_s': of the measured step}."""
    name, nproc, overrides = row
    out = work / f"run-{len(list(work.iterdir()))}"
    if name.startswith("(a)"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stock", str(seq_len), "--hidden", str(hidden),
               "--stock-out", str(out)]
    else:
        config = json.dumps(model_config(hidden)).replace('"', "")
        cmd = _launch(nproc, ["-m", "longtune.train", "tiny-smoke", *LONGTUNE_BASE, f"train.max_steps={STEPS[0]}",
                              *resolved(overrides, seq_len), f"model.config_overrides={config}",
                              f"train.seq_len={seq_len}",
                              f"train.output_dir={out}"])
        if nproc == 1:
            cmd = [sys.executable, *cmd[1:]]
    proc = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=4 * 3600)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    if name.startswith("(a)"):
        found = json.loads(out.read_text())
        return dict(found, peak=found["peak"] - found["baseline"], rss=found["peak"])
    from longtune.train.metrics import read_metrics

    last = read_metrics(out)[-1]
    key = (nproc, overrides)
    if key not in _BASELINES:  # the same recipe stopped after setup_run (before the model), in its own process(es)
        _BASELINES[key] = measure_baseline(nproc, (*LONGTUNE_BASE, *resolved(overrides, seq_len),
                                                   f"model.config_overrides={config}",
                                                   f"train.seq_len={seq_len}"), work, "fixed")["rss"]
    rss = last["peak_mem_gib"] * 2**30
    return {"peak": rss - _BASELINES[key], "baseline": _BASELINES[key], "rss": rss,
            "tokens_per_s": last["tokens_per_s"], "loss": last["loss"]}


_BASELINES: dict[tuple, int] = {}
STEPS = [3]
"""Optimizer steps of a longtune run (`--steps`)."""


def predicted_peak(row: tuple[str, int, tuple[str, ...]], hidden: int, seq_len: int) -> float | None:
    """The memory model's peak above the process baseline for a longtune row (None for stock HF)."""
    name, nproc, overrides = row
    if name.startswith("(a)"):
        return None
    from longtune.parallel.memory_model import memory_breakdown
    from longtune.train.recipe import load_recipe
    from longtune.train.recipe_layout import layout_from_recipe, shape_for_recipe

    config = json.dumps(model_config(hidden)).replace('"', "")
    recipe = load_recipe("tiny-smoke", [*LONGTUNE_BASE, *resolved(overrides, seq_len),
                                        f"model.config_overrides={config}",
                                        f"train.seq_len={seq_len}"])
    return memory_breakdown(shape_for_recipe(recipe), layout_from_recipe(recipe, nproc), seq_len,
                            host_is_device=True).peak_device


def find_max_length(row: tuple[str, int, tuple[str, ...]], hidden: int, budget: float, probes: tuple[int, int],
                    tolerance: float, work: Path, runs: int = 7, known: dict[int, dict] | None = None) -> dict:
    """The longest multiple of 64 tokens whose run peaks at or below `budget`, bracketed by a run that fits and
    a run that does not within `tolerance` (relative); secant steps on the measured peaks. `known`: runs
    already made (the one that defined the budget)."""
    points: dict[int, dict] = dict(known or {})

    def run(length: int) -> None:
        points[length] = measure(row, hidden, length, work)
        points[length]["predicted"] = predicted_peak(row, hidden, length)
        fits = points[length]["peak"] <= budget
        print(f"    {row[0]}: {length} tokens  peak {points[length]['peak'] / 2**30:.3f} GiB  "
              f"{'fits' if fits else 'over'}  {points[length]['tokens_per_s']:.0f} tokens/s", flush=True)

    for length in probes:
        if length not in points:
            run(length)
    while len(points) < runs:
        fit = [n for n in points if points[n]["peak"] <= budget]
        over = [n for n in points if points[n]["peak"] > budget]
        low, high = max(fit, default=0), min(over, default=math.inf)
        if low and high <= low * (1 + tolerance) + 64:
            break
        (l1, p1), (l2, p2) = sorted((n, points[n]["peak"]) for n in points)[-2:]
        slope = (p2 - p1) / (l2 - l1)
        guess = l2 + (budget - p2) / slope if slope > 0 else 2 * l2
        if high == math.inf:  # nothing over yet: the peaks may still be flat (the step's, not backward's)
            guess = min(guess, 2 * max(points))
        guess = 64 * int(guess // 64)
        if not low < guess < high:  # outside the bracket (a flat region or curvature): bisect it
            guess = 64 * int((low + (high if high < math.inf else 2 * max(points))) / 128)
        guess = min(max(guess, low + 64), int(high) - 64 if high < math.inf else guess)
        if guess in points:
            break
        run(guess)
    fit = [n for n in points if points[n]["peak"] <= budget]
    over = [n for n in points if points[n]["peak"] > budget]
    low, high = max(fit, default=0), min(over, default=None)
    ordered = sorted(points)
    slope = ((points[ordered[-1]]["peak"] - points[ordered[-2]]["peak"]) / (ordered[-1] - ordered[-2])
             if len(ordered) > 1 else float("nan"))
    return {"max_length": low, "peak": points[low]["peak"] if low else None,
            "tokens_per_s": points[low]["tokens_per_s"] if low else None, "first_over": high,
            "bytes_per_token": slope, "points": {str(n): points[n] for n in ordered}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="peak-memory budget per process; default: (a)'s peak at --stock-length")
    parser.add_argument("--stock-length", type=int, default=1024,
                        help="without --budget-gib, the budget is (a)'s measured peak at this length")
    parser.add_argument("--hidden", type=int, default=256, help="model width (vocabulary = 31.25 × hidden)")
    parser.add_argument("--only", default="", help="comma-separated row numbers (0 = stock HF; default: all)")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="stop when the first length over the budget is within this of the longest that fits")
    parser.add_argument("--common-length", type=int, default=0,
                        help="tokens/s of every row at this length; default: (a)'s maximum")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    parser.add_argument("--lengths", default="", help="comma-separated lengths: run the rows at these instead of "
                        "searching (the longest that fits is the row's confirmed maximum, a lower bound)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of a longtune run (2: one process's "
                        "second step already holds AdamW's state; the sp rows need 3, see LONGTUNE_BASE)")
    parser.add_argument("--stock-lengths", default="", help="comma-separated lengths: run (a) at these instead "
                        "of its search (with --budget-gib; its maximum is the longest that fits)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs (speed only)")
    parser.add_argument("--stock", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stock-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stock:
        stock_step(args.hidden, args.stock, Path(args.stock_out))
        return 0
    STEPS[0] = args.steps
    THREADS[0] = str(args.threads)
    fixed = tuple(int(n) for n in args.lengths.split(",") if n)
    stock_fixed = tuple(int(n) for n in args.stock_lengths.split(",") if n)
    wanted = {int(n) for n in args.only.split(",") if n}
    rows = [r for i, r in enumerate(ROWS) if not wanted or i in wanted]
    results = []
    with tempfile.TemporaryDirectory(prefix="longtune-max-length-") as tmp:
        work = Path(tmp)
        known: dict[int, dict] = {}
        if args.budget_gib:
            budget = args.budget_gib * 2**30
        else:  # (a) fits its own peak at --stock-length by definition
            known[args.stock_length] = measure(ROWS[0], args.hidden, args.stock_length, work)
            budget = known[args.stock_length]["peak"]
        print(f"model {model_config(args.hidden)}\nbudget {budget / 2**30:.3f} GiB per process", flush=True)
        stock_max = None
        for row in rows:
            name, nproc, _ = row
            start = stock_max or args.stock_length
            probes = (start, 2 * start) if name.startswith("(a)") else (2 * start * nproc, 4 * start * nproc)
            chosen = stock_fixed if name.startswith("(a)") else fixed
            if chosen:
                probes = chosen
            found = find_max_length(row, args.hidden, budget, probes, args.tolerance, work,
                                    known=known if name.startswith("(a)") else None,
                                    runs=len(chosen) if chosen else 7)
            if name.startswith("(a)"):
                stock_max = found["max_length"]
            found.update(name=name, processes=nproc, overrides=list(row[2]))
            results.append(found)
        common = args.common_length or stock_max
        if common:
            for found, row in zip(results, rows, strict=True):
                found["common"] = measure(row, args.hidden, common, work)
    print()
    print(markdown_table(results, budget, stock_max, common))
    if args.json:
        Path(args.json).write_text(json.dumps({"budget": budget, "model": model_config(args.hidden),
                                               "rows": results}, indent=1))
    return 0


def markdown_table(results: list[dict], budget: float, stock_max: int | None, common: int | None) -> str:
    lines = [f"| row | processes | max length | × (a) | peak GiB (budget {budget / 2**30:.3f}) | memory model GiB | "
             f"first over | bytes/token | tokens/s at max | tokens/s at {common} | × (a) |", "|---" * 11 + "|"]
    base_speed = next((r["common"]["tokens_per_s"] for r in results if r["name"].startswith("(a)") and "common" in r),
                      None)
    for r in results:
        ratio = f"{r['max_length'] / stock_max:.1f}" if stock_max else "–"
        peak = f"{r['peak'] / 2**30:.3f}" if r["peak"] else "–"
        speed = r.get("common", {}).get("tokens_per_s")
        speed_ratio = f"{speed / base_speed:.2f}" if speed and base_speed else "–"
        predicted = r["points"].get(str(r["max_length"]), {}).get("predicted")
        model = f"{predicted / 2**30:.3f}" if predicted else "–"
        lines.append(f"| {r['name']} | {r['processes']} | {r['max_length']:,} | {ratio} | {peak} | {model} | "
                     f"{r['first_over'] or '–'} | {r['bytes_per_token']:,.0f} | "
                     f"{r['tokens_per_s'] or 0:,.0f} | {speed or 0:,.0f} | {speed_ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
