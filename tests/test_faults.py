"""Faults lose nothing: a signal to `longtune train` stops every process it started; a corrupt newest
checkpoint falls back to the newest good one; one run per run dir; a stale or interrupted save leaves
nothing that looks complete. Every run is a real process with a timeout, every signal a real signal.

Fast by default (about 2.5 minutes on 2 busy cores); the `slow` ones (`-m slow`, about 4 minutes): two more
corruptions end to end (every corruption is also checked by `verify_checkpoint` in the fast set), a rank
killed by SIGKILL, the `longtune train` process itself killed by SIGKILL, a kill during a native save.
Each prints its line of the fault table (`-s` shows them)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, PARITY_ARGS, longtune, metrics, process_alive, subprocess_env
from longtune.train.checkpoint import MANIFEST_FILE, verify_checkpoint
from longtune.train.launch import descendants

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

STOP_S = 30
"""Every process of a run must be gone this long after the signal (they take ~3 s on 2 busy cores)."""
START_S = 240
"""How long a 2-process run may take to write its first metrics line on 2 busy cores."""

LONG_SP2 = ["tiny-smoke", "parallel.sp.ulysses=2", "train.max_steps=200", "train.progress=false",
            "train.export=false"]
SHORT = [*PARITY_ARGS[:1], "train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=5",
         "train.progress=false", "train.export=false"]


def _start(args: list[str], log: Path, command: str = "train") -> subprocess.Popen:
    with log.open("w") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([str(BIN / "longtune"), command, *args], stdout=fh, stderr=subprocess.STDOUT,
                                env=subprocess_env(), start_new_session=True)


def _wait_for_metrics(proc: subprocess.Popen, out: Path, log: Path) -> list[int]:
    """Wait until the run has trained a step; return every process under `proc` by then."""
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited {proc.returncode} early:\n{log.read_text()[-4000:]}"
        path = out / "metrics.jsonl"
        if path.is_file() and path.read_text().strip():
            return descendants(proc.pid)
        time.sleep(0.5)
    raise AssertionError(f"no metrics after {START_S} s:\n{log.read_text()[-4000:]}")


def _stop_time(proc: subprocess.Popen, pids: list[int], limit: float = STOP_S) -> float:
    """Seconds until `proc` and every pid in `pids` have exited (fails after `limit`)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if proc.poll() is not None and not any(process_alive(p) for p in pids):
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"still alive {limit} s after the signal: "
                         f"{[p for p in [proc.pid, *pids] if process_alive(p)]}")


def _kill_all(proc: subprocess.Popen, pids: list[int]) -> None:
    """Test cleanup: whatever a failed test left running."""
    for pid in [proc.pid, *pids, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait(timeout=30)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("longtune: error:")]


# --- 1. a signal to `longtune train` (2 processes under torchrun) stops every process -----------------------

@pytest.mark.multiproc
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])  # slow: CI time; both go through one forwarding path
def test_signal_to_the_train_process_stops_every_process(sig, tmp_path):
    out, log = tmp_path / "run", tmp_path / "train.log"
    proc = _start([*LONG_SP2, f"train.output_dir={out}"], log)
    pids: list[int] = []
    try:
        pids = _wait_for_metrics(proc, out, log)
        assert len(pids) >= 3, pids  # torchrun and its 2 workers
        if sig == signal.SIGTERM:
            # 3. A second run on the same dir, while this one trains, is refused with one line naming the dir.
            second = longtune("train", *LONG_SP2, f"train.output_dir={out}", check=False, timeout=120)
            assert second.returncode == 2, second.stderr[-3000:]
            assert _error_lines(second.stderr) == [line for line in second.stderr.splitlines() if line.strip()]
            assert len(_error_lines(second.stderr)) == 1 and str(out) in second.stderr
            assert "in use by another run" in second.stderr
        proc.send_signal(sig)  # the top process alone
        took = _stop_time(proc, pids)
    finally:
        if proc.poll() is None or any(process_alive(p) for p in pids):
            _kill_all(proc, pids)
    text = log.read_text()
    assert proc.returncode == 128 + sig, text[-4000:]
    assert len(_error_lines(text)) == 1 and sig.name in _error_lines(text)[0], text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # one run's lines, none half-written
    assert not list(out.glob("checkpoints/*.partial"))
    print(f"\n{sig.name}: exit {proc.returncode}, every process gone {took:.1f} s after the signal")


