import copy
import os
import re

import pytest

from tests.ray_cluster_yaml import CLUSTER_YAML, ROOT, flag_value, ray_starts
from tests.ray_cluster_yaml import load_cluster_yaml as _load


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


def test_every_node_starts_with_token_auth_from_a_mounted_file():
    config = _load()
    mounts = config["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = ray_starts(config, key)
        assert len(starts) == 1, (key, config[key])
        env = starts[0].env
        assert env.get("RAY_AUTH_MODE") == "token", (key, env)
        # the token comes from a file that `ray up` copies to every node, never from the YAML
        assert env.get("RAY_AUTH_TOKEN_PATH") in mounts, (key, env, mounts)
        assert "RAY_AUTH_TOKEN" not in env
    text = open(CLUSTER_YAML).read()
    assert "RAY_AUTH_TOKEN=" not in text
    assert not re.search(r"[0-9a-f]{32}", text), "something that looks like a token is in the YAML"


def test_dashboard_and_job_api_listen_on_localhost_only():
    config = _load()
    (head,) = ray_starts(config, "head_start_ray_commands")
    assert flag_value(head.args, "--dashboard-host") in ("127.0.0.1", "localhost"), head.args
    assert "0.0.0.0" not in open(CLUSTER_YAML).read()
    cluster_doc = open(os.path.join(ROOT, "docs", "cluster.md")).read()
    assert "ray dashboard ray_cluster.yaml" in cluster_doc


def _user_docs() -> list[str]:
    docs = os.path.join(ROOT, "docs")
    return ["README.md", *(os.path.join("docs", name) for name in sorted(os.listdir(docs))
                          if name.endswith(".md"))]


def _shell_commands(path: str) -> list[str]:
    """Each command of the doc's ```bash blocks, continuation lines joined."""
    text = open(os.path.join(ROOT, path)).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        commands += [" ".join(cmd.split()) for cmd in block.replace("\\\n", " ").split("\n")
                     if cmd.strip()]
    return commands


def test_docs_submit_with_the_token_and_run_mlflow_with_auth():
    commands = [cmd for path in _user_docs() for cmd in _shell_commands(path)]
    submits = [cmd for cmd in commands if "ray job submit" in cmd]
    servers = [cmd for cmd in commands if cmd.startswith("mlflow server")]
    assert submits and servers, commands
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in submits), submits
    assert all("--app-name basic-auth" in cmd for cmd in servers), servers


def test_no_doc_says_training_restarts_from_the_last_checkpoint_at_each_size():
    for path in ("ray_cluster.yaml", *_user_docs()):
        text = " ".join(open(os.path.join(ROOT, path)).read().replace("#", " ").split())
        assert not re.search(r"restores? the last committed checkpoint at every new size", text), path
