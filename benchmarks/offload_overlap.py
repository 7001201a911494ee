"""Offload I/O overlapped with compute against synchronous offload: seconds per step blocked on offload, tokens/s,
beside stock HF.

    OMP_NUM_THREADS=1 python benchmarks/offload_overlap.py [--seq-len 8192] [--steps 3] [--repeats 1] [--hidden 256]
        [--row disk|chunked] [--chunks N] [--stock]

Runs `longtune train` on max_length.py's model (`model_config(hidden)`) with one of its all-on rows — `disk`: "(b)
+ gradient offload to disk = all on, disk tier" (checkpoints, optimizer state and gradients in files under the
run dir); `chunked`: "(d) all on, disk tier, sequence chunks" (the same savers and sequence-chunked layers, the
chunk count following the length) — alternating `LONGTUNE_OFFLOAD_OVERLAP=0` (every put and get synchronous) and
overlap on, and prints per mode and step the time blocked in offload calls (`offload_wait_s` in metrics.jsonl),
the step time and tokens/s, and the peak resident memory. The two modes must train identically: the script
fails if any step's loss or gradient norm differs. With `--stock`, max_length.py's stock HF step (a plain
transformers script) at the same length joins the alternation, and each mode's tokens/s is also given as a
ratio to stock's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from max_length import ALL_ON, CHUNKED, DISK, IN_FLIGHT_MIB, LONGTUNE_BASE, model_config, resolved  # noqa: E402
from memory_model import env  # noqa: E402

MODES = {"synchronous": "0", "overlapped": "1"}


ROWS = {"disk": (*ALL_ON, *DISK), "chunked": CHUNKED}


def run(mode: str, seq_len: int, steps: int, hidden: int, out: Path, row: str = "disk", chunks: int = 0
        ) -> list[dict]:
    """One `longtune train` run; its metrics.jsonl rows. `chunks`: the chunked row's chunk count (0: follow the
    length, as max_length.py's row (d))."""
    from longtune.train.metrics import read_metrics

    config = json.dumps(model_config(hidden)).replace('"', "")
    overrides = resolved(ROWS[row], seq_len)
    if chunks:
        overrides = [o for o in overrides if not o.startswith("memory.sequence_chunks=")]
        overrides.append(f"memory.sequence_chunks={chunks}")
    cmd = [sys.executable, "-m", "longtune.train", "tiny-smoke", *LONGTUNE_BASE, *overrides,
           f"model.config_overrides={config}", f"train.seq_len={seq_len}", f"train.max_steps={steps}",
           f"train.output_dir={out}"]
    proc = subprocess.run(cmd, env=dict(env("fixed"), LONGTUNE_OFFLOAD_OVERLAP=MODES[mode],
                                        LONGTUNE_OFFLOAD_IN_FLIGHT_MIB=IN_FLIGHT_MIB),
                          capture_output=True, text=True, timeout=4 * 3600)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return read_metrics(out)


def stock(seq_len: int, hidden: int, out: Path) -> float:
    """Tokens/s of max_length.py's stock HF step (after its warm-up step) at `seq_len`."""
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "max_length.py"), "--stock", str(seq_len),
           "--hidden", str(hidden), "--stock-out", str(out)]
    subprocess.run(cmd, env=env("fixed"), check=True, capture_output=True, timeout=4 * 3600)
    return json.loads(out.read_text())["tokens_per_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode, alternating")
    parser.add_argument("--hidden", type=int, default=256, help="model width (max_length.py's model_config)")
    parser.add_argument("--row", choices=sorted(ROWS), default="disk", help="the all-on row (default %(default)s)")
    parser.add_argument("--chunks", type=int, default=0, help="the chunked row's sequence_chunks (default: the "
                        "length / 2,048 of max_length.py's row (d), 1 below 4,096 tokens)")
    parser.add_argument("--stock", action="store_true", help="stock HF at the same length in the alternation")
    args = parser.parse_args(argv)
    runs: dict[str, list[list[dict]]] = {mode: [] for mode in MODES}
    stock_speeds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="longtune-offload-overlap-") as tmp:
        for repeat in range(args.repeats):
            if args.stock:
                stock_speeds.append(stock(args.seq_len, args.hidden, Path(tmp) / f"stock-{repeat}.json"))
                print(f"  stock HF run {repeat + 1}: {stock_speeds[-1]:.0f} tokens/s", flush=True)
            for mode in MODES:
                rows = run(mode, args.seq_len, args.steps, args.hidden, Path(tmp) / f"{mode}-{repeat}", args.row,
                           args.chunks)
                runs[mode].append(rows)
                print(f"  {mode} run {repeat + 1} (load {os.getloadavg()[0]:.1f}): " + ", ".join(
                    f"step {r['step']} {r['step_time_s']:.2f} s (offload wait {r['offload_wait_s']:.2f} s)"
                    for r in rows), flush=True)
    reference = [(r["loss"], r["grad_norm"]) for r in runs["synchronous"][0]]
    for mode, mode_runs in runs.items():
        for rows in mode_runs:
            if [(r["loss"], r["grad_norm"]) for r in rows] != reference:
                raise SystemExit(f"{mode} trained differently: {rows} against {reference}")
    chunked = f" ({args.chunks} sequence chunks)" if args.chunks else ""
    print(f"\n{args.seq_len} tokens per step, hidden {args.hidden}, row {args.row}{chunked}, {args.steps} steps, "
          f"{args.repeats} run(s) per mode; losses and gradient norms identical in every run\n")
    print(markdown_table(runs, statistics.median(stock_speeds) if stock_speeds else None))
    return 0


def markdown_table(runs: dict[str, list[list[dict]]], stock_speed: float | None = None) -> str:
    """Per mode: offload wait and step time per step (median over runs, steps in order), tokens/s of the steps
    after the first (median, and each run's: on a shared machine the spread is mostly other load), its ratio to
    stock HF's median (when measured), peak RSS."""
    lines = ["| mode | offload wait s per step | step time s per step | tokens/s (steps 2+) | each run | × stock HF | "
             "peak GiB |", "|---|---|---|---|---|---|---|"]
    if stock_speed is not None:
        lines.append(f"| stock HF | – | – | {stock_speed:.0f} | – | 1.00 | – |")
    for mode, mode_runs in runs.items():
        steps = range(len(mode_runs[0]))

        def per_step(key: str, runs_rows=mode_runs, steps=steps) -> str:
            return " / ".join(f"{statistics.median(rows[s][key] for rows in runs_rows):.2f}" for s in steps)

        speed = statistics.median(r["tokens_per_s"] for rows in mode_runs for r in rows[1:])
        each = " / ".join(f"{statistics.median(r['tokens_per_s'] for r in rows[1:]):.0f}" for rows in mode_runs)
        peak = max(rows[-1]["peak_mem_gib"] for rows in mode_runs)
        ratio = f"{speed / stock_speed:.2f}" if stock_speed else "–"
        lines.append(f"| {mode} | {per_step('offload_wait_s')} | {per_step('step_time_s')} | {speed:.0f} | {each} | "
                     f"{ratio} | {peak:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
