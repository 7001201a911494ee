"""Processes under a launcher: the one home of starting torchrun, of what a launcher adds, and of leaving.

- `relaunch_under_torchrun(nproc, module, argv)`: a command the user started for `nproc` > 1 processes
  (`torchrun_needed`: no launcher set WORLD_SIZE) runs `module` on them under torchrun (`longtune train`,
  `eval --sp`, `parity`);
- `strip_launcher_args`: drops the `--local_rank` that the deepspeed launcher appends;
- `leave(code)`: a launched rank leaves without the C++ destructors (gloo can abort in them at exit).

`run_child(cmd, env)` runs one child command (torchrun, or a nested `longtune train` of `demo`) so that
nothing outlives the parent:

- the child starts in its own session, so a terminal's Ctrl-C reaches this process only; SIGINT, SIGTERM
  and SIGHUP are forwarded to the child once, as SIGTERM (torchrun passes it on to its workers and waits
  for them; SIGINT would make every worker print a KeyboardInterrupt traceback);
- a second signal, or a child still alive `STOP_GRACE_S` after the first, gets SIGKILL, with every
  process under it;
- the child gets SIGTERM if this process dies without a chance to forward (SIGKILL: Linux parent-death
  signal), and this process is the subreaper of everything under it: workers whose torchrun died are
  reparented here and killed once the child has exited;
- a forwarded signal ends in `ChildInterrupted` (exit code 128 + signal) after every process has exited.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from longtune.data_prep.user_error import UserError

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_GRACE_S = 40.0
"""After a forwarded signal: how long the child may take to stop its processes (torchrun gives its
workers 30 s before it kills them) before everything under it gets SIGKILL."""

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

# Runs in the child before it becomes `cmd`: SIGTERM when the parent dies (kept across exec), and exit at
# once when the parent is already gone. Its own small interpreter: no fork of a threaded parent calls code.
_EXEC_WITH_PDEATHSIG = (
    "import ctypes, os, sys\n"
    "try:\n"
    f"    ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, 15, 0, 0, 0)\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(143)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class ChildInterrupted(UserError, RuntimeError):
    """A signal stopped this process and its child; every process under it has exited."""

    def __init__(self, signum: int, child_code: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}: stopped every process it started (child exit "
                         f"{_describe(child_code)})")


def _describe(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else str(code)


def _linux() -> bool:
    return sys.platform.startswith("linux")


def _become_subreaper() -> None:
    if _linux():
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _children_of() -> dict[int, list[int]]:
    """ppid → pids, from /proc (Linux); empty elsewhere."""
    tree: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return tree
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1:
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every live process under `pid` (Linux /proc), children first."""
    tree, out, todo = _children_of(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2:].split()[19])


def _reap_orphans(child_started: int | None, seen: set[int]) -> None:
    """SIGKILL and reap what was reparented to this process (its subreaper role) once the child is gone:
    workers whose torchrun died, and everything under them. An orphan is a child of this process that was
    seen under the child, or started after it."""
    for _ in range(20):
        orphans = []
        for pid in _children_of().get(os.getpid(), []):
            started = _start_time(pid)
            if pid in seen or (child_started is not None and started is not None and started >= child_started):
                orphans.append(pid)
        if not orphans:
            return
        _kill([d for p in orphans for d in descendants(p)] + orphans, signal.SIGKILL)
        for pid in orphans:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, 0)


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run `cmd` to its end and return its exit code; raise `ChildInterrupted` when a signal to this process
    stopped it. Nothing the child started is left running either way."""
    received: list[int] = []
    proc: subprocess.Popen | None = None

    def forward(signum, _frame) -> None:
        received.append(signum)
        if proc is None:
            return
        if len(received) == 1:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        else:  # asked twice: stop everything now
            _kill([proc.pid, *descendants(proc.pid)], signal.SIGKILL)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED} if _in_main_thread() else {}
    _become_subreaper()
    seen: set[int] = set()
    child_started = None
    try:
        launch = [sys.executable, "-c", _EXEC_WITH_PDEATHSIG, str(os.getpid()), *cmd] if _linux() else cmd
        proc = subprocess.Popen(launch, env=env, start_new_session=True)
        child_started = _start_time(proc.pid)
        if received:  # a signal came before the child existed
            proc.send_signal(signal.SIGTERM)
        deadline = None
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            seen.update(descendants(proc.pid))
            if received and deadline is None:
                deadline = time.monotonic() + STOP_GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                _kill([proc.pid, *descendants(proc.pid)], signal.SIGKILL)
                deadline = float("inf")
    finally:
        if proc is not None and proc.poll() is None:  # an exception here: leave nothing behind
            _kill([proc.pid, *descendants(proc.pid)], signal.SIGKILL)
            proc.wait()
        if proc is not None:
            _reap_orphans(child_started, seen)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise ChildInterrupted(received[0], code)
    return 128 - code if code < 0 else code


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class TorchrunStopped(UserError, RuntimeError):
    """torchrun itself was stopped by a signal (not one this process forwarded); its workers have exited."""

    def __init__(self, signum: int) -> None:
        self.exit_code = 128 + signum
        super().__init__(f"torchrun was stopped by {signal.Signals(signum).name}; every process it started "
                         "has exited")


def launched() -> bool:
    """Whether a launcher (torchrun, `accelerate launch`, `deepspeed`) started this process as one rank."""
    return "WORLD_SIZE" in os.environ


def torchrun_needed(nproc: int) -> bool:
    """Whether this process must start the `nproc` processes itself: more than one, and no launcher did."""
    return nproc > 1 and not launched()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relaunch_under_torchrun(nproc: int, module: str, argv: list[str]) -> int:
    """Run `python -m module ARGV` on `nproc` processes under torchrun and return its exit code. A signal to
    this process stops all of them (`run_child`: `ChildInterrupted`, exit code 128 + signal)."""
    # torchrun (`torchrun_main`: the same, without a Python traceback when it is stopped)
    cmd = [sys.executable, "-m", "longtune.train.launch", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", module, *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    print(f"longtune: starting {nproc} processes: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    code = run_child(cmd, env)
    if code > 128 and code - 128 in {int(s) for s in signal.Signals}:  # torchrun itself was signalled
        raise TorchrunStopped(code - 128)
    return code


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local-rank N`, which the deepspeed launcher appends."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(arg)
    return out


def leave(code: int) -> int:
    """`code`, returned; a rank of a launched run with several processes leaves here instead, without the
    C++ destructors: gloo + DDP can abort at interpreter exit after a successful run ("terminate called
    without an active exception")."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def torchrun_main(argv: list[str]) -> int:
    """torchrun, as `python -m longtune.train.launch ARGS`, without Python tracebacks of its own: a signal
    it stopped its workers for ends in exit 128 + signal, a failed worker in torchrun's failure summary
    and exit 1 (what torchrun itself returns)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(argv)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        print(exc, file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(torchrun_main(sys.argv[1:]))
