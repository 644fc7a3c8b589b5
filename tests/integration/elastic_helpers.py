"""Shared pieces of the elastic-service tests: configs, sample accounting, checkpoint reads,
waiting on a launcher, a `ray start --head` of the test's own, a local Ray shared by the tests of
a module."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest
import torch

from elastic_moe.config import Config, apply_overrides, debug
from tests.integration.multiproc import free_port
from tests.integration.netns import write_auth_token

DATA_CACHE_ENV = "ELASTIC_MOE_TEST_DATA_CACHE"
# the checkout, and the runtime env of the Rays the tests start: their workers import the
# checkout's modules, and each uses one torch thread (a run's workers share the box's cores)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNTIME_ENV = {"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}}


def data_cache() -> str:
    """The session's data cache (``tests/conftest.py``): the bundled sample corpus is prepared
    once per test session, and every run reads the same prepared data (runs do not write to it)."""
    path = os.environ.get(DATA_CACHE_ENV)
    if not path:
        path = os.path.join(tempfile.gettempdir(), f"elastic-moe-test-data-{os.getuid()}")
        os.environ[DATA_CACHE_ENV] = path
    return path


def sqlite_store(path) -> str:
    """``sqlite:///path`` for a new MLflow store, copied from a session template whose tables
    are already made (making them takes MLflow 1.5-2 s per store). An existing file is left
    as it is."""
    path = str(path)
    if not os.path.exists(path):
        template = os.path.join(data_cache(), "mlflow-template.db")
        if not os.path.exists(template):
            from mlflow.tracking import MlflowClient

            os.makedirs(data_cache(), exist_ok=True)
            partial = f"{template}.{os.getpid()}.tmp"
            MlflowClient(f"sqlite:///{partial}").search_experiments()
            os.replace(partial, template)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(template, path)
    return f"sqlite:///{path}"


def worst_relative_diff(got: dict, want: dict) -> tuple[float, str]:
    """The largest max |got - want| / max |want| over the tensors (``want``'s maximum floored at
    1e-6, for tensors that are all near zero), and its tensor's name."""
    assert got.keys() == want.keys()
    return max((float((got[key].float() - tensor.float()).abs().max())
                / max(float(tensor.abs().max()), 1e-6), key) for key, tensor in want.items())


def tiny_config(tmp_path, steps: int = 12, every: int = 4, workers: tuple[int, int] = (2, 2),
                extra: list[str] | None = None) -> Config:
    """The debug recipe, shortened, with everything written under ``tmp_path`` (the prepared
    data: the session's, :func:`data_cache`)."""
    return apply_overrides(debug(), [
        f"train.steps={steps}", f"checkpoint.every_steps={every}", "checkpoint.keep_last=10",
        f"parallel.min_workers={workers[0]}", f"parallel.max_workers={workers[1]}",
        "train.global_batch_size=12", "train.micro_batch_size=4", "train.warmup_steps=2",
        "elastic.collective_timeout_s=20", "elastic.resize_check_s=2",
        "elastic.hang_timeout_s=4",
        f"data.cache_dir={data_cache()}",
        f"tracking.tracking_uri={sqlite_store(tmp_path / 'mlflow.db')}",
        *(extra or []),
    ])


def audit_records(directory: str) -> list[dict]:
    """The workers' sample audit records (``worker-<pid>.jsonl``), each with its file's name."""
    out = []
    for path in sorted(glob.glob(os.path.join(directory, "worker-*.jsonl"))):
        with open(path) as f:
            out += [dict(json.loads(line), file=os.path.basename(path)) for line in f]
    return out


def consumed_samples(directory: str) -> dict[int, list[tuple[int, int]]]:
    """Samples consumed per committed step, from the workers' audit logs.

    A rank writes a ``taken`` record of its share once its batch is in (before the step's
    commit vote) and a ``committed`` record once the step committed. A step may have run more
    than once (re-done after a failure): the latest membership epoch in which it committed
    counts, all of that epoch's ranks' shares in rank order.
    """
    taken: dict[tuple[int, int], dict[int, dict]] = {}
    committed: dict[int, set[int]] = {}
    for rec in audit_records(directory):
        if rec["kind"] == "taken":
            taken.setdefault((rec["step"], rec["epoch"]), {})[rec["rank"]] = rec
        else:
            committed.setdefault(rec["step"], set()).add(rec["epoch"])
    out = {}
    for step, epochs in committed.items():
        shares = taken.get((step, max(epochs)), {})
        world = {r["world_size"] for r in shares.values()}
        assert len(world) == 1 and sorted(shares) == list(range(world.pop())), (
            f"step {step} committed in epoch {max(epochs)} without every rank's taken record: "
            f"{sorted(shares.values(), key=lambda r: r['rank'])}")
        # sequences left out by data.bad_samples=skip were consumed too
        out[step] = [tuple(i) for rank in sorted(shares)
                     for i in shares[rank]["ids"] + shares[rank]["bad"]]
    return out


