"""What a launch makes fresh processes import.

Every Ray task runs in a process that imports its function's module first. The launcher's
probes run one on each node, beside the workers starting there: a probe module that imported
torch cost 3-5 s of every launch on a 2-core node. And counting a model's parameters builds it
on the meta device, where ``normal_`` and ``arange`` have Python kernels whose first use imports
TorchDynamo (2 s in the launcher and in the coordinator).
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _imported_after(code: str, prefixes: tuple[str, ...]) -> list[str]:
    probe = (f"import sys\n{code}\n"
             f"print(' '.join(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def test_the_launch_probes_import_no_torch():
    heavy = _imported_after(
        "import elastic_moe.actors.node_facts, elastic_moe.actors.shared_storage\n"
        "from elastic_moe.parallel.network import choose_binding",
        ("torch", "transformers", "mlflow", "elastic_moe.train", "elastic_moe.model"))
    assert heavy == [], f"heavy modules imported: {heavy[:20]}"


def test_counting_parameters_on_meta_loads_no_dynamo():
    code = ("from elastic_moe.config import debug\n"
            "from elastic_moe.model.transformer import count_parameters\n"
            "assert count_parameters(debug().model).total > 0")
    # those kernels run with TorchDynamo disabled, which loads it (375 modules, ~2 s)
    assert _imported_after(code, ("torch._dynamo",)) == []


def test_a_meta_model_has_the_parameters_and_buffers_of_a_real_one():
    import torch

    from elastic_moe.config import debug
    from elastic_moe.model.transformer import Transformer, count_parameters

    cfg = debug().model
    real = Transformer(cfg)
    with torch.device("meta"):
        meta = Transformer(cfg)
    shapes = {k: v.shape for k, v in real.state_dict().items()}
    assert {k: v.shape for k, v in meta.state_dict().items()} == shapes
    assert {k: b.shape for k, b in meta.named_buffers()} == \
        {k: b.shape for k, b in real.named_buffers()}
    counts = count_parameters(cfg)
    mtp = sum(p.numel() for p in real.mtp.parameters())
    assert counts.total == sum(p.numel() for p in real.parameters()) - mtp
    assert counts.mtp == mtp
    # built off meta, the constructor still sets the rotary tables and draws the embedding
    from elastic_moe.model.attention import rope_frequencies

    angles = rope_frequencies(cfg)
    assert torch.equal(real.rope_cos, angles.cos()) and torch.equal(real.rope_sin, angles.sin())
    assert real.embed_tokens.weight.std() > 0.5  # nn.Embedding's N(0, 1)


def test_the_coordinator_and_data_readers_load_no_torch(tmp_path):
    """The coordinator's control loop and the data readers never load torch (3-4 s of CPU and
    ~200 MiB each, on the launch's critical path on a small node; and an import that lands in
    the middle of a recovery stalls the coordinator past the workers' lease): their modules
    import none, the loop plans layouts from the parameter counts the launcher hands it, a
    survivor's shard manifest unpickles without it, a rollback lists the committed checkpoints
    without it, and a reader sends numpy arrays that the training worker turns into tensors."""
    import pickle

    from elastic_moe.train.shard_state import ShardManifest, ShardSpec

    manifest = pickle.dumps(ShardManifest(rank=1, step=7, specs=[
        ShardSpec(key="layers.0.w", dtype="float32", shape=(2, 3), global_shape=(4, 3),
                  offset=(2, 0))], meta={"tokens": 5}))
    for step, committed in ((4, True), (8, True), (12, False)):
        os.makedirs(tmp_path / f"step_{step:08d}")
        if committed:
            (tmp_path / f"step_{step:08d}" / "COMMITTED").write_text("{}")
    code = (f"import pickle\nm = pickle.loads({manifest!r})\n"
            "assert (m.step, m.specs[0].offset, m.specs[0].numel) == (7, (2, 0), 6), m\n"
            "from elastic_moe.storage import committed_steps\n"
            f"assert committed_steps({str(tmp_path)!r}) == [4, 8]\n"
            "import elastic_moe.actors.run_loop, elastic_moe.actors.coordinator\n"
            "import elastic_moe.actors.worker_group, elastic_moe.actors.data_worker\n"
            "import elastic_moe.actors.train_worker, elastic_moe.actors.run_log\n"
            "from elastic_moe.config import debug\n"
            "from elastic_moe.parallel.mesh import plan_mesh, remember_param_counts\n"
            "cfg = debug()\n"
            "remember_param_counts(cfg.model, (1_000_000, 2_000_000))\n"
            "plan = plan_mesh(4, 2, cfg.model, global_batch_size=8)\n"
            "assert plan.world_size == 4, plan\n"
            "from elastic_moe.data.sampler import gather_batch\n"
            "class Data:\n"
            "    seq_len = 3\n"
            "    def sequence(self, i):\n"
            "        import numpy as np\n"
            "        return np.arange(4) + i, np.zeros(4, dtype=np.int32)\n"
            "batch = gather_batch(Data(), [(0, 5), (0, 7)])\n"
            "assert batch['labels'].tolist() == [[6, 7, 8], [8, 9, 10]], batch")
    assert _imported_after(code, ("torch", "elastic_moe.model")) == []


def test_given_parameter_counts_plan_as_the_counted_ones():
    """The coordinator's plans (from counts the launcher measured) are the plans of a process
    that counts the model itself, at every size (reference: the meta-model count); with a
    memory budget, the counts decide the plan."""
    import dataclasses

    from elastic_moe.config import debug, small
    from elastic_moe.parallel import mesh

    sizes = (1, 2, 3, 8, 16, 64)
    for cfg in (debug(), small()):
        counted = mesh.param_counts(cfg.model)
        # a budget that fits the state at some sizes and not at others
        need = mesh.estimate_bytes_per_rank(cfg.model, 8, 8) / 2**30
        prefs = dataclasses.replace(cfg.parallel, min_workers=1, max_workers=64,
                                    memory_per_gpu_gib=need * 1.5)

        def plans(prefs=prefs, cfg=cfg) -> list:
            out = []
            for w in sizes:
                try:
                    out.append(mesh.plan_mesh(w, 8, cfg.model, prefs, global_batch_size=64))
                except ValueError as exc:
                    out.append(str(exc))
            return out

        want = plans()
        given = dict(mesh._GIVEN_COUNTS)
        try:
            mesh.remember_param_counts(cfg.model, counted)
            mesh._param_counts_cached.cache_clear()
            assert plans() == want
            assert mesh._param_counts_cached.cache_info().misses == 0  # no model was built
            mesh.remember_param_counts(cfg.model, (counted[0] * 100, counted[1] * 100))
            assert plans() != want  # the given counts are the ones planned with
        finally:
            mesh._GIVEN_COUNTS.clear()
            mesh._GIVEN_COUNTS.update(given)


def test_a_workers_torch_error_reaches_the_coordinator_without_torch():
    """A call the coordinator makes that raises a torch exception (a gloo or store error in a
    join) raises :class:`WorkerRaised` instead, which the coordinator's process unpickles
    without importing torch; other exceptions pass as they are."""
    import pickle

    import pytest
    import torch
    import torch.distributed as dist
    from elastic_moe.actors.messages import WorkerRaised
    from elastic_moe.actors.train_worker import _for_coordinator

    from elastic_moe.parallel.network import NetworkInterfaceError

    @_for_coordinator
    def join(exc: BaseException) -> None:
        raise exc

    with pytest.raises(WorkerRaised, match="DistNetworkError: connection reset") as raised:
        join(dist.DistNetworkError("connection reset"))
    assert isinstance(raised.value.__cause__, dist.DistNetworkError)
    with pytest.raises(NetworkInterfaceError):  # torch-free: the coordinator matches its type
        join(NetworkInterfaceError("no interface eth9"))
    with pytest.raises(ValueError, match="bad config"):  # a built-in with plain arguments
        join(ValueError("bad config"))
    from elastic_moe.checkpoint import CheckpointError  # the project's, in a torch module

    with pytest.raises(WorkerRaised, match="CheckpointError: no committed checkpoint"):
        join(CheckpointError("no committed checkpoint"))
    with pytest.raises(WorkerRaised, match="KeyError"):  # a built-in holding a tensor
        join(KeyError(torch.zeros(1)))
    error = pickle.dumps(raised.value)
    code = (f"import pickle\ne = pickle.loads({error!r})\n"
            "assert type(e).__name__ == 'WorkerRaised' and 'connection reset' in str(e), e")
    assert _imported_after(code, ("torch",)) == []


def test_the_launcher_help_imports_neither_ray_nor_torch():
    """``jobs/train.py --help`` answers at once: it prints its options (a default included, the
    connect timeout's, written as a literal for this) without loading Ray or torch (about 2 s
    together here)."""
    code = ("import contextlib, io, runpy\n"
            "sys.argv = ['jobs/train.py', '--help']\n"
            "text = io.StringIO()\n"
            "with contextlib.redirect_stdout(text):\n"
            "    try:\n"
            "        runpy.run_path('jobs/train.py', run_name='__main__')\n"
            "    except SystemExit as stop:\n"
            "        assert stop.code in (0, None), stop.code\n"
            "    else:\n"
            "        raise AssertionError('--help did not exit')\n"
            "assert '--connect-timeout' in text.getvalue(), text.getvalue()[-2000:]")
    heavy = _imported_after(code, ("torch", "ray", "mlflow", "transformers"))
    assert heavy == [], f"heavy modules imported by --help: {heavy[:20]}"
