"""A fresh environment from requirements.lock, plus the newest transformers and Hugging Face kernels.

transformers (>= 5.25) imports Hugging Face's ``kernels`` package when it loads a model, and the
project used to install a top-level ``kernels`` of its own: whichever came first on sys.path broke
the other (transformers under pytest, the Triton expert backend in ``python jobs/train.py``).
Here both live in one environment, built the way a new machine builds it:

- a new venv with exactly the lock's pins, then ``transformers`` and ``kernels`` upgraded to
  their newest releases; the project itself is *not* installed (a plain checkout, as on Ray
  nodes that get the working dir);
- ``jobs/train.py`` trains two steps with ``model.expert_backend=triton`` (Triton's interpreter on
  CPU) in Ray workers that import the project from the checkout;
- one Python process with the checkout first on sys.path (as under pytest) loads a tiny
  DeepSeek-V3 checkpoint with transformers and runs the project's Triton expert kernels.

uv builds the venv (seconds instead of minutes with pip), reading the package sources that pip is
configured with on this machine, and reuses its cache across runs.
"""

from __future__ import annotations

import os
import shlex
import sqlite3
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UV = os.path.join(os.path.dirname(sys.executable), "uv")

ONE_PROCESS = """
import sys
sys.path.insert(0, sys.argv[1])  # the checkout first, as pytest and Ray working dirs put it
import importlib
import importlib.metadata
import torch
import transformers
import elastic_moe.kernels as ours
from elastic_moe.config import debug
from elastic_moe.kernels.reference import routed_experts_reference
from elastic_moe.model import hf
from elastic_moe.model.transformer import Transformer

cfg = debug().model
model = Transformer(cfg)
model.init_weights(seed=0)
hf.save(model, sys.argv[2])
loaded = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2]).eval()
assert type(loaded).__name__ == "DeepseekV3ForCausalLM", type(loaded)
with torch.no_grad():
    logits = loaded(torch.randint(0, cfg.vocab_size, (1, 8))).logits
assert logits.shape == (1, 8, cfg.vocab_size) and torch.isfinite(logits).all()

# Hugging Face's kernels, whatever transformers did with it (by string: the import-rewrite command
# for this project turns `import kernels` lines into elastic_moe.kernels)
kernels = importlib.import_module("kernels")
assert hasattr(kernels, "Mode"), dir(kernels)  # its API
assert kernels.__file__ != ours.__file__, kernels.__file__
assert ours.__file__ == sys.argv[1] + "/kernels/__init__.py", ours.__file__

gen = torch.Generator().manual_seed(0)
T, D, E, K, I = 12, 32, 4, 2, 16  # feature sizes: multiples of 16
x = torch.randn(T, D, generator=gen)
ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
weights = torch.rand(T, K, generator=gen)
w13 = torch.randn(E, 2 * I, D, generator=gen) * 0.2
w2 = torch.randn(E, D, I, generator=gen) * 0.2
out = ours.routed_experts(x, ids, weights, w13, w2, backend="triton")
torch.testing.assert_close(out, routed_experts_reference(x, ids, weights, w13, w2), rtol=1e-4, atol=1e-4)
import triton
print("ONE-PROCESS-OK transformers", transformers.__version__, "kernels",
      importlib.metadata.version("kernels"), "triton", triton.__version__, "torch", torch.__version__)
"""


def _uv_env() -> dict[str, str]:
    """uv reading the package sources pip is configured with here (pip.conf, PIP_* variables)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                         text=True, check=True).stdout
    pip: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        words = shlex.split(value)
        pip[option] = words[0].split() if words else []
    env = dict(os.environ, UV_INDEX_STRATEGY="unsafe-best-match")  # pip's rule: best version anywhere
    if pip.get("index-url"):
        env["UV_INDEX_URL"] = pip["index-url"][0]
    if pip.get("extra-index-url"):
        env["UV_EXTRA_INDEX_URL"] = " ".join(pip["extra-index-url"])
    if pip.get("find-links"):
        env["UV_FIND_LINKS"] = ",".join(pip["find-links"])
    return env


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory) -> str:
    if not os.path.exists(UV):
        pytest.fail(f"{UV} missing: uv comes with the dev extras (requirements.lock)")
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    env = _uv_env()
    subprocess.run([UV, "venv", "-q", "--python", sys.executable, str(venv)], check=True, env=env,
                   timeout=300)
    python = str(venv / "bin" / "python")
    install = [UV, "pip", "install", "-q", "--python", python]
    subprocess.run([*install, "--no-deps", "-r", os.path.join(ROOT, "requirements.lock")], check=True,
                   env=env, timeout=600)
    subprocess.run([*install, "--upgrade-package", "transformers", "--upgrade-package", "kernels",
                    "transformers", "kernels"], check=True, env=env, timeout=600)
    listing = subprocess.run([UV, "pip", "list", "--python", python], capture_output=True, text=True,
                             check=True, env=env).stdout
    names = {line.split()[0].lower() for line in listing.splitlines()[2:] if line.strip()}
    assert "elastic-moe" not in names  # a plain checkout, not an install
    assert not any(name.startswith("nvidia-") for name in names), sorted(names)
    print(listing)
    return python


def _fresh_env(*drop: str) -> dict[str, str]:
    """This environment without ``drop``, and with Python writing bytecode: uv installs none, so
    with ``PYTHONDONTWRITEBYTECODE`` set (as on some CI machines) every process of the fresh venv
    would compile torch, Ray and MLflow from source again (the training test took 2-3x as long)."""
    return {key: value for key, value in os.environ.items()
            if key not in (*drop, "PYTHONDONTWRITEBYTECODE")}


def test_train_two_steps_with_the_triton_backend_beside_hf_kernels(fresh_python, tmp_path):
    env = _fresh_env("RAY_ADDRESS", "PYTHONPATH")
    env["TRITON_INTERPRET"] = "1"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run(
        [fresh_python, "jobs/train.py", "--steps", "2", "--set", "model.expert_backend=triton",
         # Triton's interpreter runs the kernels in Python: one 16-token sequence per rank keeps
         # a step at seconds (the recipe's 4 x 128 took 37 s a step, and as long to warm up)
         "--set", "train.seq_len=16", "--set", "train.micro_batch_size=1",
         "--set", "train.global_batch_size=2",
         "--output-dir", str(tmp_path / "out"), "--set", f"data.cache_dir={tmp_path / 'data'}",
         "--set", f"tracking.tracking_uri={uri}", "--run-name", "fresh"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "run fresh: FINISHED at step 2" in proc.stdout, output[-4000:]
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        backend = db.execute("SELECT value FROM params WHERE key = 'model.expert_backend'").fetchall()
        steps = db.execute("SELECT step FROM metrics WHERE key = 'loss' ORDER BY step").fetchall()
    assert backend == [("triton",)], backend
    assert steps == [(1,), (2,)], steps


def test_transformers_loads_deepseek_v3_and_triton_kernels_run_in_one_process(fresh_python, tmp_path):
    env = _fresh_env("PYTHONPATH")
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([fresh_python, "-c", ONE_PROCESS, ROOT, str(tmp_path / "tiny-v3")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "ONE-PROCESS-OK" in proc.stdout, proc.stdout[-2000:]
    print(proc.stdout.strip().splitlines()[-1])
