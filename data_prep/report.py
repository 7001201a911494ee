"""The end-of-run report: a plain-text table and PNG plots (length histograms per source, achieved vs
requested shares, row fill)."""

from __future__ import annotations

from pathlib import Path


def format_table(meta: dict) -> str:
    lines = [f"{'source':<20} {'docs':>9} {'tokens':>14} {'share':>7} {'requested':>10}  dropped"]
    for s in meta["sources"]:
        req = s["requested"] or {}
        want = f"{req['share']:.3f}" if "share" in req else (f"{req['tokens']:,}" if "tokens" in req else "all")
        dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "-"
        lines.append(f"{s['name'][:20]:<20} {s['documents_kept']:>9,} {s['achieved_tokens']:>14,} "
                     f"{s['achieved_share']:>7.3f} {want:>10}  {dropped}")
    lines.append(f"rows {meta['rows']:,} × seq_len {meta['seq_len']:,} ({meta['strategy']}): fill "
                 f"{100 * meta['fill_efficiency']:.3f} %, pad tokens {meta['pad_tokens']:,}, split documents "
                 f"{meta['documents_split']:,} (+{meta['extra_pieces']:,} pieces), truncated tokens "
                 f"{meta['truncated_tokens']:,}")
    lines.append(f"content hash {meta['content_hash'][:16]}…  in {meta['elapsed_s']:.1f} s")
    return "\n".join(lines)


def write_plots(directory: Path, stats, meta: dict, row_fill: list[int], seq_len: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(directory) / "report"
    out.mkdir(exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for st in stats:
        if len(st.lengths):
            ax.hist(np.log10(np.maximum(st.lengths, 1)), bins=40, alpha=0.5, label=st.name)
    ax.set_xlabel("log10(document tokens)")
    ax.set_ylabel("documents")
    ax.set_title("Document lengths per source")
    ax.legend()
    paths.append(out / "doc_lengths.png")
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [s["name"] for s in meta["sources"]]
    achieved = [s["achieved_share"] for s in meta["sources"]]
    requested = [(s["requested"] or {}).get("share", np.nan) for s in meta["sources"]]
    x = np.arange(len(names))
    ax.bar(x - 0.2, requested, 0.4, label="requested share")
    ax.bar(x + 0.2, achieved, 0.4, label="achieved share")
    ax.set_xticks(x, names)
    ax.set_title("Token shares per source")
    ax.legend()
    paths.append(out / "shares.png")
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(np.asarray(row_fill) / seq_len, bins=50)
    ax.set_xlabel("row fill (content tokens / seq_len)")
    ax.set_ylabel("rows")
    ax.set_title(f"Fill efficiency {100 * meta['fill_efficiency']:.2f} %")
    paths.append(out / "fill.png")
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)
    return paths
