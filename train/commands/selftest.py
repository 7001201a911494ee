"""`longtune selftest [--quick]`: is this machine's parallel stack correct? Prints the environment, then checks
every sequence-parallel layout (Ulysses, ring, zigzag; hybrid on 4 processes) with every kernel the device
has, tensor parallelism, tiling and recomputation against one process with `longtune parity`'s verdict
(train/parity.py, one step of tiny-smoke), and pipeline parallelism as a 2-step loss curve against one
process (parity compares whole-model gradients, which pipeline stages do not hold). One PASS/FAIL table;
exit code 1 on any FAIL.

The parity checks of one process count run in one launch (`--worker N`, under torchrun): the processes
join their group once and run `check_parity` for each check in turn, so the cost of a check is its step,
not a start of torch. On CPU it runs 2 (and 4) gloo processes; on GPU as many as there are GPUs, up to 4.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..launch import relaunch_under_torchrun, run_child, strip_launcher_args
from . import command_main

BASE = ("tiny-smoke", "train.global_batch_size=2", "train.micro_batch_size=1", "train.collective_timeout_s=120")
"""Every parity check: tiny-smoke, one step of 2 rows of 256 tokens; a hung collective fails within 2 minutes."""

PP_LOSS_RTOL = 1e-5
"""The pipeline check: each step's loss within this relative distance of the 1-process loss (fp32; the
test suite's bound on loss curves)."""


@dataclass(frozen=True)
class Check:
    """One row of the table: a parity check on `world` processes of tiny-smoke with `overrides`."""

    name: str
    world: int
    overrides: tuple[str, ...]
    kernel: str = "default"
    dtype: str = "float32"


@dataclass
class Result:
    name: str
    world: int
    kernel: str
    dtype: str
    ok: bool
    detail: str
    seconds: float = 0.0
    output: str = ""
    """What a FAIL shows under the table: the parity table, or the end of a run's log."""


SP_MODES = {"ulysses 2": ("parallel.sp.ulysses=2",),
            "ring 2": ("parallel.sp.ring=2", "parallel.sp.ring_impl=ring"),
            "zigzag 2": ("parallel.sp.ring=2", "parallel.sp.ring_impl=zigzag")}
HYBRID = ("parallel.sp.ring=2", "parallel.sp.ulysses=2")


def available_kernels(device_type: str) -> dict[str, str]:
    """Kernel → the dtype it is checked in (float32 where it takes it, else bfloat16), for those that run on
    `device_type` with tiny-smoke's head dim."""
    from longtune.parallel.kernels import KERNELS, kernel_problem

    head_dim = 32  # tiny-llama: hidden 128, 4 heads
    out = {}
    for name, spec in KERNELS.items():
        dtype = "float32" if torch.float32 in spec.dtypes else "bfloat16"
        if kernel_problem(name, device_type, dtype, head_dim) is None:
            out[name] = dtype
    return out


def process_counts(device_type: str, quick: bool) -> list[int]:
    """2, and 4 where possible: CPU (gloo) always, GPU with 4 devices."""
    if device_type == "cuda":
        gpus = torch.cuda.device_count()
        return [n for n in (2, 4) if n <= gpus and not (quick and n == 4)]
    return [2] if quick else [2, 4]


def parity_checks(device_type: str, quick: bool) -> list[Check]:
    counts = process_counts(device_type, quick)
    if quick:  # one ring and one Ulysses layout, the default kernel
        return [Check(name, 2, SP_MODES[name]) for name in ("zigzag 2", "ulysses 2")] if 2 in counts else []
    checks = []
    for kernel, dtype in available_kernels(device_type).items():
        pick = (f"parallel.sp.kernel={kernel}", f"model.dtype={dtype}")
        if 2 in counts:
            checks += [Check(name, 2, (*mode, *pick), kernel, dtype) for name, mode in SP_MODES.items()]
        if 4 in counts:
            checks.append(Check("hybrid 2×2", 4, (*HYBRID, *pick), kernel, dtype))
    if 2 in counts:
        checks += [Check("tp 2", 2, ("parallel.tp=2",)),
                   Check("zigzag 2 + tiled loss", 2, (*SP_MODES["zigzag 2"], "memory.tiled_loss=true",
                                                      "memory.tiled_loss_chunk=64")),
                   Check("ulysses 2 + tiled MLP", 2, (*SP_MODES["ulysses 2"], "memory.tiled_mlp=true",
                                                      "memory.tiled_mlp_chunk=64")),
                   Check("zigzag 2 + recompute full", 2, (*SP_MODES["zigzag 2"], "memory.recompute=full"))]
    return checks


# -- the worker: every check of one process count in one launch ----------------------------------------------

def run_worker(checks: list[Check], results_path: Path) -> None:
    """Each rank runs `check_parity` for every check; rank 0 appends one JSON result per check."""
    from longtune.parallel.dims import barrier

    from ..parity import check_parity
    from ..recipe import RecipeError
    from .parity import parity_recipe

    rank = int(os.environ.get("RANK", "0"))
    for check in checks:
        started = time.perf_counter()
        table = io.StringIO()
        try:
            with contextlib.redirect_stdout(table):
                steps = check_parity(parity_recipe(BASE[0], [*BASE[1:], *check.overrides]), steps=1)
            ok = all(s.ok for s in steps)
            worst = max(steps, key=lambda s: s.layout.grad / max(s.noise.grad, 1e-300)) if steps else None
            detail = (f"grad err. {worst.layout.grad:.1e} (1 process {worst.noise.grad:.1e}), loss err. "
                      f"{worst.layout.loss:.1e} (1 process {worst.noise.loss:.1e})") if worst else ""
        except RecipeError as exc:  # the same on every rank, before any collective
            ok, detail = False, f"refused: {exc}"
        barrier()
        if rank == 0:
            result = Result(check.name, check.world, check.kernel, check.dtype, ok, detail,
                            time.perf_counter() - started, table.getvalue())
            with results_path.open("a") as f:
                f.write(json.dumps(asdict(result)) + "\n")
            print(f"selftest: {check.name} ({check.world} processes, {check.kernel}, {check.dtype}): "
                  f"{'PASS' if ok else 'FAIL'} in {result.seconds:.0f} s", flush=True)


