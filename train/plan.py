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
import json
import sys
from pathlib import Path
from typing import Any

from longtune.parallel.memory_model import GIB, Layout, ModelShape
from longtune.parallel.planner import Hardware, PlanRow, max_length, plan
from longtune.parallel.time_model import Calibration, calibrate

from .cli import error_raising_parser

BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256, hf_id="meta-llama/Meta-Llama-3-8B"),
    "llama-3-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        intermediate_size=28672, vocab_size=128256, hf_id="meta-llama/Meta-Llama-3-70B"),
    "llama-2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32000, hf_id="meta-llama/Llama-2-7b-hf"),
    "mistral-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=32000, hf_id="mistralai/Mistral-7B-v0.1"),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064, hf_id="Qwen/Qwen2.5-7B"),
}
"""Config numbers of well-known models (from their published config.json files)."""
BUILTIN_MODELS["llama-3.1-8b"] = {**BUILTIN_MODELS["llama-3-8b"], "hf_id": "meta-llama/Llama-3.1-8B"}  # same shapes


class PlanError(ValueError):
    user_facing = True


def _tiny_vocab() -> int:
    """The tiny flavours' vocabulary: the embedded tokenizer's, which its BPE trainer fills exactly
    (special tokens included), so it need not be trained here."""
    from .tokenizer import EMBEDDED_VOCAB_SIZE

    return EMBEDDED_VOCAB_SIZE


def resolve_shape(name: str, overrides: dict[str, Any] | None = None) -> ModelShape:
    """A model's shape from a built-in name, a tiny flavour, a shipped model or an HF dir's config.json."""
    from .model import TINY_FLAVOURS, ModelSourceError, resolve_model_source

    if name.lower() in BUILTIN_MODELS:
        config = dict(BUILTIN_MODELS[name.lower()])
    elif name in TINY_FLAVOURS:
        config = dict(TINY_FLAVOURS[name], vocab_size=_tiny_vocab())
    else:
        try:
            source = resolve_model_source(name)
        except ModelSourceError as exc:
            raise PlanError(f"{exc}; built-in configs: {', '.join(BUILTIN_MODELS)}") from None
        config = json.loads((Path(source.name_or_path) / "config.json").read_text())
    config.update(overrides or {})
    try:
        return ModelShape.from_hf_config(config, name=name)
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise PlanError(f"model {name!r}: config lacks the numbers the planner needs ({exc})") from None


def shape_for_recipe(recipe) -> ModelShape:
    """The shape of a recipe's model, with its `model.config_overrides`."""
    return resolve_shape(recipe.model.name_or_path, recipe.model.config_overrides)


def layout_from_recipe(recipe, world: int) -> Layout:
    """The memory/time-model layout of a recipe run on `world` processes."""
    par, mem, tr = recipe.parallel, recipe.memory, recipe.train
    dp = recipe.data_parallel_size(world)
    if par.backend == "deepspeed":
        sharding = f"zero{par.deepspeed.zero_stage}" if par.deepspeed.zero_stage else "ddp"
    else:
        sharding = "fsdp" if par.fsdp else "ddp"
    # One process with sdpa and packed documents: transformers builds an L × L mask (memory_model.Attention).
    masked = (par.sp.degree == 1 and recipe.model.attn_implementation == "sdpa" and recipe.data.document_masking
              and not recipe.extension.pose.chunks)
    return Layout(dp=dp, sp_ulysses=par.sp.ulysses, sp_ring=par.sp.ring, tp=par.tp, pp=par.pp, sharding=sharding,
                  recompute=mem.recompute, recompute_every=mem.recompute_every,
                  recompute_modules=tuple(mem.recompute_modules), offload_checkpoints=mem.offload.checkpoints,
                  offload_activations=mem.offload.activations, offload_optimizer=mem.offload.optimizer,
                  offload_params=mem.offload.params, optimizer_swap=mem.offload.optimizer_swap,
                  offload_gradients=mem.offload.gradients, offload_tier=mem.offload.tier,
                  tiled_loss_chunk=mem.tiled_loss_chunk if mem.tiled_loss else 0,
                  tiled_mlp_chunk=mem.tiled_mlp_chunk if mem.tiled_mlp else 0,
                  micro_batch=tr.micro_batch_size,
                  grad_accum=tr.global_batch_size // (dp * tr.micro_batch_size), dtype=recipe.model.dtype,
                  attention="sdpa_masked" if masked else "flash")


