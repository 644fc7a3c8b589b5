"""Shared storage at launch: can every node that may host a worker reach the run's stores?

On a multi-node cluster every rank writes its DCP shards under ``checkpoint.dir`` and a restore at
another size reads all of them, so the directory must be one place for every node: an fsspec URL
(``s3://``, ``gs://``) or a mount present on each node. The MLflow store must be reachable from
the launcher (the job's driver, which logs every committed step), and the artifacts (heatmap,
summary, events) must land where the dashboard reads them: an MLflow server, not a sqlite file on
the driver's node.

The check does not guess from the path's shape (a shared NFS mount looks like any local path):
the driver writes a marker with a random token into each location, and a task pinned to each
worker node reads it back. A node that cannot read the token gets the run refused with the
location, the node and what to use instead.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass

import ray
from elastic_moe.actors.cluster import LaunchError, bundles_that_fit

logger = logging.getLogger(__name__)

MARKER_PREFIX = ".elastic-moe-probe-"
STORE_ADVICE = ("use an fsspec URL that every node reaches (--set checkpoint.dir=s3://bucket/runs, "
                "gs://...; s3fs/gcsfs installed on every node) or a shared mount (NFS/EFS) present "
                "at the same path on every node")
MLFLOW_ADVICE = ("run an MLflow tracking server that serves artifacts (`mlflow server --host "
                 "0.0.0.0 --port 5000 --backend-store-uri postgresql://... --artifacts-destination "
                 "s3://bucket/mlflow`) and point the run at it with MLFLOW_TRACKING_URI=http://"
                 "<host>:5000 or --set tracking.tracking_uri=http://<host>:5000")


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    ip: str


@dataclass(frozen=True, slots=True)
class Probe:
    """One location to check: ``kind`` "dir" (path or fsspec URL) or "mlflow" (tracking URI)."""

    kind: str
    location: str
    token: str
    label: str  # what the user configured, e.g. "checkpoint.dir"
    detail: str = ""  # for "mlflow": the experiment holding the marker tag


def worker_nodes(bundle: dict[str, float]) -> list[NodeInfo]:
    """Live nodes whose total resources hold at least one worker ``bundle``."""
    return [NodeInfo(node["NodeID"], node["NodeManagerAddress"]) for node in ray.nodes()
            if node.get("Alive") and bundles_that_fit(node.get("Resources", {}), bundle) > 0]


def is_local_path(location: str) -> bool:
    return "://" not in location or location.startswith("file://")


def _local(location: str) -> str:
    return location.removeprefix("file://")


def sqlite_path(tracking_uri: str) -> str | None:
    """The file of a ``sqlite:///`` store, else None."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    return "/" + tracking_uri.removeprefix("sqlite:").lstrip("/")


def _write_dir_marker(location: str, token: str) -> None:
    import fsspec

    fs, base = fsspec.core.url_to_fs(location)
    fs.makedirs(base, exist_ok=True)
    with fs.open(f"{base.rstrip('/')}/{MARKER_PREFIX}{token}", "w") as f:
        f.write(token)


def _remove_dir_marker(location: str, token: str) -> None:
    import fsspec

    try:
        fs, base = fsspec.core.url_to_fs(location)
        fs.rm(f"{base.rstrip('/')}/{MARKER_PREFIX}{token}")
    except Exception as exc:  # a leftover marker is harmless
        logger.debug("could not remove probe marker in %s: %s", location, exc)


def _read_marker(probe: Probe) -> str | None:
    """On a worker node: None when the marker reads back, else why not."""
    try:
        if probe.kind == "dir":
            import fsspec

            fs, base = fsspec.core.url_to_fs(probe.location)
            with fs.open(f"{base.rstrip('/')}/{MARKER_PREFIX}{probe.token}", "r") as f:
                found = f.read()
        else:
            from mlflow.tracking import MlflowClient

            experiment = MlflowClient(probe.location).get_experiment_by_name(probe.detail)
            found = experiment.tags.get("elastic_moe.probe") if experiment else None
        if found != probe.token:
            return f"marker not found (read {found!r})"
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:300]}"


@ray.remote(num_cpus=0, max_retries=0)
def _read_markers(probes: list[Probe]) -> tuple[str, list[str | None]]:
    import socket

    return socket.gethostname(), [_read_marker(probe) for probe in probes]