def assert_each_sample_once(directory: str, steps: int, global_batch: int, num_sequences: int,
                            seed: int = 0) -> None:
    from elastic_moe.data.sampler import DataPosition, stream_samples

    per_step = consumed_samples(directory)
    assert sorted(per_step) == list(range(steps)), f"steps logged: {sorted(per_step)}"
    seen = [i for step in range(steps) for i in per_step[step]]
    assert len(seen) == len(set(seen)), "a sample was consumed twice in committed steps"
    expected = stream_samples(DataPosition(seed=seed), 0, steps * global_batch, num_sequences)
    if seen != expected:
        wrong = [step for step in range(steps) if per_step[step]
                 != expected[step * global_batch:(step + 1) * global_batch]]
        first = wrong[0]
        raise AssertionError(
            f"consumed samples differ from the stream (lost or reordered) at steps {wrong}; "
            f"step {first} consumed {per_step[first]}, the stream has "
            f"{expected[first * global_batch:(first + 1) * global_batch]}; "
            f"records of that step: "
            f"{[r for r in audit_records(directory) if r['step'] == first]}")


def single_process_weights(cfg: Config, skip_step: int | None = None) -> dict[str, torch.Tensor]:
    """The reference for a run's final weights: one process, no Ray, no process group, the
    library's model, optimizer and ``train_step`` over the same global batches of the prepared
    data (the sampler is world-size free). Step ``skip_step`` (1-based) consumes its batch and
    applies nothing. Matches a W-worker run to float-summation order (about 1e-4 relative
    at W=2; under 1e-3 at W=4 -> 2 in test_redundancy.py, whose runs have no top-k choice
    to flip).

    It runs on one intra-op thread, as the workers do (``OMP_NUM_THREADS=1`` in the tests'
    runtime env). On a 2-core AMD EPYC box two threads summed in another order, the routers'
    top-k choices flipped at a near tie, the aux-free biases of 4 experts moved the other way,
    and the weights ended 5.8e-2 apart from a 2-worker run (2026-12-07); on one thread, 9e-5."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _single_process_weights(cfg, skip_step)
    finally:
        torch.set_num_threads(threads)


def _single_process_weights(cfg: Config, skip_step: int | None) -> dict[str, torch.Tensor]:
    from elastic_moe.data.sample_corpus import ensure_prepared
    from elastic_moe.data.sampler import (
        DataPosition,
        advance,
        batch_sample_ids,
        make_batch,
        split_batch,
    )
    from elastic_moe.data.shards import TokenDataset
    from elastic_moe.model.transformer import Transformer
    from elastic_moe.train.step import build_optimizer, train_step

    manifest = ensure_prepared(cfg.data.cache_dir, cfg.data.tokenizer_vocab_size,
                               cfg.train.seq_len)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.init_weights(cfg.train.seed)
    optimizer = build_optimizer(model, cfg.train)
    data = TokenDataset(manifest)
    position = DataPosition(seed=cfg.train.seed)
    batch_size = cfg.train.global_batch_size
    for step in range(cfg.train.steps):
        if step + 1 != skip_step:
            ids = batch_sample_ids(position, data.num_sequences, batch_size, 0, 1)
            train_step(model, optimizer, split_batch(make_batch(data, ids),
                                                      cfg.train.micro_batch_size),
                       step, cfg.train, cfg.model)
        position = advance(position, batch_size, data.num_sequences)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def final_model_tensors(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """Full model tensors of the newest committed checkpoint, read in this process."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from elastic_moe.checkpoint import Checkpointer, step_dir_name

    step = Checkpointer(checkpoint_dir, async_save=False).latest_step()
    assert step is not None, f"no committed checkpoint in {checkpoint_dir}"
    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(
        os.path.join(checkpoint_dir, step_dir_name(step))), planner=_EmptyStateDictLoadPlanner(),
        no_dist=True)
    return {k: v for k, v in state["model"].items()}


