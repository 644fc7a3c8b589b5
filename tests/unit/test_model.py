import dataclasses

import torch

from elastic_moe.config import debug
from elastic_moe.model import Transformer


def _model(**changes):
    cfg = dataclasses.replace(debug().model, **changes)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    return model


def test_gradients_reach_every_parameter():
    model = _model(seq_aux_alpha=1e-2)
    tokens = torch.randint(0, model.cfg.vocab_size, (4, 65), generator=torch.Generator().manual_seed(0))
    out = model(tokens[:, :-1], tokens[:, 1:])
    assert out.mtp_loss.item() > 0 and out.balance_loss.item() != 0
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_document_mask_equals_separate_documents():
    model = _model().eval()
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, model.cfg.vocab_size, (1, 20), generator=gen)
    b = torch.randint(0, model.cfg.vocab_size, (1, 12), generator=gen)
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 20 + [1] * 12])
    with torch.no_grad():
        logits = model(packed, doc_ids_BS=doc_ids)
        alone_a = model(a)
        # doc b sits at positions 20..31: relative RoPE makes its attention match running it alone
        alone_b = model(b)
        unmasked = model(packed)
    assert torch.allclose(logits[:, :20], alone_a, atol=1e-5)
    assert torch.allclose(logits[:, 20:], alone_b, atol=1e-4)
    assert not torch.allclose(unmasked[:, 20:], alone_b, atol=1e-3)


def test_meta_build_then_init_matches_eager_build():
    eager = _model()
    with torch.device("meta"):
        lazy = Transformer(eager.cfg)
    lazy = lazy.to_empty(device="cpu")
    lazy.init_weights(seed=0)
    for (name, a), b in zip(eager.state_dict().items(), lazy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_mtp_can_be_dropped_for_inference():
    model = _model()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        with_mtp = model(tokens)
        del model.mtp
        model.mtp = torch.nn.ModuleList()
        assert torch.equal(model(tokens), with_mtp)


def _raise_in_last_layer(model):
    def boom(module, args):
        raise RuntimeError("a peer's collective failed")

    return model.layers[-1].register_forward_pre_hook(boom)


def test_a_forward_that_raises_leaves_no_balance_loss_on_the_layers():
    """The MoE layers before the failure computed their balance losses; none may stay on a
    module (with the step's autograd graph) once the forward has raised, nor after a forward
    that returned its loss."""
    from elastic_moe.model.moe import MoE

    model = _model(seq_aux_alpha=1e-2)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moes) >= 2
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    out = model(tokens[:, :-1], tokens[:, 1:])
    assert out.balance_loss.item() != 0  # taken in by the loss
    assert all(m.balance_loss is None for m in moes)
    handle = _raise_in_last_layer(model)
    try:
        model(tokens[:, :-1], tokens[:, 1:])
    except RuntimeError:
        pass
    else:
        raise AssertionError("the planted failure did not raise")
    handle.remove()
    assert all(m.balance_loss is None for m in moes)
