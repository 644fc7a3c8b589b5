"""Filling a layout from blocks that overlap: owners' expert blocks and one-expert copies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from elastic_moe.train.shard_state import ShardSet, ShardSpec, fill_from_shards, needed_sources


class _Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4, 3))


FULL = torch.arange(12, dtype=torch.float32).view(4, 3)


def _source(rank: int, rows: range, replica: bool = False) -> ShardSet:
    spec = ShardSpec("model/w", "float32", (len(rows), 3), (4, 3), (rows.start, 0),
                     replica=replica)
    return ShardSet(rank=rank, step=1, specs=[spec], tensors=[FULL[rows.start:rows.stop].clone()])


def test_owner_blocks_are_preferred_to_copies():
    # a copy of row 2 comes first by index; the owners' two blocks cover everything
    sources = [_source(0, range(2, 3), replica=True), _source(1, range(0, 2)),
               _source(2, range(2, 4))]
    model = _Experts()
    assert needed_sources(model, None, [s.manifest() for s in sources]) == [1, 2]


def test_copies_fill_what_a_lost_owner_held():
    # the owner of rows 2-3 is lost; copies of rows 2 and 3 (one of them twice) cover it
    sources = [_source(1, range(0, 2)), _source(3, range(3, 4), replica=True),
               _source(4, range(2, 3), replica=True), _source(5, range(3, 4), replica=True)]
    model = _Experts()
    wanted = needed_sources(model, None, [s.manifest() for s in sources])
    assert wanted == [0, 1, 2]
    fill_from_shards(model, None, [sources[i] for i in wanted])
    assert torch.equal(model.w.detach(), FULL)


def test_a_row_no_block_holds_is_named():
    sources = [_source(1, range(0, 2)), _source(3, range(3, 4), replica=True)]
    model = _Experts()
    with pytest.raises(ValueError, match=r"model/w \(3 of 12 elements"):
        fill_from_shards(model, None, sources)
