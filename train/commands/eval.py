"""`longtune eval MODEL_DIR`: run the chosen evaluations and write JSON, Markdown and PNGs to --out.

Output is written to a temporary sibling of --out and moved in place at the end, so a failed or
interrupted run leaves no half-written results. With `--sp N` it re-launches itself as N processes under
torchrun (like `longtune train`) that score perplexity with sequence parallelism; rank 0 writes the output."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from longtune.parallel.dims import barrier

from ..evaluate.common import EvalError, load_model_dir_tokenizer, long_text_documents
from ..evaluate.perplexity import PROTOCOLS, perplexity_texts
from ..evaluate.sequence_parallel import SP_IMPLS, sp_problem
from ..evaluate.suite import default_lengths, evaluate
from ..launch import relaunch_under_torchrun, torchrun_needed
from . import command_main, error_raising_parser

TASKS = ("passkey", "needle", "ppl")
SP_TASKS = ("ppl",)
"""Tasks that run under --sp > 1; passkey and needle generate token by token on one process."""


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"--lengths {text!r}: expected comma-separated whole numbers of tokens") from None
    if not values or any(v <= 0 for v in values):
        raise EvalError(f"--lengths {text!r}: lengths must be positive")
    return sorted(set(values))


def _depths(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"--depths {text!r}: expected comma-separated fractions in [0, 1]") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise EvalError(f"--depths {text!r}: depths are fractions of the context in [0, 1]")
    return sorted(set(values))


def _choices(text: str, valid: tuple[str, ...], flag: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in valid]
    if bad or not values:
        raise EvalError(f"{flag}: unknown {', '.join(bad) or '(empty)'}; valid: {', '.join(valid)}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = error_raising_parser(EvalError, prog="longtune eval", description="Long-context evaluation of an HF model dir.")
    p.add_argument("model_dir", help="HF model dir (config.json, weights, tokenizer) or a shipped model name")
    p.add_argument("--lengths", help="comma-separated context lengths in tokens (default: M/4, M/2, M, 2M with "
                   "M = max_position_embeddings)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths, fractions (default %(default)s)")
    p.add_argument("--tasks", help="any of passkey,needle,ppl (default passkey,needle,ppl; with --sp > 1: ppl)")
    p.add_argument("--out", help="output dir (default: <run dir>/eval for a run's model/, else ./eval-<name>)")
    p.add_argument("--trials", type=int, default=5, help="passkey keys per cell (default %(default)s)")
    p.add_argument("--passkey-keys", default="number", choices=("number", "word"),
                   help="passkey keys: integers 1-50,000, or one-token words (default %(default)s)")
    p.add_argument("--ppl-protocols", default="single_window,sliding",
                   help=f"any of {','.join(PROTOCOLS)} (default %(default)s)")
    p.add_argument("--ppl-texts", type=int, default=4, help="texts averaged for perplexity (default %(default)s)")
    p.add_argument("--stride", type=int, default=256, help="sliding-window stride (default %(default)s)")
    p.add_argument("--text", nargs="+", help="text files for haystack and perplexity (default: embedded text)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--sp", type=int, default=1, help="sequence-parallel processes for perplexity: each holds "
                   "1/N of every window (default %(default)s: one process, no launcher)")
    p.add_argument("--sp-impl", default="zigzag", choices=SP_IMPLS,
                   help="ulysses: all-to-all over heads (N must divide them); ring / zigzag: ring attention "
                   "over contiguous / causal-balanced chunks (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _default_out(model_dir: Path) -> Path:
    if (model_dir.parent / "recipe.yaml").is_file():
        return model_dir.parent / "eval"
    return Path(f"eval-{model_dir.resolve().name}")


def _validate(args) -> dict:
    from longtune.train.model import SHIPPED_MODELS, shipped_model_dir

    model_dir = shipped_model_dir(args.model_dir) if args.model_dir in SHIPPED_MODELS else Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise EvalError(f"model dir {str(model_dir)!r} does not exist or has no config.json")
    if args.trials < 1 or args.ppl_texts < 1 or args.stride < 1 or args.sp < 1:
        raise EvalError("--trials, --ppl-texts, --stride and --sp must be at least 1")
    tasks = _choices(args.tasks or ("ppl" if args.sp > 1 else ",".join(TASKS)), TASKS, "--tasks")
    one_process = [t for t in tasks if t not in SP_TASKS]
    if args.sp > 1 and one_process:
        raise EvalError(f"--sp {args.sp} supports --tasks {','.join(SP_TASKS)} only ({', '.join(one_process)}: "
                        "generation runs on one process; evaluate it with a separate `longtune eval` without --sp)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and world != args.sp:
        raise EvalError(f"{world} processes were launched with --sp {args.sp}: `longtune eval --sp N` uses "
                        "exactly N processes (it starts them itself when no launcher did)")
    texts = None
    if args.text:
        for f in args.text:
            if not Path(f).is_file():
                raise EvalError(f"--text {f!r}: no such file")
        texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in args.text]
    return {"model_dir": model_dir,
            "lengths": _ints(args.lengths) if args.lengths else None,
            "depths": _depths(args.depths),
            "tasks": tasks,
            "protocols": _choices(args.ppl_protocols, PROTOCOLS, "--ppl-protocols"),
            "out": Path(args.out) if args.out else _default_out(model_dir),
            "texts": texts}


def _check_before_launch(v: dict, args) -> None:
    """What the --sp processes would reject, said here in one line before any of them starts."""
    import torch
    from transformers import AutoConfig

    gpus = torch.cuda.device_count()
    if args.device in ("auto", "cuda") and 0 < gpus < args.sp:
        raise EvalError(f"--sp {args.sp} puts one process on each GPU, but {gpus} are visible; use --sp {gpus} "
                        "or --device cpu")
    config = AutoConfig.from_pretrained(v["model_dir"])
    problem = sp_problem(config, args.sp_impl, args.sp)
    if problem:
        raise EvalError(problem)
    lengths = v["lengths"] or default_lengths(config.max_position_embeddings)
    perplexity_texts(load_model_dir_tokenizer(v["model_dir"]), v["texts"] or long_text_documents(), args.ppl_texts,
                     max(lengths))


def _summary(results: dict) -> str:
    lines = []
    for task, key in (("passkey", "accuracy"), ("needle", "score")):
        if task in results:
            by_len: dict[int, list[float]] = {}
            for c in results[task]["cells"]:
                by_len.setdefault(c["length"], []).append(c[key])
            lines.append(f"{task:8s} " + "  ".join(f"{n}: {sum(v) / len(v):.2f}" for n, v in by_len.items()))
    if "perplexity" in results:
        for proto in sorted({p["protocol"] for p in results["perplexity"]["points"]}):
            pts = [p for p in results["perplexity"]["points"] if p["protocol"] == proto]
            lines.append(f"ppl {proto:14s} " + "  ".join(f"{p['length']}: {p['ppl']:.1f}" for p in pts))
    return "\n".join(lines)


@command_main(rank_zero_reports=True)  # every rank meets the same bad input: one line, from rank 0
def main(argv: list[str]) -> int:
    from ..evaluate.report import write_report

    rank = int(os.environ.get("RANK", "0"))
    args = build_parser().parse_args(argv)
    v = _validate(args)
    if torchrun_needed(args.sp):
        _check_before_launch(v, args)
        return relaunch_under_torchrun(args.sp, "longtune.train.commands.eval", argv)
    results = evaluate(v["model_dir"], v["lengths"], v["depths"], v["tasks"], v["protocols"], args.trials,
                       args.ppl_texts, args.stride, v["texts"], args.seed, args.device, args.dtype,
                       progress=not args.no_progress and rank == 0, sp=args.sp, sp_impl=args.sp_impl,
                       passkey_keys=args.passkey_keys)
    if rank == 0:
        out: Path = v["out"]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            written = write_report(results, tmp)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        print(_summary(results))
        print(f"wrote {', '.join(str(out / p.name) for p in written)} ({results['seconds']} s)")
    barrier()  # under a launcher: every rank waits until rank 0 has written the output
    return 0


if __name__ == "__main__":  # a rank of `longtune eval --sp N`
    raise SystemExit(main())