def launch_worker(world: int, checks: list[Check], workdir: Path) -> list[Result]:
    """Run `checks` on `world` processes; a check without a result (the launch failed) is a FAIL."""
    spec = workdir / f"checks-{world}.json"
    spec.write_text(json.dumps([asdict(c) for c in checks]))
    results_path = workdir / f"results-{world}.jsonl"
    code = relaunch_under_torchrun(world, "longtune.train.commands.selftest",
                                   ["--worker", str(spec), "--results", str(results_path)])
    done = [Result(**json.loads(line)) for line in results_path.read_text().splitlines()] \
        if results_path.exists() else []
    missing = [Result(c.name, c.world, c.kernel, c.dtype, False, f"not run: the {world}-process launch exited "
                      f"{code} (its output is above)") for c in checks[len(done):]]
    return done + missing


# -- the pipeline check -------------------------------------------------------------------------------------

@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """This process's and its children's stdout and stderr go to `path` (file descriptors 1 and 2)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with path.open("ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, old in zip((1, 2), saved, strict=True):
                os.dup2(old, fd)
                os.close(old)


def pipeline_check(workdir: Path) -> Result:
    """2 steps of tiny-smoke with pp 2 against 1 process: each step's loss within PP_LOSS_RTOL."""
    started = time.perf_counter()
    args = ["tiny-smoke", "train.max_steps=2", "train.progress=false", "train.export=false",
            "train.collective_timeout_s=120"]
    log = workdir / "pipeline.log"
    losses = {}
    for name, extra in (("one", []), ("pp", ["parallel.pp=2"])):
        out = workdir / f"pp-{name}"
        with output_to(log):
            code = run_child([sys.executable, "-m", "longtune.train.cli", "train", *args, *extra,
                              f"train.output_dir={out}"])
        if code != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            return Result("pp 2 (2-step loss curve)", 2, "default", "float32", False,
                          f"`longtune train` ({name}) exited {code}", time.perf_counter() - started, tail + "\n")
        losses[name] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses["pp"], losses["one"], strict=True))
    return Result("pp 2 (2-step loss curve)", 2, "default", "float32", rel <= PP_LOSS_RTOL,
                  f"loss rel. diff {rel:.1e} (bound {PP_LOSS_RTOL:g})", time.perf_counter() - started)


# -- the environment and the table --------------------------------------------------------------------------

def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> list[str]:
    """torch, CUDA, NCCL, flash-attn, transformers and deepspeed versions; the devices."""
    lines = [f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"]
    if torch.cuda.is_available():
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"NCCL {nccl}; {len(names)} GPU(s): {', '.join(names)}")
    else:
        lines.append(f"NCCL none; no GPU: CPU with {os.cpu_count()} cores (gloo)")
    lines.append(", ".join(f"{p} {_version(p)}" for p in ("flash-attn", "transformers", "deepspeed")))
    return lines


def format_table(results: list[Result]) -> str:
    rows = ["| check | processes | kernel | dtype | result | detail |", "|---|---|---|---|---|---|"]
    rows += [f"| {r.name} | {r.world} | {r.kernel} | {r.dtype} | {'PASS' if r.ok else 'FAIL'} | {r.detail} |"
             for r in results]
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longtune selftest", description="Check the parallel stack of this machine "
                                "against one process: every sequence-parallel layout and kernel, tp, pp, tiling, "
                                "recomputation.")
    p.add_argument("--quick", action="store_true", help="only zigzag ring 2 and Ulysses 2 with the default kernel")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a rank of one launch: the checks' JSON
    p.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    return p


@command_main
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(strip_launcher_args(argv))
    if args.worker is not None:
        run_worker([Check(**{**c, "overrides": tuple(c["overrides"])}) for c in json.loads(args.worker.read_text())],
                   args.results)
        return 0
    started, cpu = time.perf_counter(), _cpu_seconds()
    print("\n".join(environment()), flush=True)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    checks = parity_checks(device_type, args.quick)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="longtune-selftest-") as tmp:
        workdir = Path(tmp)
        for world in sorted({c.world for c in checks}):
            results += launch_worker(world, [c for c in checks if c.world == world], workdir)
        if not args.quick and 2 in process_counts(device_type, quick=False):
            results.append(pipeline_check(workdir))
        print(format_table(results))
    for r in results:
        if not r.ok and r.output:
            print(f"\n{r.name} ({r.kernel}, {r.dtype}):\n{r.output}", end="")
    if not checks:
        print(f"no parallel check can run here: it needs 2 processes, and {device_type} has "
              f"{torch.cuda.device_count()} device(s)")
    ok = bool(results) and all(r.ok for r in results)
    print(f"{'PASS' if ok else 'FAIL'}: {sum(r.ok for r in results)} of {len(results)} checks in "
          f"{time.perf_counter() - started:.0f} s ({_cpu_seconds() - cpu:.0f} s CPU)", flush=True)
    return 0 if ok else 1


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


if __name__ == "__main__":  # a rank of `longtune selftest --worker`
    raise SystemExit(main())
