"""Load-driven expert replicas (``parallel.expert_replicas``): hot experts held twice.

With expert parallelism spread over nodes, each routed expert lives on one rank of its EP group,
so a lost node loses experts that only a buddy copy or a checkpoint can bring back. Lazarus
(arXiv:2407.04656) replicates experts by load: the hottest experts get extra copies, the
copies share their tokens, and placing the copies in other failure domains makes them survive a
node loss. Here each EP rank holds ``C = parallel.expert_replicas`` copies per MoE layer.

* **Which experts.** The aux-loss-free router bias is the load signal: every step it moves each
  expert's bias by ``-speed * sign(load - mean load)`` (DeepSeek-V3 sec. 2.1.2), so the lowest
  bias marks the expert most often over the mean. It is model state, the same on every rank and
  restored by every path, so every rank plans the same copies with no extra collective.
* **Where** (:func:`plan_replicas`, pure): first one copy of each expert, hottest first, on a
  rank in another failure domain than its owner (so a node loss leaves every expert a live
  copy while there are slots); the slots left go to the hottest experts again, on the ranks
  with the fewest copies. Every rank gets exactly ``C`` copies (capped at ``E - L``).
* **Tokens.** A source rank sends a replicated expert's rows to itself when it holds a copy,
  else to one holder picked by (source + expert) mod holders: the copies share the load.
* **Training.** A copy's gradient is added to its owner's in the owner's EP group
  (:func:`send_replica_grads`, one all-to-all for all layers), the owners are summed over the
  ranks holding the same experts as before, and the total goes back to the copies
  (:func:`return_replica_grads`). Traffic per rank is its C copies' rows, whatever the world
  size. The copies are clipped with the same coefficient and run the owner's AdamW update on
  the same values: on CPU they stay equal bit for bit.
* **Recovery.** :class:`~elastic_moe.train.shard_state.ShardLayout` lists the copies as blocks of
  their owner's tensors (``replica=True``), so the peer-copy plan sees a rank whose experts all
  have copies elsewhere as needing no buddy copy of them, and a restore takes the lost
  experts from the copies. Copies are never copied themselves: every layout plans and fills
  them anew from the owners (:func:`assign_replicas`, collective).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from elastic_moe.model.moe import moe_layers
from elastic_moe.parallel.expert_parallel import (
    MOMENTS,
    ExpertParallelExperts,
    ExpertReplicas,
    expert_parallel_modules,
)
from elastic_moe.parallel.mesh import replica_slots

logger = logging.getLogger(__name__)

def hot_order(bias_E: torch.Tensor) -> list[int]:
    """Experts from the hottest (lowest aux-free bias) to the coldest; ties by expert id."""
    return [int(e) for e in torch.argsort(bias_E.detach().float().cpu(), stable=True)]


def plan_replicas(order: Sequence[int], num_experts: int, ep: int, slots: int,
                  domains: Sequence[str]) -> list[list[int]]:
    """For each EP rank, the experts it holds copies of (:func:`replica_slots` each).

    ``order``: experts hottest first. ``domains``: the failure domain of each EP rank. Pass one
    gives each expert, hottest first, a copy in another domain than its owner's (a bipartite
    matching of experts to slots, so as many experts as the slots allow survive a domain's
    loss); pass two fills the remaining slots with the hottest experts again, on the emptiest
    rank.
    """
    slots = replica_slots(num_experts, ep, slots)
    if slots == 0:
        return [[] for _ in range(max(ep, 1))]
    local = num_experts // ep
    table: list[list[int]] = [[] for _ in range(ep)]

    def holders(e: int) -> list[int]:
        return [e // local] + [p for p in range(ep) if e in table[p]]

    def free(e: int, other_domain: bool) -> list[int]:
        held = holders(e)
        seen = {domains[h] for h in held}
        return [p for p in range(ep) if len(table[p]) < slots and p not in held
                and (not other_domain or domains[p] not in seen)]

    def place_safely(e: int, visited: set[int]) -> bool:
        """Kuhn's augmenting path: a free slot in another domain, or one freed by moving the
        copy that holds it to another rank (so an earlier, hotter expert is never displaced
        without a new place)."""
        owner_domain = domains[e // local]
        ranks = [p for p in range(ep) if domains[p] != owner_domain and p not in visited]
        for p in sorted(ranks, key=lambda p: (len(table[p]), p)):
            visited.add(p)
            if len(table[p]) < slots:
                table[p].append(e)
                return True
            for other in list(table[p]):
                if place_safely(other, visited):
                    table[p].remove(other)
                    table[p].append(e)
                    return True
        return False

    for e in order:  # pass one: one copy per expert in another domain, hottest first
        place_safely(e, set())
    progress = True
    while progress:  # pass two: load, hottest first, round by round
        progress = False
        for e in order:
            candidates = free(e, other_domain=True) or free(e, other_domain=False)
            if candidates:
                table[min(candidates, key=lambda p: (len(table[p]), p))].append(e)
                progress = True
    return table


def slot_of_expert(table: Sequence[Sequence[int]], num_experts: int, ep: int,
                   source: int) -> list[int]:
    """The global slot (``rank * S + local slot``) that ``source`` sends each expert's rows to.

    Rank p's slots are its ``L`` own experts, then its copies in ``table[p]`` order.
    """
    local = num_experts // ep
    width = local + len(table[0])
    out = []
    for e in range(num_experts):
        owner = e // local
        held = [owner] + [p for p in range(ep) if e in table[p]]
        target = source if source in held else held[(source + e) % len(held)]
        index = e % local if target == owner else local + list(table[target]).index(e)
        out.append(target * width + index)
    return out


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _owned_copies(module: ExpertParallelExperts, holder: int) -> list[int]:
    """The experts this rank owns that EP rank ``holder`` holds copies of, in its table order."""
    assert module.replicas is not None
    local = module.num_local_experts
    return [e for e in module.replicas.table[holder] if e // local == module.ep_rank]


def _held_copies(module: ExpertParallelExperts, owner: int) -> list[tuple[int, int]]:
    """(slot, expert) of this rank's copies whose owner is EP rank ``owner``."""
    assert module.replicas is not None
    local = module.num_local_experts
    return [(j, e) for j, e in enumerate(module.replicas.table[module.ep_rank])
            if e // local == owner]


def _move_rows(modules: list[ExpertParallelExperts],
               owner_rows: Callable[[ExpertParallelExperts, int], list[torch.Tensor]],
               copy_rows: Callable[[ExpertParallelExperts, int], list[torch.Tensor]], *,
               to_copies: bool) -> None:
    """One ``all_to_all_single`` in the EP group between owners and the holders of their
    copies, for all layers. ``owner_rows(module, expert)`` and ``copy_rows(module, slot)`` give
    the matching rows (views, in the same order) on either side. ``to_copies``: the owners'
    rows are written into the copies; otherwise the copies' rows are added into the owners'."""
    ep = modules[0].ep_degree
    send: list[list[torch.Tensor]] = [[] for _ in range(ep)]
    into: list[list[torch.Tensor]] = [[] for _ in range(ep)]
    for module in modules:
        for peer in range(ep):
            owned = [t for e in _owned_copies(module, peer) for t in owner_rows(module, e)]
            held = [t for j, _ in _held_copies(module, peer) for t in copy_rows(module, j)]
            send[peer] += owned if to_copies else held
            into[peer] += held if to_copies else owned
    like = _local(modules[0].w13)
    parts = [t.reshape(-1) for rows in send for t in rows]
    flat = torch.cat(parts) if parts else like.new_zeros(0)
    recv_numel = [sum(t.numel() for t in rows) for rows in into]
    out = like.new_empty(sum(recv_numel))
    dist.all_to_all_single(out, flat, recv_numel,
                           [sum(t.numel() for t in rows) for rows in send],
                           group=modules[0].ep_group)
    for rows, received in zip(into, out.split(recv_numel), strict=True):
        offset = 0
        for row in rows:
            chunk = received[offset:offset + row.numel()].view_as(row)
            if to_copies:
                row.copy_(chunk)
            else:
                row.add_(chunk)
            offset += row.numel()


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> int:
    for index, group in enumerate(optimizer.param_groups):
        if any(p is param for p in group["params"]):
            return index
    raise ValueError("the expert weights are not in the optimizer")


@torch.no_grad()
def assign_replicas(model: nn.Module, optimizer: torch.optim.Optimizer, slots: int,
                    domains: Sequence[str]) -> int:
    """Plan this layout's copies from the router biases and fill them from their owners'
    weights and Adam state (collective: one all-to-all in each EP group). ``domains``:
    every rank's failure domain; the optimizer must have its state (zeros before the first
    step). Returns the copies per rank and layer (0: none; EP over one rank needs none)."""
    pairs = [(layer.gate, layer.experts) for layer in moe_layers(model)
             if isinstance(layer.experts, ExpertParallelExperts)]
    for _, module in pairs:
        module.replicas = None
    if slots <= 0 or not pairs:
        return 0
    if pairs[0][1].ep_degree == 1:
        logger.info("parallel.expert_replicas=%d: no copies at ep=1 (every rank holds every "
                    "expert)", slots)
        return 0
    ep = pairs[0][1].ep_degree
    domains = list(domains)[:ep]  # the first EP group's; every EP group is laid out alike
    modules = []
    for gate, module in pairs:
        table = plan_replicas(hot_order(gate.e_score_correction_bias), module.num_experts, ep,
                              slots, domains)
        group_index = _group_of(optimizer, module.w13)
        hyper = {k: v for k, v in optimizer.param_groups[group_index].items() if k != "params"}
        if hyper.get("amsgrad") or hyper.get("maximize"):
            raise ValueError("parallel.expert_replicas: the copies follow plain AdamW updates "
                             "(no amsgrad, no maximize)")
        own = table[module.ep_rank]
        w13_CHD = _local(module.w13).new_empty((len(own), *_local(module.w13).shape[1:]))
        w2_CDI = _local(module.w2).new_empty((len(own), *_local(module.w2).shape[1:]))
        copies = torch.optim.AdamW([{**hyper, "params": [w13_CHD, w2_CDI], "foreach": False}])
        step = optimizer.state[module.w13]["step"]
        for copy in (w13_CHD, w2_CDI):
            copies.state[copy] = {"step": step.detach().clone(),
                                  **{m: torch.empty_like(copy) for m in MOMENTS}}
        module.replicas = ExpertReplicas(
            table=table,
            slot_of_expert_E=torch.tensor(slot_of_expert(table, module.num_experts, ep,
                                                         module.ep_rank), device=w13_CHD.device),
            w13_CHD=w13_CHD, w2_CDI=w2_CDI, optimizer=copies, group_index=group_index)
        modules.append(module)
    # each owner sends its rows (weights and both moments) to the holders of its copies, in
    # its own EP group (every EP group's owners hold the same values)
    def owner_rows(module: ExpertParallelExperts, expert: int) -> list[torch.Tensor]:
        local = module.num_local_experts
        return [_local(t)[expert % local] for param in (module.w13, module.w2)
                for t in (param, optimizer.state[param]["exp_avg"],
                          optimizer.state[param]["exp_avg_sq"])]

    def copy_rows(module: ExpertParallelExperts, slot: int) -> list[torch.Tensor]:
        assert module.replicas is not None
        state = module.replicas.optimizer.state
        return [t[slot] for copy in (module.replicas.w13_CHD, module.replicas.w2_CDI)
                for t in (copy, state[copy]["exp_avg"], state[copy]["exp_avg_sq"])]

    _move_rows(modules, owner_rows, copy_rows, to_copies=True)
    for module in modules:
        assert module.replicas is not None
        module.replicas.w13_CHD.requires_grad_(True)
        module.replicas.w2_CDI.requires_grad_(True)
    first = modules[0].replicas
    assert first is not None
    logger.debug("expert replicas: %d per rank and layer; layer 0 table %s", first.num_slots,
                 first.table)
    return first.num_slots


def replica_modules(model: nn.Module) -> list[ExpertParallelExperts]:
    return [m for m in expert_parallel_modules(model)
            if m.replicas is not None and m.replicas.num_slots]


def replica_state_bytes(model: nn.Module) -> int:
    """The copies' training state on this rank: weights, gradients and two Adam moments (what
    ``--describe`` counts as expert replicas)."""
    total = 0
    for module in replica_modules(model):
        assert module.replicas is not None
        for copy in (module.replicas.w13_CHD, module.replicas.w2_CDI):
            total += 4 * copy.numel() * copy.element_size()
    return total


def replica_grads(model: nn.Module) -> list[torch.Tensor]:
    """The copies' gradients (to scale with the clip coefficient; not counted in the norm)."""
    out = []
    for module in replica_modules(model):
        assert module.replicas is not None
        out += [t.grad for t in (module.replicas.w13_CHD, module.replicas.w2_CDI)
                if t.grad is not None]
    return out


def _owner_grad_rows(module: ExpertParallelExperts, expert: int) -> list[torch.Tensor]:
    local = module.num_local_experts
    out = []
    for param in (module.w13, module.w2):
        assert param.grad is not None
        out.append(_local(param.grad)[expert % local])
    return out


def _copy_grad_rows(module: ExpertParallelExperts, slot: int) -> list[torch.Tensor]:
    assert module.replicas is not None
    out = []
    for copy in (module.replicas.w13_CHD, module.replicas.w2_CDI):
        assert copy.grad is not None
        out.append(copy.grad[slot])
    return out


@torch.no_grad()
def send_replica_grads(model: nn.Module) -> None:
    """Add each copy's gradient into its owner's, in the owner's EP group (one all-to-all for
    all layers). Call before
    :func:`~elastic_moe.parallel.expert_parallel.reduce_expert_grads`, which then sums the
    owners over the ranks holding the same experts: every contribution counted once."""
    modules = replica_modules(model)
    if not modules:
        return
    for module in modules:
        assert module.replicas is not None
        for param, copy in ((module.w13, module.replicas.w13_CHD),
                            (module.w2, module.replicas.w2_CDI)):
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            if copy.grad is None:
                copy.grad = torch.zeros_like(copy)
    with torch.profiler.record_function("ep/replica_grads"):
        _move_rows(modules, _owner_grad_rows, _copy_grad_rows, to_copies=False)


@torch.no_grad()
def return_replica_grads(model: nn.Module) -> None:
    """Give every copy its owner's total gradient (one all-to-all for all layers). Call after
    :func:`~elastic_moe.parallel.expert_parallel.reduce_expert_grads`: owners and copies then
    hold the same bits."""
    modules = replica_modules(model)
    if modules:
        with torch.profiler.record_function("ep/replica_grads"):
            _move_rows(modules, _owner_grad_rows, _copy_grad_rows, to_copies=True)


def step_replicas(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The owners' AdamW update on every copy (after ``optimizer.step()``; local)."""
    for module in replica_modules(model):
        replicas = module.replicas
        assert replicas is not None
        for group in replicas.optimizer.param_groups:
            group["lr"] = optimizer.param_groups[replicas.group_index]["lr"]
        replicas.optimizer.step()
        replicas.optimizer.zero_grad(set_to_none=True)


def drop_replica_grads(model: nn.Module) -> None:
    """A step that is not applied: the copies' gradients go with the owners'."""
    for module in replica_modules(model):
        assert module.replicas is not None
        module.replicas.optimizer.zero_grad(set_to_none=True)
