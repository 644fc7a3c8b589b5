"""Why a step broke, and what the group does about it: rebuild, retry once, or stop.

A *fault* is a lost peer: its connection closed, a collective failed, an actor died. Rebuilding
without it is the answer, and it spends the failure budget. An *error* is an exception in this
rank's own code or data (an out-of-vocabulary token, a bug in model code) or running out of
memory. Rebuilding around the same batch would only fail again: the group retries the step once
(a transient error may pass) without spending the budget, and stops the run when the same step
errors again, with the traceback, the step and its samples.

The worker keeps the exception as a :class:`StepReport`; :class:`FailurePolicy` decides from all
members' reports (it is pure apart from remembering which steps were already retried).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Action", "Decision", "Failure", "FailureBudget", "FailurePolicy", "PeerStepError",
           "StepFailure", "StepReport", "classify", "root_cause"]

# Substrings of the messages that torch's gloo and NCCL backends raise (as plain RuntimeError)
# when a peer goes away or a collective is aborted.
_COLLECTIVE_MARKERS = ("gloo/transport", "ProcessGroupGloo", "ProcessGroupNCCL", "NCCL",
                       "Connection closed by peer", "Connection reset by peer",
                       "Timed out waiting", "aborted")


class PeerStepError(RuntimeError):
    """Another rank could not start this step (its batch failed): this rank's step ends too.
    The other rank reports the error itself; here it is a broken step like a lost peer's."""


class StepFailure(str, enum.Enum):
    FAULT = "fault"  # a peer is gone: rebuild without it
    ERROR = "error"  # this rank's own code or data raised
    OOM = "oom"  # this rank ran out of host or device memory


def classify(exc: BaseException) -> StepFailure:
    """What ended a step on this rank, from the exception it raised."""
    import torch

    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return StepFailure.OOM
    if isinstance(exc, PeerStepError):
        return StepFailure.FAULT
    try:
        import ray.exceptions as ray_exc

        if isinstance(exc, ray_exc.RayActorError | ray_exc.ObjectLostError):
            return StepFailure.FAULT  # an actor it depends on (a data reader, a peer) is gone
        if isinstance(exc, ray_exc.RayTaskError):
            cause = getattr(exc, "cause", None)  # an error raised inside a data reader's call
            return classify(cause) if isinstance(cause, BaseException) else StepFailure.ERROR
    except ImportError:  # the library runs without Ray too
        pass
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return StepFailure.FAULT
    if isinstance(exc, RuntimeError) and any(m in str(exc) for m in _COLLECTIVE_MARKERS):
        return StepFailure.FAULT
    if isinstance(exc, ConnectionError | TimeoutError):
        return StepFailure.FAULT
    return StepFailure.ERROR


def root_cause(exc: BaseException) -> BaseException:
    """The exception a remote Ray call raised, not Ray's wrapper around it (whose text is the
    remote traceback)."""
    cause = getattr(exc, "cause", None)
    try:
        import ray.exceptions as ray_exc

        if isinstance(exc, ray_exc.RayTaskError) and isinstance(cause, BaseException):
            return root_cause(cause)
    except ImportError:
        pass
    return exc


@dataclass(frozen=True, slots=True)
class StepReport:
    """One rank's account of a broken step."""

    rank: int
    step: int  # the step that broke (committed steps + 1)
    kind: StepFailure
    error: str  # "Type: message"
    traceback: str = ""
    sample_ids: list[Any] = field(default_factory=list)  # (epoch, index) of the batch, if known
    memory: str = ""  # OOM only: what the rank used and had
    at: float = field(default_factory=time.time)  # when this rank's step ended


class Action(str, enum.Enum):
    REBUILD = "rebuild"  # a fault: rebuild without the lost members (spends the budget)
    RETRY = "retry"  # an error, first time on this step: rebuild the same members, run it again
    STOP = "stop"  # the same step errored again: report once and end the run


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str
    report: StepReport | None = None  # the error that decided it (RETRY and STOP)


class FailurePolicy:
    """Rebuild on faults; retry an erroring step once; stop when it errors again."""

    def __init__(self, retries_per_step: int = 1) -> None:
        self.retries_per_step = retries_per_step
        self.retried: dict[int, int] = {}  # step -> retries spent on it

    def decide(self, reports: list[StepReport]) -> Decision:
        """``reports``: every member's report of the broken step (faults included). An error on
        any rank outranks the faults it causes on its peers (they lose it when it leaves)."""
        errors = sorted((r for r in reports if r.kind is not StepFailure.FAULT),
                        key=lambda r: (r.step, r.rank))
        if not errors:
            return Decision(Action.REBUILD, "a peer was lost")
        first = errors[0]
        spent = self.retried.get(first.step, 0)
        if spent >= self.retries_per_step:
            return Decision(Action.STOP, f"step {first.step} raised again after {spent} "
                            f"retr{'y' if spent == 1 else 'ies'} on rank {first.rank}", first)
        self.retried[first.step] = spent + 1
        return Decision(Action.RETRY, f"step {first.step} raised on rank {first.rank}; "
                        "retrying it once", first)


@dataclass(frozen=True, slots=True)
class Failure:
    """One fault the group recovered from: what the failure budget counts."""

    time: float
    step: int  # committed steps when it was detected
    ranks: list[int]  # the members lost (empty: a broken step with every member alive)
    cause: str  # e.g. "worker_lost", "broken_step"

    def describe(self) -> str:
        ranks = f"rank(s) {self.ranks}" if self.ranks else "no member lost"
        return f"{self.cause} at step {self.step} ({ranks})"


class FailureBudget:
    """At most ``max_failures`` faults in any ``window_s`` seconds (``window_s`` 0: over the
    whole run; ``max_failures`` -1: no limit). A rate, not a lifetime count: a long run that
    loses a node every few hours goes on, a crash loop stops. Faults only: errors (the
    policy's retries) and members lost while still joining are not spent here."""

    def __init__(self, max_failures: int, window_s: float) -> None:
        self.max_failures, self.window_s = max_failures, window_s
        self.spent: list[Failure] = []

    def spend(self, failure: Failure) -> str | None:
        """Count ``failure``; returns why the budget is spent (naming the failures that spent
        it), or None while the run may go on."""
        self.spent.append(failure)
        if self.window_s > 0:
            self.spent = [f for f in self.spent if failure.time - f.time <= self.window_s]
        if self.max_failures < 0 or len(self.spent) <= self.max_failures:
            return None
        window = (f"within {self.window_s:.0f} s (elastic.failure_window_s)" if self.window_s > 0
                  else "in this run")
        return (f"{len(self.spent)} failures {window}, more than elastic.max_failures="
                f"{self.max_failures}: " + "; ".join(f.describe() for f in self.spent))
