"""Checkpoint directories: written atomically, found again on resume, pruned to the newest few.

`checkpoints/step_00000010/` is complete only once it holds `trainer_state.json`; it is first
written as `step_00000010.partial/` and renamed by rank 0 after every rank has finished, so a run
that dies mid-write leaves nothing that looks complete. Per-rank RNG states are tensors read back
with `weights_only=True`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from longtune.parallel.dims import barrier

_STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_checkpoint(output_dir: Path, step: int, backend, trainer_state: dict[str, Any], keep: int) -> Path:
    """Collective. `backend.save_checkpoint` writes the model and optimizer; this adds RNG and state."""
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    partial = root / f"step_{step:08d}.partial"
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    backend.save_checkpoint(partial)
    torch.save(_rng_state(), partial / f"rng_rank{_rank():05d}.pt")
    barrier()
    if _rank() == 0:
        (partial / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for _, old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def checkpoint_layout(recipe, world: int) -> dict:
    """What a checkpoint's format depends on. DCP (native) reshards to any world size; DeepSpeed
    ZeRO checkpoints need the same stage and world size."""
    par = recipe.parallel
    if par.backend == "native":
        return {"backend": "native"}
    return {"backend": "deepspeed", "zero_stage": par.deepspeed.zero_stage, "world_size": world}


class ResumeError(RuntimeError):
    """A checkpoint that this run cannot continue from."""

    user_facing = True  # the CLI prints it as one error line, without a traceback


def check_resumable(path: Path, layout: dict[str, Any]) -> None:
    """Refuse, with the differences named, a checkpoint written under another layout."""
    written = json.loads((path / STATE_FILE).read_text()).get("layout", {})
    diff = {k: (written.get(k), v) for k, v in layout.items() if written.get(k) != v}
    if diff:
        what = ", ".join(f"{k} {old} → {new}" for k, (old, new) in diff.items())
        raise ResumeError(f"cannot resume from {path}: it was written with another layout ({what}); "
                          "use a new train.output_dir or train.resume=false")


def load_checkpoint(path: Path, backend) -> dict[str, Any]:
    backend.load_checkpoint(path)
    rng_file = path / f"rng_rank{_rank():05d}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / STATE_FILE).read_text())


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
