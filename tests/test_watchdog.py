"""The hung-rank watchdog (parallel/watchdog.py), with real processes and real signals: a SIGSTOPped rank ends
the whole run (torchrun, every worker, the stopped one included) within train.hang_timeout_s + 10 s with one
error line and a non-zero exit; a step longer than hang_timeout_s is no false alarm. Every run is bounded by
a timeout and whatever a failed test left running is SIGKILLed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, metrics, process_alive, subprocess_env
from longtune.train.launch import descendants

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

HANG_S = 10
START_S = 240
"""How long a 2-process run may take to write its first metrics line on 2 busy cores."""
RUN_S = 300


def _is_worker(pid: int) -> bool:
    """A rank: `python -m longtune.train ...` (not torchrun, which is `-m longtune.train.launch`)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    first_module = argv.index(b"-m") + 1 if b"-m" in argv else 0
    return 0 < first_module < len(argv) and argv[first_module] == b"longtune.train"


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as fh:
        return subprocess.Popen([str(BIN / "longtune"), "train", *args], stdout=subprocess.DEVNULL, stderr=fh,
                                env=subprocess_env(), start_new_session=True)


def _kill_all(proc: subprocess.Popen, pids: list[int]) -> None:
    for pid in [*descendants(proc.pid), *pids, proc.pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)


def test_a_stopped_rank_ends_the_whole_run(tmp_path):
    out, log = tmp_path / "run", tmp_path / "stderr.log"
    proc = _start(["tiny-smoke", "parallel.dp=2", "train.max_steps=1000", "train.progress=false",
                   "train.export=false", f"train.hang_timeout_s={HANG_S}", f"train.output_dir={out}"], log)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + START_S
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None, f"exited {proc.returncode} early:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no metrics after {START_S} s:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        pids = descendants(proc.pid)
        workers = sorted(p for p in pids if _is_worker(p))
        assert len(workers) == 2, (pids, workers)

        os.kill(workers[1], signal.SIGSTOP)
        stopped = time.monotonic()
        limit = HANG_S + 10
        while proc.poll() is None or any(process_alive(p) for p in pids):
            if time.monotonic() - stopped > limit:
                raise AssertionError(f"still alive {limit} s after SIGSTOP: "
                                     f"{[p for p in [proc.pid, *pids] if process_alive(p)]}\n{log.read_text()[-4000:]}")
            time.sleep(0.1)
        took = time.monotonic() - stopped
        print(f"\nSIGSTOP to every process gone: {took:.1f} s (hang_timeout_s {HANG_S}), exit {proc.returncode}")

        err = log.read_text()
        lines = [line for line in err.splitlines() if line.startswith("longtune: error:")]
        assert proc.returncode != 0
        assert len(lines) == 1, err[-4000:]
        assert lines[0].startswith("longtune: error: rank 1 sent no heartbeat for "), lines
        assert lines[0].endswith("(hung or stopped); stopping the run"), lines
        assert took >= HANG_S - 1, f"stopped after {took:.1f} s: before the heartbeat timeout"
    finally:
        _kill_all(proc, pids)


@pytest.mark.slow  # CI time
def test_a_step_longer_than_the_hang_timeout_is_no_false_alarm(tmp_path):
    """Each step (4 rows × 2048 tokens per rank) takes longer than hang_timeout_s: the heartbeat thread beats
    through it and the run ends normally."""
    out, log = tmp_path / "run", tmp_path / "stderr.log"
    hang = 1.5
    proc = _start(["tiny-smoke", "parallel.dp=2", "train.max_steps=2", "train.seq_len=2048",
                   "train.progress=false", "train.export=false", f"train.hang_timeout_s={hang}",
                   f"train.output_dir={out}"], log)
    try:
        proc.wait(timeout=RUN_S)
        err = log.read_text()
        assert proc.returncode == 0, err[-4000:]
        assert "longtune: error:" not in err
        steps = metrics(out)
        assert [m["step"] for m in steps] == [1, 2]
        slowest = max(m["step_time_s"] for m in steps)
        print(f"\nstep times {[round(m['step_time_s'], 2) for m in steps]} s, hang_timeout_s {hang}: no alarm")
        assert slowest > hang, f"the steps took {slowest:.2f} s, not longer than hang_timeout_s {hang}"
    finally:
        _kill_all(proc, [])