def recipe_for_layout(layout: Layout, model: str, seq_len: int, output_dir: str = "runs/planned"):
    """A recipe (validated by the recipe loader) that trains `model` at `seq_len` with `layout`."""
    from .recipe import recipe_from_dict

    zero = layout.sharding.startswith("zero")
    name = BUILTIN_MODELS.get(model.lower(), {}).get("hf_id", model)
    data = {
        "model": {"name_or_path": name, "dtype": layout.dtype},
        "parallel": {"backend": "deepspeed" if zero else "native", "dp": layout.dp,
                     "fsdp": layout.sharding == "fsdp", "tp": layout.tp, "pp": layout.pp,
                     "sp": {"ulysses": layout.sp_ulysses, "ring": layout.sp_ring}},
        "memory": {"recompute": layout.recompute, "tiled_loss": bool(layout.tiled_loss_chunk),
                   "tiled_mlp": bool(layout.tiled_mlp_chunk),
                   "offload": {"checkpoints": layout.offload_checkpoints, "activations": layout.offload_activations,
                               "optimizer": layout.offload_optimizer, "params": layout.offload_params,
                               "optimizer_swap": layout.optimizer_swap, "gradients": layout.offload_gradients,
                               "tier": layout.offload_tier}},
        "train": {"seq_len": seq_len, "micro_batch_size": layout.micro_batch,
                  "global_batch_size": layout.dp * layout.micro_batch * layout.grad_accum, "output_dir": output_dir},
    }
    if zero:
        data["parallel"]["deepspeed"] = {"zero_stage": int(layout.sharding[-1])}
        del data["parallel"]["fsdp"]
    if layout.sp == 1 and layout.attention == "flash":
        # One process per sequence: an O(L) kernel that follows packed documents (needs flash-attn); sdpa would
        # build an L × L mask (memory_model.Attention).
        data["model"]["attn_implementation"] = "flash_attention_2"
    if layout.tiled_loss_chunk:
        data["memory"]["tiled_loss_chunk"] = layout.tiled_loss_chunk
    if layout.tiled_mlp_chunk:
        data["memory"]["tiled_mlp_chunk"] = layout.tiled_mlp_chunk
    if layout.recompute == "selective":
        data["memory"]["recompute_every"] = layout.recompute_every
        data["memory"]["recompute_modules"] = list(layout.recompute_modules)
    return recipe_from_dict(data, source="longtune plan")


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
    for name in ("gpu_mem_gib", "host_mem_gib", "intra_gbps", "inter_gbps"):
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
                    baseline_gib=args.baseline_gib)


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
    lines = [f"{'#':>3} {'fits':4} {'layout':58} {'GiB/dev':>8} {'GiB host':>9} {'step s':>9} {'tokens/s':>10}"]
    for i, r in enumerate(rows[:top], start=1):
        fits = "yes" if r.fits else ("host" if r.fits_device else "no")
        lines.append(f"{i:>3} {fits:4} {r.layout.describe():58} {r.memory.peak_device / GIB:8.1f} "
                     f"{r.memory.peak_host / GIB:9.1f} {r.time.seconds:9.3g} {r.time.tokens_per_s:10.4g}")
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


def main(argv: list[str] | None = None) -> int:
    from .cli import _fail

    try:
        return run(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    except Exception as exc:
        if not getattr(exc, "user_facing", False):
            raise
        return _fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
