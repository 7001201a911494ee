"""`longtune demo`: the main job on the embedded default, end to end on CPU, nothing downloaded.

1. **prep**: a packed corpus at the target length from the embedded text plus Landmark passkey samples
   (`recipes/prep/demo-extend.yaml`), tokenized with the shipped base model's tokenizer.
2. **extend**: the shipped base model `tiny-base-256` (trained at 256 tokens, see
   `recipes/models/tiny-base-256/README.md`) fine-tuned to the target length once per method
   (`recipes/demo-extend-pi.yaml`, `recipes/demo-extend-yarn.yaml`) on 2 processes with sequence
   parallelism (Ulysses, sp = 2).
3. **evaluate** the base model (direct extrapolation) and every extended model: passkey over lengths ×
   depths and perplexity against length (`longtune eval`'s functions, one process).
4. **compare**: `results.md` (the side-by-side table), `passkey_heatmaps.png` and `perplexity.png` in
   the run dir, and a summary on the terminal.

Every stage shows progress; the run dir of a finished demo is replaced only when the new one is complete
(each stage writes its own sub-dir, the comparison is written to a temporary file and moved in place).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from longtune.data_prep.atomic_write import atomic_write

from ..evaluate.common import EvalError
from ..launch import ChildInterrupted, run_child
from . import command_main, error_raising_parser

METHODS = ("pi", "yarn")
BASE_MODEL = "tiny-base-256"
PASSKEY_KEYS = "word"
"""The shipped base model's passkey form: one-token word keys (`recipes/prep/demo-extend.yaml` trains with it)."""


class DemoError(EvalError):
    """Bad demo arguments or a failed stage."""


def build_parser() -> argparse.ArgumentParser:
    p = error_raising_parser(DemoError, prog="longtune demo",
                             description="The main job: prep → extend (PI, YaRN; sp = 2) → evaluate base and "
                             "extended models → comparison table and plots.")
    p.add_argument("--out", default="runs/demo", help="run dir (default %(default)s)")
    p.add_argument("--target-length", type=int, default=2048, help="extended length (default %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help="extension recipes to run (default %(default)s)")
    p.add_argument("--steps", type=int, help="fine-tuning steps per method (default: the recipe's)")
    p.add_argument("--trials", type=int, default=10, help="passkey keys per (length, depth) cell "
                   "(default %(default)s)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey depths (default %(default)s)")
    p.add_argument("--nproc", type=int, default=2, help="processes for fine-tuning = sp degree "
                   "(default %(default)s)")
    p.add_argument("--base-model", default=BASE_MODEL, help="base model dir or shipped name "
                   "(default %(default)s)")
    return p


def prep_corpus(output: Path, tokenizer_dir: Path, original: int, target: int) -> Path:
    """`recipes/prep/demo-extend.yaml` with the output, tokenizer and lengths of this run: rows of `target`
    tokens, passkey samples from `original` tokens to a few tokens under `target`."""
    import yaml

    from longtune.data_prep.api import PrepError, config_from_dict, prepare_corpus

    from ..recipe import RECIPES_DIR

    data = yaml.safe_load((RECIPES_DIR / "prep" / "demo-extend.yaml").read_text())
    data.update(output=str(output), tokenizer=str(tokenizer_dir), seq_len=target, overwrite=True)
    for source in data["sources"]:
        if source["type"] == "passkey":
            source.update(min_length_tokens=original, length_tokens=target - 8)  # room for answer + EOS
    try:
        return Path(prepare_corpus(config_from_dict(data, "demo prep")).output)
    except PrepError as exc:
        raise DemoError(f"prep: {exc}") from None


def eval_lengths(original: int, target: int) -> list[int]:
    """original, 2×original, … up to target (inclusive)."""
    lengths, n = [], original
    while n < target:
        lengths.append(n)
        n *= 2
    return lengths + [target]


def perplexity_text_count(model_dir: Path, target: int, most: int = 4) -> int:
    """How many texts of `target` tokens the held-out documents give, at most `most` (eval deals the
    documents out to the texts one by one, so each text must reach the length on its own)."""
    from ..evaluate.common import load_model_dir_tokenizer, long_text_documents
    from ..evaluate.perplexity import perplexity_texts

    tokenizer, documents = load_model_dir_tokenizer(model_dir), long_text_documents()
    for count in range(most, 0, -1):
        try:
            perplexity_texts(tokenizer, documents, count, target)
            return count
        except EvalError:
            continue
    raise DemoError(f"the held-out documents hold fewer than {target} tokens: perplexity at --target-length "
                    f"{target} cannot be measured")


def _stage(title: str) -> None:
    print(f"\n== longtune demo: {title}", flush=True)


def _run(cmd: list[str], what: str) -> None:
    """Run a stage's command; a signal to the demo stops it and ends the demo with exit code 128 + signal."""
    started = time.perf_counter()
    try:
        code = run_child(cmd, os.environ.copy())
    except ChildInterrupted as exc:  # the stopped `longtune train` has said so on its own error line
        raise SystemExit(exc.exit_code) from None
    if code != 0:
        raise DemoError(f"{what} failed (exit {code}): {' '.join(cmd)}")
    print(f"   {what}: {time.perf_counter() - started:.0f} s", flush=True)


def _longtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "longtune.train.cli", *args]


