"""A worker's lease on its membership: how a worker that a partition cut off is fenced.

Every fault a signal can reach (a crash, a kill, a hung process on a reachable node) ends with
the worker's connections closed. A network partition does not: the cut-off worker is alive and
unaware, it can still write to shared storage, and when the link heals it can talk to the group
again. Ray keeps reporting its node alive for the better part of a minute, and the group's
SIGKILL (a task on that node) waits for the link to come back. So the worker fences itself:

- **Lease**: a thread renews the worker's lease with the coordinator every
  ``elastic.lease_interval_s``; each ping from the group renews it too, so a coordinator that
  Ray is restarting does not end a worker the group still talks to. A worker that has heard
  from neither for ``elastic.hang_timeout_s`` (the time after which the group drops a silent
  member) stops its process; so does one the coordinator calls retired (a newer membership
  epoch formed without it: the link healed after the group moved on). Its node then takes a
  fresh worker.
- **Commit admission**: rank 0 writes a checkpoint's commit marker only after the coordinator
  admitted it for the current membership epoch (:func:`admit_commit`), and only within half of
  ``hang_timeout_s`` of asking. The group drops a member no sooner than ``hang_timeout_s``
  after its last answer, and opens a new epoch only after that, so an admitted marker is
  written while its epoch is still current; one asked for too late is never written.

The coordinator's side (epoch numbers, refusals) is in :mod:`elastic_moe.actors.coordinator`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from elastic_moe.actors.messages import LeaseReply

logger = logging.getLogger(__name__)


class Lease:
    """The lease thread of one worker process.

    ``renew(timeout_s)`` asks the coordinator (its reply, or None without one in time);
    ``on_end(reason)`` stops the worker (in production: ends the process). The lease counts
    from when an answered request was *sent*, so a slow answer never extends it.
    """

    def __init__(self, renew: Callable[[float], LeaseReply | None], *, hang_timeout_s: float,
                 interval_s: float, on_end: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.renew, self.on_end, self.clock = renew, on_end, clock
        self.hang_timeout_s, self.interval_s = hang_timeout_s, interval_s
        self.renewed_at = clock()
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="lease", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def renewed_by_group(self) -> None:
        """The group pinged this worker: it is a member still (the group drops a member only
        after ``hang_timeout_s`` without its answers)."""
        self.renewed_at = max(self.renewed_at, self.clock())

    def check(self) -> str | None:
        """One renewal; why the worker must stop (None: it may go on)."""
        sent = self.clock()
        reply = self.renew(self.interval_s)
        if reply is not None:
            self.renewed_at = sent
            if reply.retired:
                return (f"retired: membership epoch {reply.membership_epoch} formed without "
                        "this worker (it was cut off or silent past elastic.hang_timeout_s)")
            return None
        silent = self.clock() - self.renewed_at
        if silent > self.hang_timeout_s:
            return (f"no answer from the coordinator and no ping from the group for "
                    f"{silent:.1f} s (elastic.hang_timeout_s={self.hang_timeout_s:g}): the group "
                    "has dropped this worker")
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            started = self.clock()
            reason = self.check()
            if reason is not None:
                self.on_end(reason)
                return
            self._stop.wait(max(0.0, self.interval_s - (self.clock() - started)))


def admit_commit(coordinator: Any, epoch: int, step: int, hang_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
    """Rank 0, right before it writes step ``step``'s commit marker: return if the coordinator
    admits it for membership epoch ``epoch`` within ``hang_timeout_s / 2``; raise
    :class:`CommitRefused` otherwise (the save then fails on every rank, nothing committed)."""
    from elastic_moe.checkpoint import CommitRefused  # torch: not in the coordinator's process

    window = hang_timeout_s / 2
    sent = clock()
    verdict = coordinator.admit_commit(epoch, step, timeout_s=window)
    if verdict is None:
        raise CommitRefused(f"the coordinator did not admit the commit of step {step} within "
                            f"{window:g} s (elastic.hang_timeout_s / 2): not committed")
    if not verdict:
        raise CommitRefused(f"membership epoch {epoch} may no longer commit step {step} (the "
                            "group moved on, or the step is already committed)")
    if clock() - sent > window:
        raise CommitRefused(f"the admission of step {step} came after {clock() - sent:.1f} s, "
                            f"past {window:g} s: the epoch may have ended meanwhile")
