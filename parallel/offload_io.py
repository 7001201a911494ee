"""Background I/O for the offload tiers: writes go behind, reads go ahead, with a bound on the bytes in flight.

A tier hands `OverlappedIO` its three storage functions (write a tensor somewhere, read it back, drop it) and
gets a `put` that returns at once while a thread pool writes, a `prefetch` that starts a read, and a `get`
that returns the prefetched tensor or reads now. At most `max_bytes` are in flight: writes not yet done (their
tensors stay referenced until written) plus prefetched reads not yet taken. A put that would exceed it waits
for writes to finish, and is written in the caller if it still does not fit (a tensor larger than the bound);
a prefetch that would exceed it waits likewise and is then not started (only `get` can release prefetched
bytes). A failed background write is raised by the next call on the tier, and by `get` of its handle.

The caller must not modify a tensor in place after `put`: the write may run later. Torch and numpy release
the GIL for copies and file I/O, so the pool overlaps them with the training thread's compute.
`offload_wait_seconds()` is the time this process's callers have spent inside tier calls (blocked on I/O, budget
or a synchronous write or read): the cost of offload that overlap did not hide.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

DEFAULT_MAX_IN_FLIGHT = 256 * 2**20
OVERLAP_ENV = "LONGTUNE_OFFLOAD_OVERLAP"
IN_FLIGHT_ENV = "LONGTUNE_OFFLOAD_IN_FLIGHT_MIB"


def overlap_settings() -> dict[str, Any]:
    """`overlap` and `max_bytes` for new tiers: `LONGTUNE_OFFLOAD_OVERLAP=0` makes every put and get
    synchronous (for comparisons), `LONGTUNE_OFFLOAD_IN_FLIGHT_MIB` sets the bound (default 256 MiB)."""
    overlap = os.environ.get(OVERLAP_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
    mib = os.environ.get(IN_FLIGHT_ENV)
    return {"overlap": overlap, "max_bytes": int(float(mib) * 2**20) if mib else DEFAULT_MAX_IN_FLIGHT}


class _WaitClock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0.0

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.total += time.perf_counter() - started


_CLOCK = _WaitClock()


def offload_wait_seconds() -> float:
    """Seconds this process has spent inside offload tier calls so far (all tiers, all threads)."""
    return _CLOCK.total


class Entry:
    """One stored tensor's state, shared by its handle, the jobs that write and read it and the handle's
    finalizer (which must not keep the handle alive). `place` is the tier's: a file path, a host copy."""

    __slots__ = ("place", "nbytes", "source", "write", "read", "writing", "reading", "discarded", "error")

    def __init__(self, place: Any, nbytes: int) -> None:
        self.place, self.nbytes = place, nbytes
        self.source: torch.Tensor | None = None  # the tensor until its background write is done
        self.write: Future | None = None
        self.read: Future | None = None  # a prefetch not yet taken by get
        self.writing = self.reading = self.discarded = False
        self.error: BaseException | None = None  # its write failed