# --- 2. a corrupt newest checkpoint: fall back to the newest good one ---------------------------------------

@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("faults") / "full"
    longtune("train", *SHORT, f"train.output_dir={out}")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated-shard": ("state/__0_0.distcp", _truncate),
    "corrupt-metadata": ("state/.metadata", _flip),
    "corrupt-rng": ("rng_rank00000.pt", _flip),
    "corrupt-trainer-state": ("trainer_state.json", lambda p: p.write_text('{"step": 4, "tokens')),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_verify_checkpoint_names_the_corrupt_file(two_checkpoints, tmp_path, kind):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_checkpoints / "checkpoints" / "step_00000004", ckpt)
    assert verify_checkpoint(ckpt) == (True, "")
    rel, corrupt = CORRUPTIONS[kind]
    corrupt(ckpt / rel)
    ok, problem = verify_checkpoint(ckpt)
    assert not ok and rel in problem


@pytest.mark.parametrize("kind", [
    "truncated-shard", "corrupt-trainer-state",
    pytest.param("corrupt-metadata", marks=pytest.mark.slow), pytest.param("corrupt-rng", marks=pytest.mark.slow)])
def test_corrupt_newest_checkpoint_resumes_from_the_older_one_exactly(two_checkpoints, tmp_path, kind):
    cut = tmp_path / "cut"
    shutil.copytree(two_checkpoints, cut)
    rel, corrupt = CORRUPTIONS[kind]
    corrupt(cut / "checkpoints" / "step_00000004" / rel)
    (cut / "checkpoints" / "step_00000003.partial" / "state").mkdir(parents=True)  # a save that died
    started = time.monotonic()
    proc = longtune("train", *SHORT, f"train.output_dir={cut}")
    took = time.monotonic() - started
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("longtune: warning:")]
    assert len(warnings) == 1 and "step_00000004" in warnings[0] and rel in warnings[0], proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    full, resumed = metrics(two_checkpoints), metrics(cut)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed, strict=True):
        assert (a["loss"], a["lr"], a["grad_norm"]) == (b["loss"], b["lr"], b["grad_norm"])
    # The new step 4 replaced the corrupt one; the set-aside copy and the stale partial are pruned.
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert verify_checkpoint(cut / "checkpoints" / "step_00000004") == (True, "")
    print(f"\n{kind}: resume exit 0 in {took:.0f} s; {warnings[0]}")


def test_checkpoint_without_manifest_is_used_with_a_warning(two_checkpoints, tmp_path):
    ckpt = tmp_path / "old"
    shutil.copytree(two_checkpoints / "checkpoints" / "step_00000004", ckpt)
    (ckpt / MANIFEST_FILE).unlink()
    assert verify_checkpoint(ckpt) == (True, "no manifest")
    (ckpt / "trainer_state.json").write_text("{")
    assert not verify_checkpoint(ckpt)[0]


# --- 3. one run per run dir; resume=false does not mix two runs --------------------------------------------

