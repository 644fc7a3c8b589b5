"""The launch-time memory estimate: its parts against independent counts, its refusals.

* parameters, gradients and optimizer state at W=1 against the parameter count of a model built
  on the meta device (4 + 4 + 8 bytes each);
* activations against what a real forward pass holds on CPU (resident memory after the forward,
  in a fresh process), within a factor;
* ``jobs/train.py --recipe small`` on this machine: refused before any data preparation or Ray,
  naming the estimate and the machine's RAM (compared with psutil's total);
* the world size the error suggests really fits, and the one below it does not.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch

from elastic_moe.config import debug, small
from elastic_moe.model.transformer import Transformer
from elastic_moe.parallel import plan_mesh
from elastic_moe.parallel.memory import GIB, MemoryBudget, check_memory, estimate_worker_memory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_training_state_matches_the_parameter_count() -> None:
    cfg = small()
    with torch.device("meta"):
        total = sum(p.numel() for p in Transformer(cfg.model).parameters())  # MTP included
    plan = plan_mesh(1, 8, cfg.model)
    est = estimate_worker_memory(cfg.model, cfg.train, plan, device_type="cuda", host=False)
    assert est.parameters == 4 * total and est.gradients == 4 * total
    assert est.optimizer == 8 * total and est.staging == 0
    host = estimate_worker_memory(cfg.model, cfg.train, plan, device_type="cpu", host=True)
    assert host.staging == 12 * total  # the async checkpoint's resident copy


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_estimate_against_a_real_forward(precision: str) -> None:
    code = textwrap.dedent(f"""
        import dataclasses, psutil, torch
        from elastic_moe.config import debug
        from elastic_moe.model.transformer import Transformer
        from elastic_moe.parallel.memory import activation_bytes
        torch.set_num_threads(1)
        cfg = debug()
        model_cfg = dataclasses.replace(cfg.model, dim=256, num_heads=8, moe_inter_dim=128,
                                        inter_dim=512, vocab_size=8192, max_seq_len=512,
                                        original_seq_len=512)
        train = dataclasses.replace(cfg.train, seq_len=512, micro_batch_size=4,
                                    mixed_precision={precision!r})
        model = Transformer(model_cfg)
        model.init_weights(0)
        ids = torch.randint(0, model_cfg.vocab_size, (4, 513))
        doc = (torch.arange(512) >= 170).long().expand(4, -1).clone()
        before = psutil.Process().memory_info().rss
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled={precision == "bf16"}):
            out = model(ids[:, :-1], ids[:, 1:], doc, mtp_loss_weight=0.3)
        held = psutil.Process().memory_info().rss - before
        print(held, activation_bytes(model_cfg, train, 4, materialized_scores=True))
        """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    held, estimate = (int(x) for x in proc.stdout.split())
    assert held > 100 * 2**20  # the forward really held activations
    assert 0.7 <= estimate / held <= 2.0, f"estimate {estimate} vs held {held}"


def test_small_is_refused_on_this_machine_with_numbers(tmp_path) -> None:
    ram = psutil.virtual_memory().total
    if ram > 600 * GIB:
        pytest.skip("this machine could hold the small recipe")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "jobs/train.py", "--recipe", "small",
                           "--output-dir", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.monotonic() - started < 60
    err = proc.stderr
    assert "not enough memory for this plan" in err and "recipe 'small'" in err
    match = re.search(r"estimated ([\d.]+) GiB per worker at W=1 \(params ([\d.]+), .*\) > "
                      r"([\d.]+) GiB per worker \(([\d.]+) GiB host RAM of this machine\)", err)
    assert match, err
    need, params, have, machine = (float(g) for g in match.groups())
    assert need > have and abs(machine - ram / GIB) < 0.1 and have == machine
    assert params > 50  # ~16B parameters in fp32
    assert "Ray" not in err and "preparing" not in err  # refused before any of that


def test_suggested_world_size_fits_and_the_one_below_does_not() -> None:
    cfg = small()
    budget = MemoryBudget(80 * GIB, 1, "GPU memory", host=False)
    with pytest.raises(ValueError) as exc:
        check_memory(cfg, 1, budget, device_type="cuda")
    message = str(exc.value)
    suggested = int(re.search(r"--workers (\d+) fits", message)[1])
    assert suggested > 1
    assert re.search(r"estimated [\d.]+ GiB per worker at W=1 .* > 80\.0 GiB per worker", message)
    assert check_memory(cfg, suggested, budget, device_type="cuda").total <= 80 * GIB
    with pytest.raises(ValueError):
        check_memory(cfg, suggested - 1, budget, device_type="cuda")


def test_micro_batch_suggestion_when_activations_are_the_problem() -> None:
    cfg = debug()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=8))
    need = check_memory(cfg, 2, MemoryBudget(1 << 50, 1, "x", host=False),
                        device_type="cpu").total
    small_micro = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                     micro_batch_size=1))
    fits_one = check_memory(small_micro, 2, MemoryBudget(1 << 50, 1, "x", host=False),
                            device_type="cpu").total
    budget = MemoryBudget((need + fits_one) // 2, 1, "GPU memory", host=False)
    with pytest.raises(ValueError, match=r"--set train.micro_batch_size=\d fits at W=2"):
        check_memory(cfg, 2, budget, device_type="cpu")


def test_expert_copies_are_counted_as_their_experts_training_state() -> None:
    # small: 64 experts; W=16 with EP 16, 4 copies per rank: the same figure --describe prints
    from elastic_moe.config import apply_overrides
    from elastic_moe.train.redundancy import redundancy_report

    cfg = apply_overrides(small(), ["parallel.max_workers=16", "parallel.dp_replicate_degree=1",
                                    "parallel.expert_parallel_degree=16",
                                    "parallel.expert_replicas=4"])
    plan = plan_mesh(16, 8, cfg.model, cfg.parallel)
    without = estimate_worker_memory(cfg.model, cfg.train, plan, device_type="cuda", host=False)
    with_copies = estimate_worker_memory(cfg.model, cfg.train, plan, device_type="cuda",
                                         host=True, expert_replicas=4)
    assert without.expert_copies == 0
    described = max(r.replica_bytes for r in redundancy_report(cfg, 16).ranks)
    assert with_copies.expert_copies == described > 0
    assert with_copies.staging == without.parameters // 4 * 12  # copies are never staged
    assert "expert copies" in with_copies.describe()
    # no expert parallelism: every rank holds every expert, nothing to copy
    one = plan_mesh(1, 8, cfg.model)
    assert estimate_worker_memory(cfg.model, cfg.train, one, device_type="cuda", host=False,
                                  expert_replicas=4).expert_copies == 0
