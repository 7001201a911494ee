"""`longtune parity`'s verdict: the layout's error against a float64 one-process run, bounded by a multiple of
the one-process error in the same dtype (train/parity.py). It passes bf16 sequence parallelism, fails a
broken kernel (tests/parity_fault_worker.py), and (slow) passes a 30-layer model in fp32 where a fixed 1e-5
tolerance is within fp32 noise."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO, free_port, longtune, run, subprocess_env


def test_errors_are_relative_to_the_float64_run():
    from longtune.train.parity import relative_errors

    ref = {"a": torch.tensor([2.0, -4.0], dtype=torch.float64), "b": torch.tensor([1.0], dtype=torch.float64)}
    errors = relative_errors(10.5, {"a": torch.tensor([2.0, -3.0]), "b": torch.tensor([1.0])}, 10.0, ref)
    assert errors.loss == pytest.approx(0.05) and errors.grad == pytest.approx(0.25) and errors.worst == "a"
    broken = relative_errors(10.0, {"a": torch.tensor([float("nan"), 0.0]), "b": torch.tensor([1.0])}, 10.0, ref)
    assert broken.grad == float("inf") and broken.worst == "a"


def test_the_bound_scales_with_the_one_process_error():
    from longtune.train.parity import Bound, Errors

    fp32, bf16 = Bound.for_dtype("float32"), Bound.for_dtype("bfloat16")
    assert fp32.of(1e-5) == pytest.approx(8e-5 + 1e-6)
    assert bf16.of(1e-2) == pytest.approx(2e-2 + 1e-3)  # the kernel tests' bf16 bound (test_kernel_fakes.py)
    noise = Errors(loss=1e-8, grad=4e-6, worst="w")
    # A deep model's fp32 spread (zigzag ring: 1.35e-5 against another fp32 order) passes; an O(1e-3) error fails.
    assert fp32.passes(Errors(2e-8, 1.35e-5, "w"), noise)
    assert not fp32.passes(Errors(2e-8, 1e-3, "w"), noise)
    assert not fp32.passes(Errors(2e-6, 1e-6, "w"), noise)  # the loss is judged too
    assert Bound.for_dtype("float32", tol=0.0).of(1.0) == 0.0  # --tol replaces the bound


def _table(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]


@pytest.mark.multiproc
def test_bf16_sequence_parallelism_passes():
    proc = longtune("parity", "tiny-smoke", "parallel.sp.ring=2", "launch.nproc_per_node=2", "model.dtype=bfloat16",
                    "--steps", "1")
    assert "bfloat16; errors relative to 1 process in float64" in proc.stdout, proc.stdout
    rows = _table(proc.stdout)
    assert len(rows) == 1 and rows[0].endswith("| ok |") and proc.stdout.strip().endswith("PASS"), proc.stdout


@pytest.mark.multiproc
@pytest.mark.parametrize("fault,args", [pytest.param("causal", ["model.dtype=bfloat16"], marks=pytest.mark.slow),
                                        ("scale=1e-4", [])],  # fp32: a 1e-4 error is far above the fp32 noise
                         ids=["bf16-mask-bug", "fp32-scale-off-by-1e-4"])
def test_a_broken_kernel_fails(fault, args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "parity_fault_worker.py"), "tiny-smoke", "parallel.sp.ring=2", *args, "--steps", "1"]
    proc = run(cmd, env=subprocess_env(LONGTUNE_TEST_BROKEN_KERNEL=fault), check=False)
    assert proc.returncode != 0, proc.stdout
    rows = _table(proc.stdout)
    assert len(rows) == 1 and rows[0].endswith("| FAIL |") and proc.stdout.strip().endswith("FAIL"), proc.stdout


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("layout", [["parallel.sp.ring=2", "parallel.sp.ring_impl=ring"], ["parallel.sp.ring=2"],
                                    ["parallel.sp.ulysses=2"]], ids=["ring", "zigzag", "ulysses"])
def test_a_deep_model_passes_in_fp32(layout):
    proc = longtune("parity", "tiny-smoke", "model.config_overrides.num_hidden_layers=30",
                    "train.global_batch_size=2", "train.micro_batch_size=1", *layout, timeout=900)
    assert proc.stdout.strip().endswith("PASS"), proc.stdout