def run_demo(args: argparse.Namespace) -> dict:
    from longtune.parallel.layout_rules import ulysses_heads_problem

    from ..evaluate.report import write_report
    from ..evaluate.suite import evaluate
    from ..model import resolve_model_source
    from ..recipe import RECIPES_DIR

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise DemoError(f"--methods: unknown {', '.join(bad) or '(empty)'}; valid: {', '.join(METHODS)}")
    base_dir = Path(resolve_model_source(args.base_model).name_or_path)
    config = json.loads((base_dir / "config.json").read_text())
    original = int(config["max_position_embeddings"])
    if args.target_length <= original:
        raise DemoError(f"--target-length {args.target_length} must exceed the base model's "
                        f"{original} positions")
    heads = int(config["num_attention_heads"])
    problem = ulysses_heads_problem(heads, int(config.get("num_key_value_heads") or heads), args.nproc)
    if problem:  # the extend stage trains with parallel.sp.ulysses = --nproc
        raise DemoError(f"--nproc {args.nproc}: {problem}; use a divisor of {heads}")
    ppl_texts = perplexity_text_count(base_dir, args.target_length)  # before any work: enough held-out text?
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    _stage(f"prep: embedded text + Landmark passkey samples packed to {args.target_length} tokens")
    t = time.perf_counter()
    data = prep_corpus(out / "data", base_dir, original, args.target_length)
    print(f"   prep: {time.perf_counter() - t:.0f} s", flush=True)
    timings["prep"] = time.perf_counter() - t

    models = {"base": base_dir}
    for method in methods:
        _stage(f"extend with {method}: {original} → {args.target_length} tokens, sp = {args.nproc}")
        t = time.perf_counter()
        run_dir = out / method
        overrides = [f"model.name_or_path={base_dir}", f"data.path={data}", f"train.output_dir={run_dir}",
                     f"extension.target_length={args.target_length}", f"train.seq_len={args.target_length}",
                     f"parallel.sp.ulysses={args.nproc}", "train.resume=false", "train.overwrite=true"]
        if args.steps:
            overrides.append(f"train.max_steps={args.steps}")
        _run(_longtune("train", str(RECIPES_DIR / f"demo-extend-{method}.yaml"), *overrides), f"extend {method}")
        models[method] = run_dir / "model"
        timings[f"extend {method}"] = time.perf_counter() - t

    lengths = eval_lengths(original, args.target_length)
    depths = sorted({float(d) for d in args.depths.split(",")})
    results = {}
    for name, model_dir in models.items():
        _stage(f"evaluate {name}: passkey {lengths} × {len(depths)} depths × {args.trials} keys, perplexity")
        t = time.perf_counter()
        res = evaluate(model_dir, lengths, depths, ["passkey", "ppl"], ["single_window"], args.trials,
                       ppl_texts=ppl_texts, stride=256, texts=None, seed=0, device="auto", dtype="float32",
                       progress=True, passkey_keys=PASSKEY_KEYS)
        eval_dir = out / "eval" / name
        eval_dir.mkdir(parents=True, exist_ok=True)
        write_report(res, eval_dir)
        results[name] = res
        timings[f"eval {name}"] = time.perf_counter() - t

    timings["total"] = time.perf_counter() - started
    summary = compare(results, original, args.target_length, timings)
    write_comparison(summary, results, out, original)
    return summary


