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
