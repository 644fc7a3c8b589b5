"""Task runners for multi-round data stages: in-process or Ray tasks, same calls, same results.

The scaled-out near-dup clustering (``components.py``) is a shuffle: every round, task ``j``
takes the ``j``-th output of every task of the round before. :class:`RayRunner` keeps those
outputs in Ray's object store (the driver holds only references); :class:`LocalRunner` runs the
same functions one after another in this process (tests, ``--no-ray``).

With ``measure_memory=True`` each task also reports the peak resident memory of the process that
ran it: on Linux the kernel's high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs``
before the call. Under Ray each measured task runs in a fresh worker process (``max_calls=1``):
a reused worker keeps every object-store page it ever read mapped and resident, which would
charge one task for its predecessors' inputs. The peak includes the worker's own baseline
(interpreter, numpy, Ray: ~125 MB) and the pages of the task's inputs it read.
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

    peak_rss_bytes: list[int]  # one entry per measured task, in submission order

    def put(self, value: Any) -> Any: ...

    def submit(self, fn: Callable[..., Any], args: Sequence[Any], num_returns: int = 1
               ) -> list[Any]: ...

    def get(self, handles: Sequence[Any]) -> list[Any]: ...

    def wait_one(self, handles: Sequence[Any]) -> tuple[list[Any], list[Any]]: ...


def _reset_peak() -> None:
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


def _measured(fn: Callable[..., Any], num_returns: int, *args: Any) -> Any:
    _reset_peak()
    out = fn(*args)
    outs = (out,) if num_returns == 1 else tuple(out)
    return (*outs, peak_rss())


class LocalRunner:
    """Runs every task at submission, in this process."""

    def __init__(self, measure_memory: bool = False) -> None:
        self.measure_memory = measure_memory
        self.peak_rss_bytes: list[int] = []

    def put(self, value: Any) -> Any:
        return value

    def submit(self, fn: Callable[..., Any], args: Sequence[Any], num_returns: int = 1
               ) -> list[Any]:
        if self.measure_memory:
            *outs, peak = _measured(fn, num_returns, *args)
            self.peak_rss_bytes.append(peak)
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
        self.peak_rss_bytes: list[int] = []
        self._peak_refs: list[Any] = []
        self._remote = ray.remote(num_cpus=num_cpus, max_calls=1)(_measured)
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
            self.peak_rss_bytes += self._ray.get(self._peak_refs)
            self._peak_refs = []
        return out

    def wait_one(self, handles: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        done, pending = self._ray.wait(list(handles), num_returns=1)
        return done, pending
