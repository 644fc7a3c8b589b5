"""In-memory copies that follow every step: a rank's buddy keeps what has no replica, and applies
the rank's optimizer updates to it.

Recovery sources after a lost worker, in order (docs/elastic.md, "Redundancy"): the survivors'
live state; **replicas** -- identical blocks held in another failure domain (HSDP replicas of the
dense shards, the ``W / ep`` replicas of each expert shard); the **buddy's copy** of the blocks
that have no such replica; the last committed DCP checkpoint. The failure domain is the node, or
the rank when every rank shares one node.

A copy stays current without a second version by *update forwarding* (the buddy plays the
ward's optimizer, as ZeRO-Offload plays the GPU's on the host):

* :meth:`PeerCopies.link`, once per membership epoch (collective): the ranks gather their block
  specs and agree on the plan (:func:`plan_copies`). Each rank sends the blocks that need a copy
  to its buddy once.
* Every step, once the gradients are final (reduced and clipped) and *before the commit vote*,
  each rank sends its copied parameters' gradients to its buddy and waits for its wards'
  (:meth:`PeerCopies.forward_grads`). When the vote applies the step, the buddy runs the same
  AdamW update on each ward's copy (:meth:`PeerCopies.apply`): the same hyper-parameters, the
  same learning rate, the same elementwise arithmetic, so on CPU the copy equals the ward's own
  state bit for bit.

So a copy is always at the committed step of the live state around it, and a failure at any
moment of a step finds every copy complete: no rank keeps a snapshot of itself, no copy is kept
twice, and no step is redone because a copy was in flight. Memory held for a ward: its copied
parameters and Adam moments plus one gradient buffer, 16 bytes per copied parameter, which is
the ward's own training state (fp32 weight, gradient, two moments) for the copied blocks. Per
step, 4 bytes per copied parameter travel (the state itself travels once per epoch).

One window is left: a rank lost *inside* the vote's all-reduce can leave some survivors past
the step and others before it. There is then no common step, and the group restores the last
committed checkpoint (decided by :func:`elastic_moe.train.elastic.decide_restore`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from elastic_moe.train.elastic import CopyPlan, WardCopy
from elastic_moe.train.shard_state import (
    ShardLayout,
    ShardSet,
    ShardSpec,
    flat_sizes,
    unflatten,
)

logger = logging.getLogger(__name__)

# the Adam moments a copy carries beside each parameter (the step count is the same on every
# rank, so it is replicated and never copied)
MOMENTS = ("exp_avg", "exp_avg_sq")


def failure_domains(node_of_rank: Sequence[str]) -> list[str]:
    """The unit a single fault takes out: the node, or the rank when all ranks share a node."""
    if len(set(node_of_rank)) > 1:
        return list(node_of_rank)
    return [f"rank{r}" for r in range(len(node_of_rank))]


def buddies(node_of_rank: Sequence[str]) -> list[int | None]:
    """Every rank's buddy, the rank that keeps its copy: the rank at the same position on the
    next node (in order of first appearance), so that every rank keeps one ward when nodes are
    equal in size; the next rank when all share one node; ``None`` for a group of one. Linear
    in the world size (a 2048-rank layout is planned on every rank)."""
    world = len(node_of_rank)
    if world < 2:
        return [None] * world
    members: dict[str, list[int]] = {}
    for r, node in enumerate(node_of_rank):
        members.setdefault(node, []).append(r)
    if len(members) == 1:
        return [(r + 1) % world for r in range(world)]
    nodes = list(members)
    following = {n: members[nodes[(i + 1) % len(nodes)]] for i, n in enumerate(nodes)}
    out: list[int | None] = []
    position: dict[str, int] = {}
    for node in node_of_rank:
        at = position[node] = position.get(node, -1) + 1
        out.append(following[node][at % len(following[node])])
    return out


def _block_id(spec: ShardSpec) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    return spec.key, spec.offset, spec.shape


def plan_copies(specs_of_rank: Sequence[Sequence[ShardSpec]], node_of_rank: Sequence[str]
                ) -> list[CopyPlan]:
    """For every rank, which of its blocks its buddy must copy: those that blocks in other
    failure domains do not cover. A block is covered by an identical block (same tensor, offset
    and shape: HSDP and expert-replicate replicas) or by expert replicas that together hold all
    its rows (each row's holders are then one ``replicated_on`` tuple). Replica blocks are never
    copied: every layout refills them from their owners. Pure; every rank computes the same plan
    from the gathered specs."""
    domains = failure_domains(node_of_rank)
    holders: dict[tuple, list[int]] = {}
    rows: dict[str, dict[tuple, list[int]]] = {}  # key -> replica block id -> holders
    for rank, specs in enumerate(specs_of_rank):
        for spec in specs:
            holders.setdefault(_block_id(spec), []).append(rank)
            if spec.replica:
                rows.setdefault(spec.key, {}).setdefault(_block_id(spec), []).append(rank)
    plans = []
    for rank, specs in enumerate(specs_of_rank):
        copied: list[int] = []
        replicated: set[tuple[int, ...]] = set()
        for index, spec in enumerate(specs):
            if spec.numel == 0 or spec.replica:
                continue
            elsewhere = tuple(h for h in holders[_block_id(spec)] if domains[h] != domains[rank])
            if elsewhere:
                replicated.add(elsewhere)
                continue
            pieces = _covering_replicas(spec, rows.get(spec.key, {}), domains, domains[rank])
            if pieces is None:
                copied.append(index)
            else:
                replicated.update(pieces)
        plans.append(CopyPlan(copied=tuple(copied), replicated_on=tuple(sorted(replicated))))
    return plans


def _covering_replicas(spec: ShardSpec, replicas: dict[tuple, list[int]],
                       domains: Sequence[str], own_domain: str) -> list[tuple[int, ...]] | None:
    """The holders (outside ``own_domain``) of each replica block inside ``spec``, when those
    blocks cover it; None when they do not."""
    pieces: list[tuple[int, ...]] = []
    covered = 0
    for (_, offset, shape), ranks in replicas.items():
        inside = all(o >= s_o and o + n <= s_o + s_n for o, n, s_o, s_n
                     in zip(offset, shape, spec.offset, spec.shape, strict=True))
        elsewhere = tuple(h for h in ranks if domains[h] != own_domain)
        if inside and elsewhere:
            pieces.append(elsewhere)
            covered += math.prod(shape)
    # replica blocks of one key are distinct rows (one expert each), so counting suffices
    return pieces if pieces and covered == spec.numel else None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _param_of(key: str, param_names: set[str]) -> tuple[str, str]:
    """``model/<fqn>`` -> (fqn, ""), ``optim/<fqn>/<moment>`` -> (fqn, moment); a copied block
    that is neither (a buffer without a replica) cannot follow the updates."""
    kind, _, rest = key.partition("/")
    if kind == "model" and rest in param_names:
        return rest, ""
    if kind == "optim":
        fqn, _, name = rest.rpartition("/")
        if fqn in param_names and name in MOMENTS:
            return fqn, name
    raise ValueError(f"{key}: this block has no replica in another failure domain and is not a "
                     f"parameter or an Adam moment, so a peer copy cannot follow its updates")


class _Ward:
    """One ward's copy and the optimizer that keeps it current."""

    def __init__(self, rank: int, specs: list[ShardSpec], plan: CopyPlan, step: int,
                 meta: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
                 ) -> None:
        self.rank, self.plan = rank, plan
        flat = {dtype: torch.empty(n, dtype=dtype) for dtype, n in flat_sizes(specs).items()}
        self.copy = ShardSet(rank=rank, step=step, specs=specs, tensors=unflatten(flat, specs),
                             meta=dict(meta), flat=flat)
        names = {n for n, _ in model.named_parameters()}
        own_params = dict(model.named_parameters())
        group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        blocks: dict[str, dict[str, torch.Tensor]] = {}
        param_specs: list[ShardSpec] = []
        for spec, tensor in zip(specs, self.copy.tensors, strict=True):
            fqn, moment = _param_of(spec.key, names)
            blocks.setdefault(fqn, {})[moment] = tensor
            if not moment:
                param_specs.append(spec)
        grad_flat = {dtype: torch.empty(n, dtype=dtype)
                     for dtype, n in flat_sizes(param_specs).items()}
        self.grads = unflatten(grad_flat, param_specs)
        self.grad_flat = grad_flat
        self.mask = torch.zeros(len(param_specs), dtype=torch.uint8)
        self.params: list[torch.Tensor] = []
        fqns: list[str] = []  # aligned with self.params
        by_group: dict[int, list[torch.Tensor]] = {}
        steps: dict[int, torch.Tensor] = {}
        for spec in param_specs:
            fqn = spec.key.removeprefix("model/")
            parts = blocks[fqn]
            missing = [m for m in MOMENTS if m not in parts]
            if missing:
                raise ValueError(f"{spec.key}: copied without its Adam moments {missing} (they "
                                 "must share the parameter's layout)")
            param = parts[""]
            self.params.append(param)
            fqns.append(fqn)
            own = own_params[fqn]
            by_group.setdefault(group_of[id(own)], []).append(param)
            # the step count is the same on every rank: the keeper's own is the ward's
            steps[id(param)] = optimizer.state[own]["step"].detach().clone()
        self.live_groups: list[int] = sorted(by_group)
        self.optimizer: torch.optim.Optimizer | None = None
        if self.params:
            groups = [{**{k: v for k, v in optimizer.param_groups[i].items() if k != "params"},
                       "params": by_group[i]} for i in self.live_groups]
            if not isinstance(optimizer, torch.optim.AdamW):
                raise ValueError(f"peer copies follow AdamW updates; the optimizer is "
                                 f"{type(optimizer).__name__}")
            self.optimizer = torch.optim.AdamW(groups)
            for param, fqn in zip(self.params, fqns, strict=True):
                self.optimizer.state[param] = {"step": steps[id(param)],
                                               **{m: blocks[fqn][m] for m in MOMENTS}}

    def nbytes(self) -> int:
        return self.copy.nbytes() + sum(t.numel() * t.element_size()
                                        for t in self.grad_flat.values())

    def apply(self, live: torch.optim.Optimizer, step: int, meta: dict[str, Any],
              update: bool) -> None:
        """The ward's committed step: its update from the gradients it forwarded (``update``:
        the vote applied it; a skipped step changes nothing but the counters)."""
        if update and self.optimizer is not None:
            for shadow, index in zip(self.optimizer.param_groups, self.live_groups, strict=True):
                shadow["lr"] = live.param_groups[index]["lr"]
            for param, grad, present in zip(self.params, self.grads, self.mask.tolist(),
                                            strict=True):
                param.grad = grad if present else None
            self.optimizer.step()
            for param in self.params:
                param.grad = None
        self.copy.step, self.copy.meta = step, dict(meta)


class PeerCopies:
    """One rank's side of the peer copies for one layout: what it forwards to its buddy and
    the copies it keeps for its wards (the ranks whose buddy it is)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.buddy: int | None = None
        self.wards: dict[int, _Ward] = {}
        self.sent: list[torch.nn.Parameter] = []  # own parameters whose gradients go out
        self.enabled = False
        self.plans: list[CopyPlan] = []  # every rank's, for the layout linked last

    def link(self, model: nn.Module, optimizer: torch.optim.Optimizer, layout: ShardLayout, *,
             node_of_rank: Sequence[str], step: int, meta: dict[str, Any],
             enabled: bool = True, group: dist.ProcessGroup | None = None) -> None:
        """Agree on the copy plan for this layout and send the buddy the first copy
        (collective). ``enabled=False``: no copies (a lost worker then means the checkpoint)."""
        self.wards, self.sent, self.buddy, self.plans = {}, [], None, []
        self.enabled = enabled and dist.is_initialized() and self.world_size > 1
        if not self.enabled:
            return
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, layout.specs, group=group)
        plans = self.plans = plan_copies(gathered, node_of_rank)
        keeper = buddies(node_of_rank)
        self.buddy = keeper[self.rank]
        names = {n for n, _ in model.named_parameters()}
        params = dict(model.named_parameters())
        mine = plans[self.rank]
        for index in mine.copied:
            fqn, moment = _param_of(layout.specs[index].key, names)
            if not moment:
                self.sent.append(params[fqn])
        for ward in range(self.world_size):
            if ward != self.rank and keeper[ward] == self.rank:
                specs = [gathered[ward][i] for i in plans[ward].copied]
                self.wards[ward] = _Ward(ward, specs, plans[ward], step, meta, model, optimizer)
        ops = []
        if self.buddy is not None:
            for index in mine.copied:
                ops.append(dist.P2POp(dist.isend, layout.locals[index].contiguous(), self.buddy,
                                      group=group))
        for keeping in self.wards.values():
            for tensor in keeping.copy.tensors:
                ops.append(dist.P2POp(dist.irecv, tensor, keeping.rank, group=group))
        _run(ops)
        logger.debug("rank %d: buddy %s copies %d of %d blocks; wards %s", self.rank, self.buddy,
                     len(mine.copied), len(layout.specs), sorted(self.wards))

    def forward_grads(self, group: dist.ProcessGroup | None = None) -> None:
        """Send this step's gradients of the copied parameters to the buddy and receive the
        wards'; returns once all have arrived (call it before the commit vote)."""
        if not self.enabled:
            return
        ops = []
        if self.buddy is not None and self.sent:
            mask = torch.tensor([p.grad is not None for p in self.sent], dtype=torch.uint8)
            ops.append(dist.P2POp(dist.isend, mask, self.buddy, group=group))
            for param in self.sent:
                grad = (_local(param.grad).contiguous() if param.grad is not None
                        else torch.zeros_like(_local(param.data)))
                ops.append(dist.P2POp(dist.isend, grad, self.buddy, group=group))
        for ward in self.wards.values():
            if ward.params:
                ops.append(dist.P2POp(dist.irecv, ward.mask, ward.rank, group=group))
                ops.extend(dist.P2POp(dist.irecv, g, ward.rank, group=group)
                           for g in ward.grads)
        _run(ops)

    def apply(self, live: torch.optim.Optimizer, step: int, meta: dict[str, Any], *,
              update: bool = True) -> None:
        """After a committed step (local): every ward's copy follows it. ``update=False``: the
        vote skipped the step (non-finite), so only the step and data position move."""
        for ward in self.wards.values():
            ward.apply(live, step, meta, update)

    def holdings(self) -> dict[int, WardCopy]:
        return {r: WardCopy(step=w.copy.step, replicated_on=w.plan.replicated_on,
                            nbytes=w.nbytes()) for r, w in self.wards.items()}

    def find(self, rank: int, step: int) -> ShardSet | None:
        ward = self.wards.get(rank)
        return ward.copy if ward is not None and ward.copy.step == step else None

    def nbytes(self) -> int:
        """Host memory held for the wards: their copies and gradient buffers."""
        return sum(w.nbytes() for w in self.wards.values())

    def nbytes_by_kind(self) -> dict[str, int]:
        """The wards' copies by kind of block: routed ``experts`` or ``dense``."""
        out = {"dense": 0, "experts": 0}
        for ward in self.wards.values():
            for spec, tensor in zip(ward.copy.specs, ward.copy.tensors, strict=True):
                kind = "experts" if ".experts." in spec.key else "dense"
                out[kind] += tensor.numel() * tensor.element_size()
        return out

    def bytes_per_step(self) -> int:
        """What this rank sends its buddy every step (its copied parameters' gradients)."""
        return sum(_local(p.data).numel() * _local(p.data).element_size() for p in self.sent)


def _run(ops: list[Any]) -> None:
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()
