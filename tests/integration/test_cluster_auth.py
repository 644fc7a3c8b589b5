"""ray_cluster.yaml's head, started here: token auth refuses a job without the token.

The head runs `ray start` with the flags and the environment the YAML gives the head node. Only
what cannot apply on this machine changes: ports (free ones, so other heads here do not clash),
the token file (a fresh one in a temp dir stands in for the file ``ray up`` mounts), and
``--autoscaling-config`` (written by ``ray up`` on a real head; it would start an AWS autoscaler).
Then a real ``ray job submit`` without the token, with a wrong token, and with the right one.
The accepted job runs a Ray task that imports ``elastic_moe.kernels`` from the job's working dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import psutil
import pytest

from tests.integration.multiproc import free_port
from tests.integration.netns import write_auth_token
from tests.ray_cluster_yaml import ROOT, flag_value, load_cluster_yaml, ray_starts

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

JOB = """
import os, ray
ray.init()

@ray.remote
def where():
    import elastic_moe.kernels
    return os.getcwd(), elastic_moe.kernels.__file__

print("JOB-RESULT", *ray.get(where.remote()))
"""


def _head_command(args: list[str], temp_dir: str) -> tuple[list[str], int]:
    """The YAML's `ray start --head` flags with local ports; returns the argv and dashboard port."""
    dashboard = free_port()
    replace = {"--port": free_port(), "--object-manager-port": free_port()}
    kept = []
    for arg in args:
        name = arg.split("=", 1)[0]
        if name == "--autoscaling-config":
            continue
        kept.append(f"{name}={replace[name]}" if name in replace else arg)
    local = [f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={free_port()}", "--num-cpus=2", "--include-dashboard=true",
             "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    return ["ray", "start", *kept, *local], dashboard


@pytest.fixture
def yaml_head(tmp_path):
    (head,) = ray_starts(load_cluster_yaml(), "head_start_ray_commands")
    assert "--head" in head.args
    token_file = tmp_path / "auth_token"  # stands in for the file `ray up` copies to the node
    token = write_auth_token(str(token_file))
    yaml_env = dict(head.env)
    assert yaml_env.get("RAY_AUTH_TOKEN_PATH"), yaml_env
    yaml_env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    bin_dir = os.path.dirname(sys.executable)
    base_env = {key: value for key, value in os.environ.items()
                if not key.startswith("RAY_AUTH") and key != "RAY_ADDRESS"}
    base_env["PATH"] = f"{bin_dir}:{base_env['PATH']}"
    base_env["HOME"] = str(tmp_path / "home")  # no ~/.ray/auth_token of this machine's user
    head_env = {**base_env, **yaml_env}
    temp_dir = tempfile.mkdtemp(prefix="emoe-auth-", dir="/tmp")  # short: Ray's socket paths
    argv, dashboard = _head_command(head.args, temp_dir)
    gcs_port = flag_value(argv, "--port")
    address_file = "/tmp/ray/ray_current_cluster"
    try:
        proc = subprocess.run(argv, env=head_env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        yield {"base_env": base_env, "token": token, "token_file": str(token_file),
               "address": f"http://127.0.0.1:{dashboard}", "dashboard_port": dashboard}
    finally:
        out = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout
        for pid in out.split():  # only this head's processes: their command lines name temp_dir
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
        # a killed head leaves its address behind; remove it only if it is this head's
        if os.path.exists(address_file) and open(address_file).read().strip().endswith(f":{gcs_port}"):
            os.remove(address_file)


def _submit(head, env_extra: dict[str, str], *entrypoint: str) -> subprocess.CompletedProcess:
    env = {**head["base_env"], **env_extra}
    return subprocess.run(["ray", "job", "submit", "--address", head["address"], "--working-dir", ROOT,
                           "--", *entrypoint], env=env, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_yaml_head_refuses_jobs_without_the_token_and_runs_them_with_it(yaml_head):
    head = yaml_head
    # the dashboard (and with it the job API) listens on loopback only
    listening = {conn.laddr.ip for conn in psutil.net_connections("tcp")
                 if conn.status == psutil.CONN_LISTEN and conn.laddr.port == head["dashboard_port"]}
    assert listening == {"127.0.0.1"}, listening

    # the job API itself, no client library in between: 401 without a token
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{head['address']}/api/jobs/", timeout=30)
    assert refused.value.code in (401, 403), refused.value

    marker = "should-never-run"
    no_token = _submit(head, {"RAY_AUTH_MODE": "disabled"}, "python", "-c", f"print('{marker}')")
    wrong_token = _submit(head, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(32).hex()},
                          "python", "-c", f"print('{marker}')")
    for proc in (no_token, wrong_token):
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0, output[-3000:]
        assert "succeeded" not in output and marker not in output, output[-3000:]
        assert any(word in output.lower() for word in ("401", "403", "unauthorized", "authentication")), \
            output[-3000:]

    with_token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": head["token_file"]}
    accepted = _submit(head, with_token, "python", "-c", JOB)
    output = accepted.stdout + accepted.stderr
    assert accepted.returncode == 0, output[-3000:]
    assert "succeeded" in output, output[-3000:]
    (line,) = [line for line in accepted.stdout.splitlines() if line.startswith("JOB-RESULT")]
    _, cwd, kernels_file = line.split()
    # the worker imported the project from the shipped working dir, not from this checkout
    assert kernels_file == os.path.join(cwd, "kernels", "__init__.py"), line
    assert not kernels_file.startswith(ROOT + os.sep), line

    # only the accepted job exists: the refused ones never reached the cluster
    request = urllib.request.Request(f"{head['address']}/api/jobs/",
                                     headers={"Authorization": f"Bearer {head['token']}"})
    jobs = json.load(urllib.request.urlopen(request, timeout=30))
    assert [job["status"] for job in jobs] == ["SUCCEEDED"], jobs
