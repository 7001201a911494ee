"""The same recipe launched by torchrun, accelerate and the deepspeed launcher writes matching metrics."""

from __future__ import annotations

import pytest

from conftest import BIN, PARITY_ARGS, assert_close_curves, free_port, losses, metrics, run, subprocess_env

pytestmark = pytest.mark.multiproc

ARGS = [*PARITY_ARGS, "parallel.dp=2"]


def _launch(kind: str, out) -> None:
    port = str(free_port())
    commands = {
        "torchrun": [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port,
                     "-m", "longtune.train"],
        "accelerate": [str(BIN / "accelerate"), "launch", "--config_file", "recipes/accelerate/multi-cpu.yaml",
                       "--main_process_port", port, "-m", "longtune.train"],
        "deepspeed": [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port,
                      "--module", "longtune.train"],
    }
    from conftest import REPO

    env = subprocess_env(ACCELERATE_USE_CPU="1") if kind == "accelerate" else subprocess_env()
    run([*commands[kind], *ARGS, f"train.output_dir={out}"], cwd=REPO, env=env)


@pytest.mark.parametrize("kind", ["torchrun", "accelerate", "deepspeed"])
def test_launchers_write_matching_metrics(kind, reference_run, tmp_path):
    _launch(kind, tmp_path)
    got, want = metrics(tmp_path), metrics(reference_run)
    assert [(m["step"], m["tokens"], m["lr"]) for m in got] == [(m["step"], m["tokens"], m["lr"]) for m in want]
    assert_close_curves(losses(tmp_path), losses(reference_run), rel=1e-5)
    assert (tmp_path / "checkpoints" / "step_00000005").is_dir()
