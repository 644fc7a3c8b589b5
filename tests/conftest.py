import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Every Ray the tests start (ray.init, Cluster nodes, `ray start`, the CLI's embedded Ray, all
# of which inherit this) skips the workers Ray prestarts for the first driver: started without
# the job's runtime env, no actor of a run uses them, and without them a launch reached its
# first step 0.3-0.7 s sooner on the 2-core box. The launcher's embedded Ray does the same
# (actors.cluster.init_ray).
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")


@pytest.fixture(scope="session", autouse=True)
def _shared_data_cache(tmp_path_factory):
    """One prepared sample corpus for the whole session (tests.integration.elastic_helpers.
    data_cache): preparing it takes seconds, and every run of the tests reads the same data."""
    from tests.integration.elastic_helpers import DATA_CACHE_ENV

    os.environ.setdefault(DATA_CACHE_ENV, str(tmp_path_factory.getbasetemp() / "data-cache"))
    yield


@pytest.fixture(autouse=True)
def _no_binding_leaks():
    """A test leaves the variables that bind process groups to an interface as it found them:
    the Ray nodes of every later test in the process inherit them (a leaked
    GLOO_SOCKET_IFNAME=eth0 once broke test_partition's namespace node, which has no eth0)."""
    from elastic_moe.parallel.network import BIND_ENV

    before = {name: os.environ.get(name) for name in BIND_ENV}
    yield
    after = {name: os.environ.get(name) for name in BIND_ENV}
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    assert after == before, f"the test changed {after} (was {before})"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that failed shuts down the local Ray its module's tests share
    (tests.integration.elastic_helpers.local_ray), whatever it left running: the next test
    starts from a new instance. Its checks after the run (weights, MLflow) fail after its
    ``finally`` has kept the instance."""
    outcome = yield
    report = outcome.get_result()
    helpers = sys.modules.get("tests.integration.elastic_helpers")
    if report.when == "call" and report.failed and helpers is not None:
        helpers.shutdown_local_ray()
