"""`longtune selftest`: the environment, then one PASS/FAIL table of parity checks (train/parity.py's verdict)
over every sequence-parallel layout and kernel, tp, pp, tiling and recomputation; exit code 1 on any FAIL."""

from __future__ import annotations

import pytest

from conftest import longtune


def test_the_cpu_checks_cover_every_layout_and_kernel():
    from longtune.train.commands.selftest import parity_checks

    checks = parity_checks("cpu", quick=False)
    rows = {(c.name, c.world, c.kernel) for c in checks}
    for kernel in ("torch_cpu", "torch_math"):
        for mode in ("ulysses 2", "ring 2", "zigzag 2"):
            assert (mode, 2, kernel) in rows
        assert ("hybrid 2×2", 4, kernel) in rows
    names = {c.name for c in checks}
    assert {"tp 2", "zigzag 2 + tiled loss", "ulysses 2 + tiled MLP", "zigzag 2 + recompute full"} <= names
    assert {c.world for c in parity_checks("cpu", quick=True)} == {2}


def _assert_table(stdout: str, want_rows: int) -> list[str]:
    assert "torch " in stdout and "transformers " in stdout and "deepspeed " in stdout, stdout
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert len(rows) == want_rows, stdout
    return rows


@pytest.mark.multiproc
def test_quick_selftest_passes():
    proc = longtune("selftest", "--quick")
    rows = _assert_table(proc.stdout, 2)
    assert all("| PASS |" in row for row in rows), proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("PASS: 2 of 2 checks"), proc.stdout


@pytest.mark.slow
@pytest.mark.multiproc
def test_full_selftest_passes():
    from longtune.train.commands.selftest import parity_checks

    proc = longtune("selftest", timeout=1200)
    rows = _assert_table(proc.stdout, len(parity_checks("cpu", quick=False)) + 1)  # + the pipeline check
    assert all("| PASS |" in row for row in rows) and any(row.startswith("| pp 2") for row in rows), proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("PASS:"), proc.stdout