def test_a_locked_run_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with (out / ".lock").open("a+") as fh:  # this test process plays the run that holds the dir
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = longtune("train", *SHORT, f"train.output_dir={out}", check=False, timeout=120)
    assert proc.returncode == 2
    assert _error_lines(proc.stderr) == [proc.stderr.strip()], proc.stderr[-3000:]
    assert str(out) in proc.stderr and "in use by another run" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_resume_false_on_an_existing_run_needs_overwrite(two_checkpoints, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(two_checkpoints, old)
    before = (old / "metrics.jsonl").read_text()
    proc = longtune("train", *SHORT, "train.resume=false", f"train.output_dir={old}", check=False, timeout=120)
    assert proc.returncode == 2
    assert _error_lines(proc.stderr) == [proc.stderr.strip()], proc.stderr[-3000:]
    assert str(old) in proc.stderr and "train.overwrite=true" in proc.stderr
    assert (old / "metrics.jsonl").read_text() == before

    # With train.overwrite=true the old run goes (a later checkpoint of it too) and the new one starts clean.
    shutil.copytree(old / "checkpoints" / "step_00000004", old / "checkpoints" / "step_00000006")
    with (old / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": 5, "loss": 0.0}) + "\n")
    proc = longtune("train", *SHORT, "train.resume=false", "train.overwrite=true", f"train.output_dir={old}")
    assert "resumed from" not in proc.stderr
    full, fresh = metrics(two_checkpoints), metrics(old)
    assert [(m["step"], m["loss"]) for m in fresh] == [(m["step"], m["loss"]) for m in full]
    assert sorted(p.name for p in (old / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def test_demo_reruns_overwrite_their_training_runs():
    import inspect

    from longtune.train.commands import demo

    source = inspect.getsource(demo.run_demo)
    assert '"train.resume=false", "train.overwrite=true"' in source


# --- what held before: a dead rank, a kill during a save -------------------------------------------------------

@pytest.mark.slow
@pytest.mark.multiproc
def test_sigkill_of_a_rank_stops_every_process_and_resume_is_exact(tmp_path):
    out, log = tmp_path / "run", tmp_path / "train.log"
    args = [*LONG_SP2[:1], "parallel.dp=2", "train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=5",
            "train.progress=false", "train.export=false"]
    proc = _start([*args, f"train.output_dir={out}"], log)
    pids: list[int] = []
    try:
        pids = _wait_for_metrics(proc, out, log)
        workers = [p for p in pids if "longtune.train" in Path(f"/proc/{p}/cmdline").read_text()
                   and "launch" not in Path(f"/proc/{p}/cmdline").read_text()]
        os.kill(workers[-1], signal.SIGKILL)
        took = _stop_time(proc, pids)
    finally:
        if proc.poll() is None or any(process_alive(p) for p in pids):
            _kill_all(proc, pids)
    assert proc.returncode == 1, log.read_text()[-4000:]
    print(f"\nrank SIGKILL: exit {proc.returncode}, every process gone {took:.1f} s after the kill")
    full = tmp_path / "full"
    longtune("train", *args, f"train.output_dir={full}")
    longtune("train", *args, f"train.output_dir={out}")
    a, b = metrics(full), metrics(out)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for ma, mb in zip(a, b, strict=True):
        assert (ma["loss"], ma["lr"], ma["grad_norm"]) == (mb["loss"], mb["lr"], mb["grad_norm"])


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("victim", ["longtune-train", "torchrun"])
def test_sigkill_of_the_train_process_or_torchrun_stops_every_process(tmp_path, victim):
    """Nothing to forward: torchrun's parent-death signal stops it and its workers (victim longtune-train);
    the workers of a killed torchrun are reparented to `longtune train`, which kills them (victim torchrun)."""
    out, log = tmp_path / "run", tmp_path / "train.log"
    proc = _start([*LONG_SP2, f"train.output_dir={out}"], log)
    pids: list[int] = []
    try:
        pids = _wait_for_metrics(proc, out, log)
        torchrun = [p for p in pids if "longtune.train.launch" in Path(f"/proc/{p}/cmdline").read_text()]
        os.kill(proc.pid if victim == "longtune-train" else torchrun[0], signal.SIGKILL)
        took = _stop_time(proc, pids)
    finally:
        if proc.poll() is None or any(process_alive(p) for p in pids):
            _kill_all(proc, pids)
    assert proc.returncode == (-signal.SIGKILL if victim == "longtune-train" else 128 + signal.SIGKILL)
    if victim == "torchrun":
        assert len(_error_lines(log.read_text())) == 1, log.read_text()[-4000:]
    assert not list(out.glob("checkpoints/*.partial"))
    print(f"\n{victim} SIGKILL: exit {proc.returncode}, every process gone {took:.1f} s after the kill")


@pytest.mark.slow
@pytest.mark.multiproc
def test_sigterm_with_a_hung_rank_stops_every_process(tmp_path):
    """A rank that does not answer (SIGSTOP) cannot act on SIGTERM: torchrun SIGKILLs it after its 30 s."""
    out, log = tmp_path / "run", tmp_path / "train.log"
    proc = _start([*LONG_SP2, f"train.output_dir={out}"], log)
    pids: list[int] = []
    try:
        pids = _wait_for_metrics(proc, out, log)
        workers = [p for p in pids if "-m longtune.train " in Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")]
        os.kill(workers[-1], signal.SIGSTOP)
        proc.send_signal(signal.SIGTERM)
        took = _stop_time(proc, pids, limit=STOP_S + 50)
    finally:
        if proc.poll() is None or any(process_alive(p) for p in pids):
            _kill_all(proc, pids)
    assert proc.returncode == 128 + signal.SIGTERM, log.read_text()[-4000:]
    print(f"\nhung rank + SIGTERM: exit {proc.returncode}, every process gone {took:.1f} s after the signal")


@pytest.mark.slow
@pytest.mark.multiproc
def test_sigterm_to_the_demo_stops_its_training_processes(tmp_path):
    """`longtune demo` → `longtune train` → torchrun → 2 workers: SIGTERM to the demo reaches them all."""
    out, log = tmp_path / "demo", tmp_path / "demo.log"
    proc = _start(["--out", str(out), "--target-length", "512", "--steps", "200", "--trials", "1",
                   "--methods", "pi", "--depths", "0"], log, command="demo")
    pids: list[int] = []
    try:
        pids = _wait_for_metrics(proc, out / "pi", log)
        assert len(pids) >= 4, pids  # longtune train, torchrun, 2 workers
        proc.send_signal(signal.SIGTERM)
        took = _stop_time(proc, pids)
    finally:
        if proc.poll() is None or any(process_alive(p) for p in pids):
            _kill_all(proc, pids)
    text = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, text[-4000:]
    assert len(_error_lines(text)) == 1 and "Traceback" not in text, text[-4000:]
    print(f"\ndemo SIGTERM: exit {proc.returncode}, every process gone {took:.1f} s after the signal")


@pytest.mark.slow
def test_kill_during_a_save_resumes_from_the_last_good_checkpoint(two_checkpoints, tmp_path):
    """SIGKILL while step 4's checkpoint is written (it is still `step_00000004.partial`): the next run
    removes the partial dir and resumes from step 2, exactly."""
    out, log = tmp_path / "run", tmp_path / "train.log"
    proc = _start([*SHORT, f"train.output_dir={out}"], log)
    partial = out / "checkpoints" / "step_00000004.partial"
    try:
        deadline = time.monotonic() + START_S
        while not partial.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=STOP_S)
    finally:
        if proc.poll() is None:
            _kill_all(proc, [])
    # Killed mid-save: no step 4 (or, when the kill came just after the rename, a complete one).
    step4 = out / "checkpoints" / "step_00000004"
    assert not step4.exists() or verify_checkpoint(step4) == (True, "")
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    done = longtune("train", *SHORT, f"train.output_dir={out}")
    assert "at step 2" in done.stderr or "at step 4" in done.stderr
    print(f"\nkill during save: exit {proc.returncode}; left {left}; the next run "
          f"{'resumed at step 2' if 'at step 2' in done.stderr else 'resumed at step 4'}")
    assert not partial.exists()
    for a, b in zip(metrics(two_checkpoints), metrics(out), strict=True):
        assert (a["loss"], a["lr"], a["grad_norm"]) == (b["loss"], b["lr"], b["grad_norm"])
