"""The worker group's slots (one-bundle placement groups) on a real local Ray."""

from __future__ import annotations

import time

import pytest

from tests.integration.elastic_helpers import tiny_config

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_placed_slots_always_read_as_free(tmp_path):
    """A slot the cluster placed reads as free on every check, not only when a fresh
    ``pg.ready()`` reply happens to arrive in time: the launch gathers workers for every slot
    it can fill, and a run with room for 3 starts with 3. One slot more than the cluster holds
    stays pending and never reads as free."""
    from types import SimpleNamespace

    from elastic_moe.actors.coordinator import CoordinatorState
    from elastic_moe.actors.worker_group import ElasticGroup

    ray.init(address="local", num_cpus=3, include_dashboard=False)
    try:
        cfg = tiny_config(tmp_path, workers=(1, 4))
        record = CoordinatorState("slots")
        group = ElasticGroup(cfg, SimpleNamespace(run_name="slots"), record, None,
                             use_gpu=False)
        group.slots.open(4)
        started = time.time()
        assert group.slots.ready(timeout=1.0) == [0, 1, 2]
        assert time.time() - started >= 1.0  # it waited for the fourth, which cannot be placed
        reads = [group._free_slots() for _ in range(30)]
        assert reads == [[0, 1, 2]] * 30
        # the slots are named in the record: a restarted coordinator finds them again
        assert [ray.util.get_placement_group(name).id for name in record.state["slots"]] \
            == [pg.id for pg in group.slots.groups]
    finally:
        ray.shutdown()
