"""Evaluation results as JSON, a Markdown table and PNG plots (passkey / needle heatmaps: x = length,
y = depth; perplexity against length, one line per protocol, the trained length marked)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _grid(cells: list[dict], key: str) -> tuple[list[int], list[float], np.ndarray]:
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for c in cells:
        grid[depths.index(c["depth"]), lengths.index(c["length"])] = c[key]
    return lengths, depths, grid


def markdown(results: dict) -> str:
    meta = results["model"]
    lines = [f"# longtune eval: {meta['dir']}", "",
             f"max_position_embeddings {meta['max_position_embeddings']}, pre-trained length "
             f"{meta['original_length']}, rope {json.dumps(meta['rope_parameters'])}", ""]
    for task, key, title in (("passkey", "accuracy", "Passkey accuracy (exact match)"),
                             ("needle", "score", "Needle in a haystack (string match)")):
        if task not in results:
            continue
        lengths, depths, grid = _grid(results[task]["cells"], key)
        lines += [f"## {title}", "", "| depth \\ length | " + " | ".join(map(str, lengths)) + " | mean |",
                  "|---" * (len(lengths) + 2) + "|"]
        for i, depth in enumerate(depths):
            lines.append(f"| {depth:.2f} | " + " | ".join(f"{v:.2f}" for v in grid[i]) + " | "
                         f"{np.nanmean(grid[i]):.2f} |")
        lines.append("| mean | " + " | ".join(f"{v:.2f}" for v in np.nanmean(grid, axis=0)) + " | "
                     f"{np.nanmean(grid):.2f} |")
        lines.append("")
    if "perplexity" in results:
        ppl = results["perplexity"]
        protocols = sorted({p["protocol"] for p in ppl["points"]})
        lengths = sorted({p["length"] for p in ppl["points"]})
        value = {(p["protocol"], p["length"]): p["ppl"] for p in ppl["points"]}
        lines += ["## Perplexity against evaluation length", "",
                  "| protocol | " + " | ".join(map(str, lengths)) + " |", "|---" * (len(lengths) + 1) + "|"]
        for proto in protocols:
            lines.append(f"| {proto} | " + " | ".join(f"{value[(proto, n)]:.2f}" for n in lengths) + " |")
        lines += [""] + [f"- `{k}`: {v}" for k, v in ppl["protocols"].items() if k in protocols]
        lines += [f"- {ppl['aggregation']}; {ppl['texts']} texts: {results['text_source']}", ""]
    return "\n".join(lines)


def heatmap(cells: list[dict], key: str, title: str, path: Path, trained_length: int) -> None:
    lengths, depths, grid = _grid(cells, key)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    inside = [j for j, n in enumerate(lengths) if n <= trained_length]
    if inside and len(inside) < len(lengths):
        ax.axvline(max(inside) + 0.5, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def perplexity_plot(ppl: dict, path: Path, trained_length: int, max_positions: int) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for proto in sorted({p["protocol"] for p in ppl["points"]}):
        pts = sorted((p["length"], p["ppl"]) for p in ppl["points"] if p["protocol"] == proto)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=proto)
    ax.axvline(trained_length, color="grey", linestyle="--", linewidth=1, label=f"pre-trained {trained_length}")
    if max_positions != trained_length:
        ax.axvline(max_positions, color="black", linestyle=":", linewidth=1, label=f"max positions {max_positions}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity against evaluation length", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(results: dict, out_dir: Path) -> list[Path]:
    """Write results.json, results.md and the PNGs into `out_dir` (which must exist)."""
    meta = results["model"]
    written = [out_dir / "results.json", out_dir / "results.md"]
    written[0].write_text(json.dumps(results, indent=2) + "\n")
    written[1].write_text(markdown(results))
    if "passkey" in results:
        written.append(out_dir / "passkey_heatmap.png")
        heatmap(results["passkey"]["cells"], "accuracy", "Passkey retrieval (exact match)", written[-1],
                meta["max_position_embeddings"])
    if "needle" in results:
        written.append(out_dir / "needle_heatmap.png")
        heatmap(results["needle"]["cells"], "score", "Needle in a haystack (string match)", written[-1],
                meta["max_position_embeddings"])
    if "perplexity" in results:
        written.append(out_dir / "perplexity.png")
        perplexity_plot(results["perplexity"], written[-1], meta["original_length"],
                        meta["max_position_embeddings"])
    return written
