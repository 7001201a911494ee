"""Checkpoint directories: written atomically, found again on resume, pruned to the newest few.

`checkpoints/step_00000010/` is complete only once it holds `trainer_state.json`; it is first
written as `step_00000010.partial/` and renamed by rank 0 after every rank has finished, so a run
that dies mid-write leaves nothing that looks complete. Per-rank RNG states are tensors read back
with `weights_only=True`; the backends' files are read through `longtune.parallel.safe_load`'s
allow-lists, and `check_resumable` scans every pickle of a checkpoint against them first.

The last file written before the rename is `manifest.json`: the relative path, size and SHA-256 of every
other file. Before a resume, the process that owns the run (`rundir.prepare_run_dir`) checks the newest
checkpoint against it and moves a corrupt one aside to `step_N.corrupt/`, falling back to the newest good
one; a checkpoint without a manifest (older longtune) is used unverified, with a warning. Stale
`.partial` and `.corrupt` dirs are removed at start and when a save prunes.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from longtune.data_prep.user_error import UserError
from longtune.parallel.dims import barrier
from longtune.parallel.safe_load import scan_checkpoint

_STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
_STALE_DIR = re.compile(r"^step_\d{8}\.(partial|corrupt)$")


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(path: Path) -> None:
    """Relative path, size and SHA-256 of every file in the checkpoint dir `path` (the last file written)."""
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        files[f.relative_to(path).as_posix()] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    (path / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(path: Path) -> tuple[bool, str]:
    """(usable, what is wrong or "" when verified). No manifest: usable unverified if its state parses."""
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        try:
            json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError) as exc:
            return False, f"{STATE_FILE} unreadable ({exc.__class__.__name__})"
        return True, "no manifest"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False, f"{MANIFEST_FILE} unreadable"
    for rel, want in files.items():
        f = path / rel
        if not f.is_file():
            return False, f"{rel} missing"
        if f.stat().st_size != want["size"]:
            return False, f"{rel} is {f.stat().st_size} bytes, not {want['size']}"
        if _sha256(f) != want["sha256"]:
            return False, f"{rel} SHA-256 mismatch"
    return True, ""


def remove_stale_checkpoint_dirs(output_dir: Path) -> None:
    """Remove `step_N.partial/` (a save that died) and `step_N.corrupt/` (set aside by a resume)."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for path in root.iterdir():
            if _STALE_DIR.match(path.name):
                shutil.rmtree(path, ignore_errors=True)


def set_aside_corrupt_checkpoints(output_dir: Path) -> tuple[int, Path] | None:
    """Verify the newest checkpoint; move corrupt ones aside (`step_N.corrupt/`) until one is usable, and
    return it. One process runs this before any rank looks for a checkpoint; one warning line on stderr."""
    corrupt = []
    for step, path in reversed(complete_checkpoints(output_dir)):
        ok, problem = verify_checkpoint(path)
        if ok:
            notes = [f"corrupt checkpoints moved aside ({'; '.join(corrupt)})"] if corrupt else []
            if problem:
                notes.append(f"{path} has no {MANIFEST_FILE} (written by an older longtune): resuming from it "
                             "unverified")
            elif corrupt:
                notes.append(f"resuming from {path}, the newest good one")
            if notes:
                print(f"longtune: warning: {'; '.join(notes)}", file=sys.stderr, flush=True)
            return step, path
        aside = path.with_name(path.name + ".corrupt")
        shutil.rmtree(aside, ignore_errors=True)
        path.rename(aside)
        corrupt.append(f"{path.name}: {problem} → {aside.name}")
    if corrupt:
        print(f"longtune: warning: corrupt checkpoints moved aside ({'; '.join(corrupt)}); no good checkpoint "
              "left: starting from step 0", file=sys.stderr, flush=True)
    return None


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
        write_manifest(partial)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for _, old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        remove_stale_checkpoint_dirs(output_dir)
    barrier()
    return final


def checkpoint_layout(recipe, world: int) -> dict:
    """What a checkpoint's format depends on. DCP (native) reshards to any world size; DeepSpeed
    ZeRO checkpoints need the same stage and world size."""
    par = recipe.parallel
    if par.backend == "native":
        return {"backend": "native"}
    return {"backend": "deepspeed", "zero_stage": par.deepspeed.zero_stage, "world_size": world}


class ResumeError(UserError, RuntimeError):
    """A checkpoint that this run cannot continue from."""


def check_resumable(path: Path, layout: dict[str, Any]) -> None:
    """Refuse, with the differences named, a checkpoint written under another layout, and one whose
    pickles name anything outside the allow-lists (`longtune.parallel.safe_load`)."""
    written = json.loads((path / STATE_FILE).read_text()).get("layout", {})
    diff = {k: (written.get(k), v) for k, v in layout.items() if written.get(k) != v}
    if diff:
        what = ", ".join(f"{k} {old} → {new}" for k, (old, new) in diff.items())
        raise ResumeError(f"cannot resume from {path}: it was written with another layout ({what}); "
                          "use a new train.output_dir or train.resume=false")
    # Every pickle in it against the allow-lists the loaders enforce (no code runs from a shared checkpoint).
    scan_checkpoint(path)


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
