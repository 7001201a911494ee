"""Run output on rank 0: `metrics.jsonl` (one object per optimizer step), a progress bar, optional wandb."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLogger:
    """Writes metrics on rank 0; every other rank gets a logger that does nothing."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int,
                 progress: bool, wandb_mode: str, wandb_project: str, wandb_name: str | None,
                 config: dict[str, Any]) -> None:
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self._bar = None
        self._wandb = None
        if not enabled:
            return
        # On resume, keep only the steps the checkpoint covers: the rest will be written again.
        kept = [m for m in read_metrics(run_dir) if m["step"] <= start_step]
        self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr)
        if wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(project=wandb_project, name=wandb_name or run_dir.name, mode=wandb_mode,
                                     dir=str(run_dir), config=config, resume="allow")

    def log_step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if self._wandb is not None:
            self._wandb.log(record, step=record["step"])

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