class OverlappedIO:
    """The background side of one tier. `write(entry, tensor)` stores a CPU tensor (setting `entry.place` if
    it needs to), `read(entry)` returns it as a CPU tensor, `drop(entry)` frees what it occupies. With
    `overlap` False every call does its work in the caller (the synchronous tier, for comparisons)."""

    def __init__(self, write: Callable[[Entry, torch.Tensor], None], read: Callable[[Entry], torch.Tensor],
                 drop: Callable[[Entry], None], *, overlap: bool = True, max_bytes: int = DEFAULT_MAX_IN_FLIGHT,
                 workers: int = 2) -> None:
        self._write, self._read, self._drop = write, read, drop
        self.max_bytes = max_bytes
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="offload-io") if overlap else None
        # Re-entrant: a handle's finalizer (discard) may run while this thread holds it.
        self._cond = threading.Condition(threading.RLock())
        self.in_flight = 0  # bytes: writes not yet done + prefetched reads not yet taken
        self._writes = 0  # writes not yet done (a count: empty tensors have no bytes)
        self._error: BaseException | None = None

    @property
    def overlap(self) -> bool:
        return self._pool is not None

    def put(self, entry: Entry, tensor: torch.Tensor) -> None:
        with _CLOCK.measure():
            self._raise_pending_error()
            if self._pool is None or not self._reserve(entry.nbytes, write=True):
                self._write(entry, tensor)
                return
            entry.source, entry.writing = tensor, True
            entry.write = self._pool.submit(self._write_behind, entry)

    def prefetch(self, entry: Entry) -> bool:
        """Start reading `entry` back; False if it was not started (no overlap, or no room in the bound)."""
        with _CLOCK.measure():
            self._raise_pending_error()
            if entry.read is not None:
                return True
            if self._pool is None or not self._reserve(entry.nbytes, write=False):
                return False
            entry.reading = True
            entry.read = self._pool.submit(self._read_ahead, entry)
            return True

    def get(self, entry: Entry) -> torch.Tensor:
        with _CLOCK.measure():
            self._raise_pending_error()
            if entry.read is not None:
                try:
                    return entry.read.result()
                finally:
                    with self._cond:
                        entry.read = None
                        self._release(entry.nbytes, write=False)
            if entry.write is not None:
                entry.write.result()
            if entry.error is not None:
                raise entry.error
            return self._read(entry)

    def discard(self, entry: Entry) -> None:
        """Its handle is gone: free its storage now, or when the write or read running on it ends."""
        with self._cond:
            entry.discarded = True
            if entry.read is not None and not entry.reading:  # prefetched, never taken
                entry.read = None
                self._release(entry.nbytes, write=False)
            if not entry.writing and not entry.reading:
                self._drop(entry)

    def flush(self) -> None:
        """Wait until every write so far is done."""
        with _CLOCK.measure():
            with self._cond:
                self._cond.wait_for(lambda: self._writes == 0)
            self._raise_pending_error()

    def close(self) -> None:
        """Wait for every write and read, stop the threads, raise a write error not raised yet."""
        with _CLOCK.measure():
            self.shutdown()
            self._raise_pending_error()

    def shutdown(self) -> None:
        """Wait for every write and read and stop the threads (a tier's finalizer: raises nothing)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _reserve(self, nbytes: int, write: bool) -> bool:
        with self._cond:
            # Only writes release bytes on their own: waiting for prefetched reads could wait forever.
            self._cond.wait_for(lambda: self.in_flight + nbytes <= self.max_bytes or self._writes == 0)
            if self.in_flight + nbytes > self.max_bytes:
                return False
            self.in_flight += nbytes
            self._writes += write
            return True

    def _release(self, nbytes: int, write: bool) -> None:
        self.in_flight -= nbytes
        self._writes -= write
        self._cond.notify_all()

    def _write_behind(self, entry: Entry) -> None:
        try:
            if not entry.discarded:
                self._write(entry, entry.source)
        except BaseException as error:  # noqa: BLE001 (kept for the caller's next call)
            entry.error = error
            with self._cond:
                self._error = self._error or error
        finally:
            with self._cond:
                entry.source, entry.writing = None, False
                self._release(entry.nbytes, write=True)
                if entry.discarded and not entry.reading:
                    self._drop(entry)

    def _read_ahead(self, entry: Entry) -> torch.Tensor:
        try:
            if entry.write is not None:  # submitted before this read: running or done, never queued behind it
                entry.write.result()
            if entry.error is not None:
                raise entry.error
            return self._read(entry)
        finally:
            with self._cond:
                entry.reading = False
                if entry.discarded:
                    entry.read = None
                    self._release(entry.nbytes, write=False)
                    if not entry.writing:
                        self._drop(entry)

    def _raise_pending_error(self) -> None:
        with self._cond:
            error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(f"an offload write failed: {error!r}") from error


def read_in_order(get: Callable[[Any], torch.Tensor], prefetch: Callable[[Any], bool],
                  handles: list[Any]) -> Iterator[torch.Tensor]:
    """`get` of each handle in order while reads run ahead as far as the bound allows; each handle is dropped
    from `handles` (set to None) once read, so that its storage can go."""
    ahead = 0
    for index in range(len(handles)):
        ahead = max(ahead, index)
        while ahead < len(handles) and prefetch(handles[ahead]):
            ahead += 1
        tensor = get(handles[index])
        handles[index] = None
        yield tensor
