import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session", autouse=True)
def _shared_data_cache(tmp_path_factory):
    """One prepared sample corpus for the whole session (tests.integration.elastic_helpers.
    data_cache): preparing it takes seconds, and every run of the tests reads the same data."""
    from tests.integration.elastic_helpers import DATA_CACHE_ENV

    os.environ.setdefault(DATA_CACHE_ENV, str(tmp_path_factory.getbasetemp() / "data-cache"))
    yield


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
