"""Task runners for multi-round data stages: in-process or Ray tasks, same calls, same results.

The scaled-out near-dup clustering (``components.py``) is a shuffle: every round, task ``j``
takes the ``j``-th output of every task of the round before. :class:`RayRunner` keeps those
outputs in Ray's object store (the driver holds only references); :class:`LocalRunner` runs the
same functions one after another in this process (tests, ``--no-ray``).

With ``measure_memory=True`` each task also reports its peak memory: the peak of what it
allocated (``tracemalloc``, which numpy reports its buffers to) plus the bytes of the arrays it
was given (under Ray those are zero-copy views of the object store, resident while it runs).
Neither the process's resident set nor its high-water mark would do: Ray reuses worker processes
and a worker keeps every object-store page it ever read mapped and resident, so one task would
be charged for its predecessors' inputs (and fresh workers per task, ``max_calls=1``, crashed
Ray 2.60 workers now and then under load). The interpreter's own ~125 MB is not included.
"""

from __future__ import annotations

import logging
import resource
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class TaskRunner(Protocol):
    """Submit functions as tasks; handles are values (in-process) or Ray object refs."""

    peak_bytes: list[int]  # one entry per measured task, in submission order

    def put(self, value: Any) -> Any: ...

    def submit(self, fn: Callable[..., Any], args: Sequence[Any], num_returns: int = 1
               ) -> list[Any]: ...

    def get(self, handles: Sequence[Any]) -> list[Any]: ...

    def wait_one(self, handles: Sequence[Any]) -> tuple[list[Any], list[Any]]: ...


def reset_peak_rss() -> None:
    """Reset this process's resident-set high-water mark (Linux; a no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (since the last reset on Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def input_bytes(value: Any) -> int:
    """Bytes of the numpy arrays in ``value`` (arrays, or tuples / lists of them)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, tuple | list):
        return sum(input_bytes(v) for v in value)
    return 0


def _measured(fn: Callable[..., Any], num_returns: int, *args: Any) -> Any:
    import tracemalloc

    tracemalloc.start()
    try:
        out = fn(*args)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    outs = (out,) if num_returns == 1 else tuple(out)
    return (*outs, peak + input_bytes(args))


class LocalRunner:
    """Runs every task at submission, in this process."""

    def __init__(self, measure_memory: bool = False) -> None:
        self.measure_memory = measure_memory
        self.peak_bytes: list[int] = []

    def put(self, value: Any) -> Any:
        return value

    def submit(self, fn: Callable[..., Any], args: Sequence[Any], num_returns: int = 1
               ) -> list[Any]:
        if self.measure_memory:
            *outs, peak = _measured(fn, num_returns, *args)
            self.peak_bytes.append(peak)
            return list(outs)
        out = fn(*args)
        return [out] if num_returns == 1 else list(out)

    def get(self, handles: Sequence[Any]) -> list[Any]:
        return list(handles)

    def wait_one(self, handles: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        return list(handles[:1]), list(handles[1:])


class RayRunner:
    """Runs every task as a Ray task of ``num_cpus`` CPUs; outputs stay in the object store."""

    def __init__(self, num_cpus: float = 1, measure_memory: bool = False) -> None:
        import ray

        self._ray = ray
        self.num_cpus = num_cpus
        self.measure_memory = measure_memory
        self.peak_bytes: list[int] = []
        self._peak_refs: list[Any] = []
        self._remote = ray.remote(num_cpus=num_cpus)(_measured)
        self._plain: dict[Callable[..., Any], Any] = {}

    def put(self, value: Any) -> Any:
        return self._ray.put(value)

    def submit(self, fn: Callable[..., Any], args: Sequence[Any], num_returns: int = 1
               ) -> list[Any]:
        if self.measure_memory:
            refs = self._remote.options(num_returns=num_returns + 1).remote(fn, num_returns,
                                                                            *args)
            self._peak_refs.append(refs[-1])
            return list(refs[:-1])
        if fn not in self._plain:
            self._plain[fn] = self._ray.remote(num_cpus=self.num_cpus)(fn)
        refs = self._plain[fn].options(num_returns=num_returns).remote(*args)
        return [refs] if num_returns == 1 else list(refs)

    def get(self, handles: Sequence[Any]) -> list[Any]:
        out = self._ray.get(list(handles))
        if self._peak_refs:
            self.peak_bytes += self._ray.get(self._peak_refs)
            self._peak_refs = []
        return out

    def wait_one(self, handles: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        done, pending = self._ray.wait(list(handles), num_returns=1)
        return done, pending