def _passkey_by_length(res: dict) -> dict[int, float]:
    by: dict[int, list[float]] = {}
    for c in res["passkey"]["cells"]:
        by.setdefault(c["length"], []).append(c["accuracy"])
    return {n: sum(v) / len(v) for n, v in by.items()}


def _ppl_by_length(res: dict) -> dict[int, float]:
    return {p["length"]: p["ppl"] for p in res["perplexity"]["points"] if p["protocol"] == "single_window"}


def _beyond_window(res: dict, original: int, target: int) -> float | None:
    """Passkey accuracy at `target` over the cells whose needle lies more than `original` tokens before the
    prompt's end: outside the window the base was trained on (None: no such cell)."""
    far = [c["accuracy"] for c in res["passkey"]["cells"]
           if c["length"] == target and c["needle_distance"] > original]
    return sum(far) / len(far) if far else None


def compare(results: dict, original: int, target: int, timings: dict[str, float]) -> dict:
    """Per model: passkey mean per length, the mean at the target over the needles beyond the original window,
    worst cell up to the target, perplexity per length and the ratio ppl(target) / ppl(original)."""
    rows = {}
    for name, res in results.items():
        ppl = _ppl_by_length(res)
        worst = min(c["accuracy"] for c in res["passkey"]["cells"] if c["length"] <= target)
        rows[name] = {"passkey": _passkey_by_length(res), "beyond_window": _beyond_window(res, original, target),
                      "worst_cell": worst, "ppl": ppl, "ppl_ratio": ppl[target] / ppl[original]}
    return {"original_length": original, "target_length": target, "models": rows,
            "seconds": {k: round(v, 1) for k, v in timings.items()}}


def comparison_markdown(summary: dict) -> str:
    lengths = sorted(next(iter(summary["models"].values()))["passkey"])
    target, original = summary["target_length"], summary["original_length"]
    lines = [f"# longtune demo: {original} → {target} tokens", "",
             "## Passkey accuracy (mean over depths) and perplexity against length", "",
             "| model | " + " | ".join(f"passkey {n}" for n in lengths)
             + f" | passkey {target}, needle > {original} back | worst cell | "
             + " | ".join(f"ppl {n}" for n in lengths) + f" | ppl {target} / ppl {original} |",
             "|---" * (2 * len(lengths) + 4) + "|"]
    for name, row in summary["models"].items():
        beyond = "–" if row["beyond_window"] is None else f"{row['beyond_window']:.2f}"
        lines.append(f"| {name} | " + " | ".join(f"{row['passkey'][n]:.2f}" for n in lengths)
                     + f" | {beyond} | {row['worst_cell']:.2f} | "
                     + " | ".join(f"{row['ppl'][n]:.2f}" for n in lengths) + f" | {row['ppl_ratio']:.3f} |")
    lines += ["", "Passkey: Landmark prompt with a one-token word key, exact match of the first generated word; "
              f"base = the shipped model at {original} tokens evaluated by direct extrapolation. \"needle > {original} "
              f"back\": the mean at {target} over the depths whose needle lies outside the last {original} tokens "
              f"(at depth 100 % it is inside them, where the base itself finds it). Perplexity: single "
              "window, held-out embedded documents (in no training corpus of the base or the extensions). "
              "Per-model tables and heatmaps: `eval/<model>/results.md`.", "",
              "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()), ""]
    return "\n".join(lines)


def write_comparison(summary: dict, results: dict, out: Path, original: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..evaluate.report import _grid

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        lengths, depths, grid = _grid(results[name]["passkey"]["cells"], "accuracy")
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8)
        ax.set_title(f"passkey: {name}", fontsize=10)
        ax.set_xlabel("context length")
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03)
    with atomic_write(out / "passkey_heatmaps.png", "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        pts = sorted(_ppl_by_length(results[name]).items())
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
    ax.axvline(original, color="grey", linestyle="--", linewidth=1, label=f"base length {original}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity (single window)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(out / "perplexity.png", "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
    for name, text in (("results.md", comparison_markdown(summary)),
                       ("results.json", json.dumps(summary, indent=2) + "\n")):
        with atomic_write(out / name) as handle:
            handle.write(text)


@command_main
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.trials < 1 or args.nproc < 1:
        raise DemoError("--trials and --nproc must be at least 1")
    summary = run_demo(args)
    print()
    print(comparison_markdown(summary))
    print(f"wrote {Path(args.out) / 'results.md'}, passkey_heatmaps.png, perplexity.png")
    return 0
