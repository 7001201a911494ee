"""`longtune plan`: which layouts of a model fit on these devices at this length, and how fast they are.

    longtune plan MODEL --length 131072 --gpus 8 [--gpu-mem-gib 80] [--top 10] [--write-recipe R.yaml]
    longtune plan MODEL --max-length --gpus 8
    longtune plan --calibrate OUT.json

MODEL is an HF dir with config.json, a shipped model or tiny flavour (tiny-llama), or a built-in name
(llama-3-8b, ...: config numbers only, nothing is downloaded). The models: parallel/memory_model.py,
parallel/time_model.py, parallel/planner.py; docs/planner.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from longtune.data_prep.user_error import UserError
from longtune.parallel.memory_model import GIB
from longtune.parallel.planner import Hardware, PlanRow, max_length, plan
from longtune.parallel.time_model import Calibration, calibrate

from ..recipe_layout import BUILTIN_MODELS, recipe_for_layout, resolve_shape
from . import command_main, error_raising_parser


class PlanError(UserError, ValueError):
    """Bad plan arguments, or no layout to write as a recipe."""


def build_parser() -> argparse.ArgumentParser:
    p = error_raising_parser(PlanError, prog="longtune plan",
                             description="Rank the parallel layouts that fit a model at a length.")
    p.add_argument("model", nargs="?", help="HF dir with config.json, tiny flavour / shipped model, or a built-in "
                   f"name ({', '.join(BUILTIN_MODELS)})")
    p.add_argument("--length", type=int, help="sequence length in tokens")
    p.add_argument("--max-length", action="store_true", help="find the longest length some layout fits")
    p.add_argument("--gpus", type=int, help="devices in total (default: --nodes × --gpus-per-node, else 1)")
    p.add_argument("--nodes", type=int, default=None)
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: min(--gpus, 8)")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one device (GiB)")
    p.add_argument("--host-mem-gib", type=float, default=1024.0, help="host memory of one node (GiB)")
    p.add_argument("--disk-gib", type=float, default=28000.0, help="local NVMe of one node for "
                   "memory.offload.tier=disk (GiB; default: 8 × 3.84 TB)")
    p.add_argument("--baseline-gib", type=float, default=1.5, help="device memory outside the model's tensors "
                   "(CUDA context, NCCL buffers, fragmentation), GiB")
    p.add_argument("--intra-gbps", type=float, default=None, help="in-node bandwidth per rank, GB/s (bytes)")
    p.add_argument("--inter-gbps", type=float, default=None, help="between-node bandwidth per rank, GB/s (bytes)")
    p.add_argument("--calibration", default=None, help="constants file from `longtune plan --calibrate`")
    p.add_argument("--calibrate", metavar="OUT.json", default=None,
                   help="measure this machine's constants (matmul and attention FLOP/s, collectives between "
                        "2 local processes) and write them")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="compute dtype (default: bfloat16, or float32 with --cpu)")
    p.add_argument("--cpu", action="store_true", help="plan CPU processes (gloo): offloaded memory stays in the "
                   "same RAM, attention without sequence parallelism is sdpa with the packed-document mask")
    p.add_argument("--doc-fill", type=float, default=1.0,
                   help="share of a row's attention inside its documents, Σ d² / L² over the packed documents' "
                        "lengths d (default 1.0: one document per row); lower it for rows packed with shorter "
                        "documents, whose masked blocks longtune's kernels skip (--length only)")
    p.add_argument("--top", type=int, default=10, help="rows to print")
    p.add_argument("--all", action="store_true", help="also print layouts that do not fit")
    p.add_argument("--write-recipe", metavar="PATH", default=None, help="write the best fitting layout as a recipe")
    return p


def _hardware(args: argparse.Namespace) -> Hardware:
    for name in ("gpus", "nodes", "gpus_per_node", "length", "top"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise PlanError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.baseline_gib < 0:
        raise PlanError(f"--baseline-gib must not be negative, got {args.baseline_gib}")
    for name in ("gpu_mem_gib", "host_mem_gib", "disk_gib", "intra_gbps", "inter_gbps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise PlanError(f"--{name.replace('_', '-')} must be positive, got {value}")
    gpn = args.gpus_per_node
    gpus = args.gpus
    if args.nodes is not None:
        if gpn is None:
            raise PlanError("--nodes needs --gpus-per-node")
        if gpus is not None and gpus != args.nodes * gpn:
            raise PlanError(f"--gpus {gpus} is not --nodes × --gpus-per-node (= {args.nodes * gpn})")
        gpus = args.nodes * gpn
    gpus = gpus or 1
    gpn = gpn or min(gpus, 8)
    return Hardware(gpus=gpus, gpu_mem_gib=args.gpu_mem_gib, host_mem_gib=args.host_mem_gib, gpus_per_node=gpn,
                    baseline_gib=args.baseline_gib, disk_gib=args.disk_gib)


def _calibration(args: argparse.Namespace) -> Calibration:
    try:
        default = Calibration.cpu_default() if args.cpu else Calibration.gpu_default()
        cal = Calibration.load(args.calibration) if args.calibration else default
    except (OSError, ValueError, TypeError) as exc:
        raise PlanError(f"--calibration {args.calibration}: {exc}") from None
    if args.intra_gbps:
        cal.intra_bw = args.intra_gbps * 1e9
    if args.inter_gbps:
        cal.inter_bw = args.inter_gbps * 1e9
    return cal


def format_rows(rows: list[PlanRow], top: int) -> str:
    """One line per layout; `fits` names what does not fit (host: host memory, disk: the NVMe tier)."""
    lines = [f"{'#':>3} {'fits':4} {'layout':78} {'GiB/dev':>8} {'GiB host':>9} {'GiB disk':>9} {'step s':>9} "
             f"{'tokens/s':>10}"]
    for i, r in enumerate(rows[:top], start=1):
        fits = "yes" if r.fits else "no" if not r.fits_device else "host" if not r.fits_host else "disk"
        lines.append(f"{i:>3} {fits:4} {r.layout.describe():78} {r.memory.peak_device / GIB:8.1f} "
                     f"{r.memory.peak_host / GIB:9.1f} {r.memory.peak_disk / GIB:9.1f} {r.time.seconds:9.3g} "
                     f"{r.time.tokens_per_s:10.4g}")
    return "\n".join(lines)


def _breakdown(row: PlanRow) -> str:
    parts = [f"{name} {b / GIB:.2f}" for name, _, b in row.memory.table()]
    return "memory of #1 (GiB): " + ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    if args.calibrate:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        cal = calibrate(device)
        cal.save(args.calibrate)
        by_length = ", ".join(f"{int(n) // 1024}K {r / 1e9:.1f}" for n, r in cal.attention_flops_by_length.items())
        print(f"wrote {args.calibrate}: matmul {cal.matmul_flops / 1e9:.1f} GFLOP/s, attention "
              f"{by_length} GFLOP/s by row length, collectives {cal.intra_bw / 1e9:.2f} GB/s, "
              f"latency {cal.latency_s * 1e6:.0f} µs ({device})")
        return 0
    if not args.model:
        raise PlanError("a model is needed (or --calibrate OUT.json)")
    if args.max_length == (args.length is not None):
        raise PlanError("give exactly one of --length N and --max-length")
    if not 0 < args.doc_fill <= 1:
        raise PlanError(f"--doc-fill must be in (0, 1], got {args.doc_fill}")
    hw = _hardware(args)
    cal = _calibration(args)
    shape = resolve_shape(args.model)
    # GPU: flash_attention_2 for one process per sequence; CPU: sdpa with the packed-document mask.
    dtype = args.dtype or ("float32" if args.cpu else "bfloat16")
    options = dict(dtype=dtype, attention="sdpa_masked" if args.cpu else "flash", host_is_device=args.cpu)
    if args.max_length:
        length, best = max_length(shape, hw, cal, **options)
        if best is None:
            print(f"{shape.name}: no layout fits even {1024} tokens on {hw.gpus} × {hw.gpu_mem_gib:g} GiB")
            return 1
        print(f"{shape.name} on {hw.gpus} × {hw.gpu_mem_gib:g} GiB ({hw.gpus_per_node} per node): max length "
              f"{length} tokens")
        rows = [best]
    else:
        length = args.length
        rows = plan(shape, length, hw, cal, doc_fill=args.doc_fill, **options)
        if not rows:
            raise PlanError(f"no valid layout of {shape.name} on {hw.gpus} devices at length {length}")
        print(f"{shape.name}, {length} tokens, {hw.gpus} × {hw.gpu_mem_gib:g} GiB ({hw.gpus_per_node} per node), "
              f"host {hw.host_mem_gib:g} GiB/node; constants: {cal.source}")
    shown = rows if args.all else [r for r in rows if r.fits]
    if not shown:
        print("no layout fits; the closest:")
        shown = sorted(rows, key=lambda r: r.memory.peak_device)
    print(format_rows(shown, args.top))
    print(_breakdown(shown[0]))
    if args.write_recipe:
        if not shown[0].fits:
            raise PlanError("no layout fits: no recipe written")
        recipe = recipe_for_layout(shown[0].layout, args.model, length)
        Path(args.write_recipe).write_text(f"# longtune plan {args.model}: {shown[0].layout.describe()}, "
                                           f"{shown[0].time.tokens_per_s:.4g} tokens/s estimated\n"
                                           + recipe.to_yaml())
        print(f"wrote {args.write_recipe}")
    return 0


@command_main
def main(argv: list[str]) -> int:
    return run(build_parser().parse_args(argv))
