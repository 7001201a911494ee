"""2-process DDP, FSDP2 (and 1-process FSDP2 with CPU offload), DeepSpeed ZeRO-2 and ZeRO-3 + CPU offload
reproduce the 1-process loss curve at the same global batch (fp32, first 5 steps, within 1e-4 relative).
Real processes on gloo."""

from __future__ import annotations

import pytest

from conftest import PARITY_ARGS, assert_close_curves, assert_same_export, longtune, losses, metrics

pytestmark = pytest.mark.multiproc

LAYOUTS = {
    "ddp": ["parallel.dp=2"],
    "fsdp2": ["parallel.dp=2", "parallel.fsdp=true"],
    "fsdp2-cpu-offload": ["parallel.dp=2", "parallel.fsdp=true", "memory.offload.params=true"],
    "fsdp2-one-process-offload": ["parallel.fsdp=true", "memory.offload.params=true"],
    "zero2": ["parallel.dp=2", "parallel.backend=deepspeed", "parallel.deepspeed.zero_stage=2"],
    "zero3-offload": ["parallel.dp=2", "parallel.backend=deepspeed", "parallel.deepspeed.zero_stage=3",
                      "memory.offload.optimizer=true", "memory.offload.params=true"],
}


# slow: CI time. ZeRO-2 and ZeRO-3 stay in the default suite under sequence parallelism (test_sp_training).
@pytest.mark.parametrize("layout", [pytest.param(k, marks=pytest.mark.slow) if k in ("zero2", "zero3-offload") else k
                                    for k in LAYOUTS])
def test_two_processes_match_one(layout, reference_run, tmp_path):
    proc = longtune("train", *PARITY_ARGS, *LAYOUTS[layout], f"train.output_dir={tmp_path}")
    world = 2 if "parallel.dp=2" in LAYOUTS[layout] else 1
    assert f"world {world} (dp {world})" in proc.stderr
    assert_close_curves(losses(tmp_path), losses(reference_run), rel=1e-4)
    assert [m["tokens"] for m in metrics(tmp_path)] == [m["tokens"] for m in metrics(reference_run)]
    if layout in ("fsdp2", "zero3-offload"):
        assert_same_export(tmp_path / "model", reference_run / "model")