def _mlflow_probe(tracking_uri: str, experiment: str, token: str) -> Probe:
    """Tag ``experiment`` (created if missing) with the token; also return its artifact root."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found else client.create_experiment(experiment)
    client.set_experiment_tag(exp_id, "elastic_moe.probe", token)
    return Probe("mlflow", tracking_uri, token, "tracking.tracking_uri", detail=experiment)


def _artifact_root(tracking_uri: str, experiment: str) -> str:
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    return found.artifact_location if found else ""


def check_shared_storage(checkpoint_dir: str, tracking_uri: str, experiment: str,
                         nodes: list[NodeInfo], *, timeout_s: float = 120.0) -> None:
    """Refuse (``LaunchError``) unless every node in ``nodes`` reads back a marker the driver
    wrote to ``checkpoint_dir``, to the MLflow store and, for a server whose artifact root is a
    path, to that path. Call it when the cluster has more than one node.
    """
    token = secrets.token_hex(8)
    probes: list[Probe] = []
    written: list[str] = []
    try:
        try:
            _write_dir_marker(checkpoint_dir, token)
            written.append(checkpoint_dir)
        except Exception as exc:
            raise LaunchError(f"checkpoint.dir={checkpoint_dir!r}: the driver cannot write there "
                              f"({type(exc).__name__}: {exc}); check the path or URL and its "
                              "credentials") from exc
        probes.append(Probe("dir", checkpoint_dir, token, "checkpoint.dir"))
        store_file = sqlite_path(tracking_uri)
        if store_file is not None or is_local_path(tracking_uri):
            # A file store: the directory must be shared like the checkpoints (and sqlite on a
            # network filesystem is fragile even then).
            store_dir = os.path.dirname(store_file) if store_file else _local(tracking_uri)
            _write_dir_marker(store_dir, token)
            written.append(store_dir)
            probes.append(Probe("dir", store_dir, token, "tracking.tracking_uri"))
        else:
            try:
                probes.append(_mlflow_probe(tracking_uri, experiment, token))
            except Exception as exc:
                raise LaunchError(f"MLflow tracking URI {tracking_uri}: the driver cannot reach "
                                  f"it ({type(exc).__name__}: {str(exc)[:200]}); check that the "
                                  "server runs and the URI") from exc
            artifacts = _artifact_root(tracking_uri, experiment)
            if artifacts and is_local_path(artifacts):
                # The server hands out a path: each worker node writes artifacts to its own disk.
                _write_dir_marker(_local(artifacts), token)
                written.append(_local(artifacts))
                probes.append(Probe("dir", _local(artifacts), token,
                                    f"MLflow artifact root of experiment {experiment!r}"))
        _probe_nodes(probes, nodes, timeout_s, tracking_uri)
        if store_file is not None:
            logger.warning("MLflow store %s is a sqlite file on a shared mount: every node "
                           "reaches it, but sqlite over a network filesystem can corrupt; "
                           "prefer an MLflow server", tracking_uri)
    finally:
        for location in written:
            _remove_dir_marker(location, token)


def _probe_nodes(probes: list[Probe], nodes: list[NodeInfo], timeout_s: float,
                 tracking_uri: str) -> None:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    started = time.monotonic()
    refs = {node: _read_markers.options(  # type: ignore[attr-defined]
        scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)
    ).remote(probes) for node in nodes}
    failures: list[str] = []
    for node, ref in refs.items():
        remaining = max(1.0, timeout_s - (time.monotonic() - started))
        try:
            _, results = ray.get(ref, timeout=remaining)
        except Exception as exc:
            failures.append(f"node {node.ip} ({node.node_id[:8]}) did not answer the probe "
                            f"({type(exc).__name__}: {str(exc)[:200]})")
            continue
        for probe, error in zip(probes, results, strict=True):
            if error is not None:
                failures.append(f"{probe.label}={probe.location!r} is not visible from node "
                                f"{node.ip} ({node.node_id[:8]}): {error}")
    if not failures:
        logger.info("shared storage: %d node(s) read back %s", len(nodes),
                    ", ".join(p.label for p in probes))
        return
    advice = []
    labels = " ".join(failures)
    if "checkpoint.dir" in labels:
        advice.append(f"checkpoints: {STORE_ADVICE}")
    if "tracking.tracking_uri" in labels or "MLflow" in labels:
        store = ("it is a sqlite file on the driver's node; "
                 if sqlite_path(tracking_uri) else "")
        advice.append(f"MLflow: {store}{MLFLOW_ADVICE}")
    raise LaunchError(f"storage is not shared across the cluster's {len(nodes)} worker nodes: "
                      + "; ".join(failures) + ". " + ". ".join(advice))
