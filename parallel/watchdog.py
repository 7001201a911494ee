"""Hung-rank watchdog: a rank that stops (SIGSTOP, a deadlock outside any collective, a stalled host) ends
the run after `timeout_s` instead of stalling every other rank until the collective timeout.

Each rank runs a daemon thread that, every `interval_s`, increments its heartbeat counter in the launcher's
key-value store (its own TCPStore client to MASTER_ADDR:MASTER_PORT: under torchrun the agent hosts that
store, so it answers while any worker is stopped) and reads the peers' counters. The thread is independent
of the training step: a long step (torch releases the GIL in its kernels and collectives) keeps beating; only
a process that is stopped, or whose interpreter is wedged, stops. When a peer's counter has not moved for
`timeout_s` (measured on this rank's own clock: no clock sync needed), the first rank to notice prints one
`longtune: error:` line; every rank that noticed SIGKILLs the hung peer when it runs on the same host (a
stopped process ignores the SIGTERM torchrun would send it, and torchrun waits 30 s before its SIGKILL) and
leaves with exit code 1, and torchrun stops the rest.

A rank whose training returns marks itself finished (`stop()`), so peers that finish later do not report it;
the next `start_watchdog()` of the process (the next stage of a progressive run) resumes the same heartbeat.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import sys
import threading
import time

PREFIX = "longtune/watchdog"
EXIT_HUNG = 1


def _interval(timeout_s: float) -> float:
    """Heartbeat period: several beats per timeout, at most every 5 s."""
    return max(0.2, min(5.0, timeout_s / 5))


class Watchdog:
    def __init__(self, store, rank: int, world: int, timeout_s: float, interval_s: float | None = None) -> None:
        self.store, self.rank, self.world = store, rank, world
        self.timeout_s = timeout_s
        self.interval_s = interval_s or _interval(timeout_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._host = socket.gethostname()

    def _key(self, rank: int, what: str) -> str:
        return f"{PREFIX}/{rank}/{what}"

    def start(self) -> Watchdog:
        """Beat (again); a restart after `stop()` clears this rank's finished mark."""
        if self._thread is not None and self._thread.is_alive():
            return self
        if self._stopped:
            self.store.add(self._key(self.rank, "done"), -1)
            self._stopped = False
        self.store.set(self._key(self.rank, "pid"), f"{self._host} {os.getpid()}")
        self.store.add(self._key(self.rank, "beat"), 1)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="longtune-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """This rank is done: peers stop watching it (its counter no longer moves)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 10)
        if not self._stopped:
            with contextlib.suppress(Exception):
                self.store.add(self._key(self.rank, "done"), 1)
                self._stopped = True

    def _run(self) -> None:
        peers = [r for r in range(self.world) if r != self.rank]
        now = time.monotonic()
        seen = {r: (-1, now) for r in peers}  # last counter value, when it last moved (this rank's clock)
        store_ok = now
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                self.store.add(self._key(self.rank, "beat"), 1)
                for r in peers:
                    if self.store.add(self._key(r, "done"), 0) > 0:  # finished: not watched until it resumes
                        seen[r] = (-1, now)
                        continue
                    value = self.store.add(self._key(r, "beat"), 0)
                    if value != seen[r][0]:
                        seen[r] = (value, now)
                store_ok = now
            except Exception:  # the store did not answer (its host is stopped): the peers' clocks run on
                if now - store_ok > self.timeout_s:
                    self._fail(None, now - store_ok)
                continue
            if self._stop.is_set():
                return
            for r in peers:
                silent = now - seen[r][1]
                if silent > self.timeout_s:
                    self._fail(r, silent)

    def _fail(self, rank: int | None, silent: float) -> None:
        first = True
        with contextlib.suppress(Exception):
            first = self.store.add(f"{PREFIX}/reported", 1) == 1
        if rank is not None:
            self._kill_local(rank)
        if first:
            what = (f"rank {rank} sent no heartbeat for {silent:.0f} s (hung or stopped)" if rank is not None
                    else f"the heartbeat store did not answer for {silent:.0f} s")
            print(f"longtune: error: {what}; stopping the run", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(EXIT_HUNG)

    def _kill_local(self, rank: int) -> None:
        """SIGKILL the hung rank when it runs on this host (a stopped process only dies of SIGKILL)."""
        with contextlib.suppress(Exception):
            host, pid = self.store.get(self._key(rank, "pid")).decode().split()
            if host == self._host and int(pid) != os.getpid():
                os.kill(int(pid), signal.SIGKILL)


_watchdog: Watchdog | None = None


def start_watchdog(timeout_s: float) -> Watchdog | None:
    """Start (or resume) this rank's watchdog when the run is distributed under a launcher and `timeout_s`
    > 0. Call it right after the process group is joined: the ranks leave that rendezvous together, so
    their heartbeats start together."""
    import torch.distributed as dist

    global _watchdog
    if timeout_s <= 0 or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    if _watchdog is None:
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not addr or not port:
            return None
        # Its own client connection: the default group's store serves the main thread's blocking waits.
        store = dist.TCPStore(addr, int(port), is_master=False, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=max(5.0, _interval(timeout_s) * 2)))
        _watchdog = Watchdog(store, dist.get_rank(), dist.get_world_size(), timeout_s)
    return _watchdog.start()
