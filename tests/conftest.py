"""Shared helpers: run longtune as a user would (subprocesses with a timeout) and read run dirs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BIN = Path(PYTHON).parent

#: Every multi-process run is bounded: a hang fails the test instead of stalling CI.
RUN_TIMEOUT_S = 300


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = RUN_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def longtune(*args: str, check: bool = True, timeout: float = RUN_TIMEOUT_S, **env: str
             ) -> subprocess.CompletedProcess:
    return run([str(BIN / "longtune"), *args], check=check, timeout=timeout, env=subprocess_env(**env))


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(run_dir)]


def assert_close_curves(got: list[float], want: list[float], rel: float) -> None:
    assert len(got) == len(want), (got, want)
    for step, (g, w) in enumerate(zip(got, want, strict=True), start=1):
        assert abs(g - w) <= rel * abs(w), f"step {step}: {g} vs {w} (rel {abs(g - w) / abs(w):.2e} > {rel})"


#: The common short run of the parity tests: tiny-smoke, 5 steps, fp32, no progress bar.
PARITY_ARGS = ("tiny-smoke", "train.max_steps=5", "train.progress=false")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """The single-process run every parallel run is compared with."""
    out = tmp_path_factory.mktemp("reference")
    longtune("train", *PARITY_ARGS, f"train.output_dir={out}")
    return out


#: The common 3-step run of the memory and sequence-parallel curve tests.
CURVE_ARGS = ("tiny-smoke", "train.max_steps=3", "train.progress=false", "train.export=false")


@pytest.fixture(scope="session")
def curve_reference(tmp_path_factory) -> Path:
    """The single-process 3-step run (`CURVE_ARGS`) every memory saver's and layout's curve is compared with."""
    out = tmp_path_factory.mktemp("curve-reference")
    longtune("train", *CURVE_ARGS, f"train.output_dir={out}")
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """An untrained tiny-llama HF dir with the embedded tokenizer (for tests that need no training)."""
    from longtune.train.model import build_config, build_model, resolve_model_source
    from longtune.train.tokenizer import embedded_tokenizer

    tokenizer = embedded_tokenizer()
    source = resolve_model_source("tiny-llama")
    model = build_model(source, build_config(source, len(tokenizer), {}), device="cpu",
                        attn_implementation="sdpa", seed=0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def assert_same_export(got_dir, want_dir) -> None:
    """A parallel run's HF export holds the whole trained weights of the 1-process run. Adam turns
    summation-order noise in the tiny gradients of rare embedding rows into a few % of one LR step (tp = 2 on
    an AVX512 Xeon: one of 262,144 embedding values off by 1.6e-4, 5 % of tiny-smoke's lr 3e-3; every other
    tensor within 2e-5), hence atol 5e-4 (unsharded values are ~1e-2; a missing gather or stage would be off
    by that much)."""
    import torch
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(got_dir).state_dict()
    want = AutoModelForCausalLM.from_pretrained(want_dir).state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=5e-4, msg=name)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not): read from /proc, Linux only."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"
