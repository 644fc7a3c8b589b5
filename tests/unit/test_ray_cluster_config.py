import copy
import os

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
    with open(os.path.join(ROOT, "ray_cluster.yaml")) as f:
        return yaml.safe_load(f)


def test_cluster_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_load())
    validate_config(config)
    types = config["available_node_types"]
    assert {"head", "gpu_on_demand", "gpu_spot"} <= set(types)
    assert types["gpu_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"


def test_gpu_capacity_covers_the_documented_worker_range():
    config = _load()
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "--workers 8:64" in readme
    max_gpus = sum(t.get("max_workers", 0) * t.get("resources", {}).get("GPU", 0)
                   for t in config["available_node_types"].values())
    assert max_gpus >= 64


def test_schema_check_rejects_a_broken_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(_load())
    broken["available_node_types"]["gpu_spot"]["min_workers"] = "many"
    with pytest.raises(Exception, match="many"):
        validate_config(prepare_config(broken))