def wait_for(predicate, timeout_s: float, what: str, log_path: str, tail_chars: int = 8000):
    """``predicate()``'s first truthy value, polled every 0.2 s; after ``timeout_s`` the test
    fails naming ``what`` and showing the end of the launcher's output (``log_path``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    with open(log_path) as f:
        tail = f.read()[-tail_chars:]
    pytest.fail(f"no {what} after {timeout_s:.0f} s; launcher output:\n{tail}")


@contextlib.contextmanager
def ray_head(env: dict[str, str], *args: str) -> Iterator[None]:
    """A `ray start --head` of its own (temp dir; ``args``: ports and resources), stopped by
    killing only its processes. With ``RAY_AUTH_MODE=token`` in ``env`` and no token named
    there, the head gets a token file of its own and ``env`` names it, so the callers'
    processes that use ``env`` reach the head with no ~/.ray/auth_token on this machine."""
    bin_dir = os.path.dirname(sys.executable)
    temp_dir = tempfile.mkdtemp(prefix="emoe-", dir="/tmp")  # short: Ray's socket paths
    try:
        if (env.get("RAY_AUTH_MODE") == "token" and "RAY_AUTH_TOKEN" not in env
                and "RAY_AUTH_TOKEN_PATH" not in env):
            env["RAY_AUTH_TOKEN_PATH"] = os.path.join(temp_dir, "auth_token")
            write_auth_token(env["RAY_AUTH_TOKEN_PATH"])
        # ports Ray would otherwise take at their fixed defaults (10001, 52365), which a head
        # started beside this one (another test process of `make test`) may hold
        named = {arg.split("=", 1)[0] for arg in args}
        own_ports = [f"{flag}={free_port()}" for flag in
                     ("--ray-client-server-port", "--dashboard-agent-listen-port")
                     if flag not in named]
        started = subprocess.run([os.path.join(bin_dir, "ray"), "start", "--head", *args,
                                  *own_ports, "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                                 env=env, capture_output=True, text=True, timeout=180)
        if started.returncode != 0:
            raise RuntimeError(f"ray start --head {' '.join(args)} exited {started.returncode}:"
                               f"\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}")
        yield
    finally:
        out = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout
        for pid in out.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


# The local Ray instance that consecutive tests of one module share (`local_ray`): its ray.init
# arguments and its GCS address, while it is up.
_LOCAL_RAY: dict[str, str] = {}


def local_ray(num_cpus: int, **init_kwargs) -> None:
    """Connects the test to a local Ray instance of ``num_cpus`` CPUs: the one the test before
    left (:func:`release_local_ray`) when that test asked for the same and everything it started
    has ended, or a new one. On the 2-core CI box a new instance took 4-6 s to start, its
    shutdown 1.5 s more, and the pair 7-9 CPU-seconds (2026-12-07). The run under test starts
    its own coordinator, data readers and workers either way, and they end with the run.

    A module that uses it imports :func:`local_ray_per_module`, which shuts the instance down
    after the module's last test; a test of that module that starts Ray in another way calls
    :func:`shutdown_local_ray` first. A failed test shuts it down too (``tests/conftest.py``)."""
    import ray

    key = repr((num_cpus, sorted(init_kwargs.items())))
    if (ray.is_initialized() and _LOCAL_RAY.get("key") == key
            and _LOCAL_RAY.get("gcs") == ray.get_runtime_context().gcs_address):
        return
    shutdown_local_ray()
    ray.init(address="local", num_cpus=num_cpus, **init_kwargs)
    _LOCAL_RAY.update(key=key, gcs=ray.get_runtime_context().gcs_address)


def _idle() -> bool:
    """Every CPU free, no named actor alive, every placement group removed: what the test's run
    started has ended (its coordinator, readers and workers are named actors; its slots are
    placement groups, which a later placement would take CPUs from the next test with)."""
    import ray
    from ray.util import placement_group_table

    return (ray.available_resources().get("CPU", 0.0) == ray.cluster_resources().get("CPU")
            and not ray.util.list_named_actors(all_namespaces=True)
            and all(pg["state"] == "REMOVED" for pg in placement_group_table().values()))


def release_local_ray(idle_timeout_s: float = 15.0) -> None:
    """Called in a test's ``finally``: leaves the instance up for the next test when no
    exception is on its way out (``sys.exc_info()`` in a ``finally``) and the instance is idle
    within ``idle_timeout_s`` (:func:`_idle`). Otherwise shuts it down."""
    import ray

    if sys.exc_info()[0] is None and ray.is_initialized() and "key" in _LOCAL_RAY:
        try:
            deadline = time.monotonic() + idle_timeout_s
            while time.monotonic() < deadline:
                if _idle():
                    return
                time.sleep(0.2)
        except BaseException:
            shutdown_local_ray()
            raise
    shutdown_local_ray()


def shutdown_local_ray() -> None:
    import ray

    _LOCAL_RAY.clear()
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def local_ray_per_module() -> Iterator[None]:
    """Shuts down the module's shared local Ray instance (:func:`local_ray`) after its last
    test: autouse in every test module that imports it."""
    yield
    shutdown_local_ray()
