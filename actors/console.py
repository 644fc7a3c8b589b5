"""A quiet console: the project's own lines, without Ray's known noise (``--verbose`` restores it).

What a run prints by default: the launcher's lines (data, Ray, checks, summary) and, streamed from
the workers, the control loop's step line every ``train.log_freq`` steps, the mesh plan, resize events and
checkpoint commits. Known noise is dropped in two places:

* **driver-side loggers** -- Ray's own Python logger keeps its WARNING level but loses the
  messages in :data:`NOISE` (e.g. the token-authentication notice of every local Ray); MLflow's
  store set-up INFO lines are turned down with MLflow's own ``MLFLOW_LOGGING_LEVEL=WARNING``;
* **lines streamed from worker processes** (Ray's ``log_to_driver``) -- each line matching
  :data:`NOISE`, and everything from the actors in :data:`NOISY_ACTORS`, is dropped before Ray's
  own printer (and its de-duplicator) sees it. Ray offers no
  public per-line hook, so this wraps ``ray._private.worker.print_to_stdstream``; when a Ray
  version lacks it, nothing is filtered and a debug line says so.

Only patterns listed here are dropped: an unknown Ray warning or error still shows.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)

# Known, harmless noise (Ray 2.5x-2.60 with Ray Train V2 and a local embedded Ray).
NOISE: tuple[str, ...] = (
    # Ray Train V2's placement-group cleaner polls the State API, which needs the dashboard
    r"Failed to query Ray Train Controller actor state",
    # core_worker C++ line about Ray Train's PreemptionWatcher actor (max_restarts > 0 + args)
    r"core_worker\.cc:\d+: Actor with class name: '\w+' .*constructor arguments in the object "
    r"store",
    # Ray Train controller / worker-group INFO chatter (our launcher logs the plan and sizes)
    r"Requesting resources: \{",
    r"Attempting to start training worker group of size",
    r"Started training worker group of size",
    r"^\s*- \(ip=[\d.]+, pid=\d+\) world_rank=",
    r"Setting up process group for: ",
    r"Reporting training result \d+: TrainingReport\(",
    # every local Ray since 2.5x; the embedded Ray listens on this machine only
    r"Token authentication is enabled for this Ray cluster",
    # matplotlib's one-off font cache notice (the expert heatmap)
    r"generated new fontManager",
    r"Matplotlib is building the font cache",
)
_NOISE_RE = re.compile("|".join(f"(?:{p})" for p in NOISE))
# Ray Train V2 internals whose whole output is dropped: the placement-group cleaner only ever
# prints its State-API failures, as single warnings or, when another Ray runs on the same
# machine, as a multi-line traceback ("Found multiple active Ray instances") from its monitor
# thread; it holds no state of the run.
NOISY_ACTORS: frozenset[str] = frozenset({"PlacementGroupCleaner"})
# MLflow's store set-up ("Creating initial MLflow database tables...") and alembic migrations.
QUIET_LOGGERS = ("mlflow", "alembic", "matplotlib.font_manager")


def is_noise(line: str) -> bool:
    return _NOISE_RE.search(line) is not None


def filter_lines(lines: Iterable[str]) -> list[str]:
    return [line for line in lines if not is_noise(line)]


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not is_noise(record.getMessage())
        except Exception:  # a malformed record is not ours to drop
            return True


def _filtered_printer(printer: Callable[..., Any]) -> Callable[..., Any]:
    def print_filtered(data: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if data.get("actor_name") in NOISY_ACTORS:
            return None
        lines = filter_lines(data.get("lines", []))
        if not lines:
            return None
        return printer({**data, "lines": lines}, *args, **kwargs)

    print_filtered.__wrapped__ = printer  # type: ignore[attr-defined]
    return print_filtered


def configure_console(verbose: bool = False, level: int = logging.INFO) -> None:
    """Set up this process's console logging; call before ``ray.init``.

    ``verbose``: everything Ray, Ray Train and MLflow print, as they print it.
    """
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    # MLflow's own setting (it configures its loggers on import, in workers too: they inherit
    # this environment from the embedded Ray).
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    import ray  # noqa: F401  (installs Ray's own handlers, which get the filter)

    noise = _NoiseFilter()
    for handler in [*logging.getLogger("ray").handlers, *logging.getLogger().handlers]:
        if not any(isinstance(f, _NoiseFilter) for f in handler.filters):
            handler.addFilter(noise)
    _install_stream_filter()


def _install_stream_filter() -> None:
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        logger.debug("no ray._private.worker: worker output is not filtered")
        return
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None:
        logger.debug("this Ray has no print_to_stdstream: worker output is not filtered")
        return
    if getattr(printer, "__wrapped__", None) is not None:
        return  # installed already
    # ray.init registers functools.partial(print_to_stdstream, ...) as the dispatcher's
    # handler; replacing the module attribute before ray.init puts the filter in front of it.
    ray_worker.print_to_stdstream = _filtered_printer(printer)
