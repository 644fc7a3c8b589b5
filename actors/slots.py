"""The run's worker slots: one one-bundle placement group per worker (or warm spare).

Named and detached, so that they outlive the coordinator's process like the workers placed in
them; their names are in the coordinator's record, and a restarted coordinator finds them again
(:meth:`Slots.find`). A slot whose node died is replaced by a fresh one (:meth:`Slots.replace_lost`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

logger = logging.getLogger(__name__)


class Slots:
    """The slots of run ``run_name``; ``on_change(names)`` records their names (the
    coordinator's record) whenever they change."""

    def __init__(self, run_name: str, bundle: dict[str, float],
                 on_change: Callable[[list[str]], None]) -> None:
        self.run_name, self.bundle, self.on_change = run_name, bundle, on_change
        self.groups: list[PlacementGroup] = []
        self.names: list[str] = []

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> PlacementGroup:
        return self.groups[index]

    def open(self, count: int) -> None:
        """``count`` fresh slots; an autoscaling cluster is asked for all of them."""
        from ray.autoscaler.sdk import request_resources

        try:  # a no-op on a fixed cluster
            request_resources(bundles=[dict(self.bundle)] * count)
        except Exception as exc:
            logger.debug("request_resources: %s", exc)
        for _ in range(count):
            self._add()
        self.on_change(self.names)

    def find(self, names: list[str]) -> None:
        """The slots of a coordinator that died, by name; one removed meanwhile (with its node)
        is replaced by a fresh one."""
        for name in names:
            try:
                group = ray.util.get_placement_group(name)
            except ValueError:
                self._add()
                continue
            self.groups.append(group)
            self.names.append(name)
        self.on_change(self.names)

    def _add(self, index: int | None = None) -> None:
        name = f"{self.run_name}-slot-{uuid.uuid4().hex[:8]}"
        group = placement_group([dict(self.bundle)], name=name, lifetime="detached")
        if index is None:
            self.groups.append(group)
            self.names.append(name)
        else:
            self.groups[index], self.names[index] = group, name

    def states(self) -> dict[int, str] | None:
        """Each slot's placement state from the GCS (CREATED = placed), or None if it is busy."""
        try:
            table = placement_group_table()
        except Exception as exc:  # the GCS is busy or restarting: the next check tries again
            logger.debug("placement_group_table: %s", exc)
            return None
        return {i: table.get(g.id.hex(), {}).get("state", "") for i, g in enumerate(self.groups)}

    def replace_lost(self) -> None:
        """Give up slots whose node died and open fresh ones in their place.

        A one-bundle slot whose node dies waits to be placed again (state RESCHEDULING); while
        it waits, Ray 2.60's GCS spins a whole core (and so does the head's dashboard agent),
        which on a small head node starves the survivors. A fresh placement group waits for
        capacity (PENDING) without that cost, and is placed as soon as a node has room.
        """
        replaced = False
        for i, state in (self.states() or {}).items():
            if state != "RESCHEDULING":
                continue
            logger.info("slot %d lost its node: replacing it with a fresh placement group", i)
            try:
                remove_placement_group(self.groups[i])
            except Exception as exc:
                logger.debug("remove_placement_group: %s", exc)
            self._add(i)
            replaced = True
        if replaced:
            self.on_change(self.names)

    def ready(self, timeout: float = 0.0) -> list[int]:
        """Slots placed now (waiting up to ``timeout`` for all of them).

        Read from the GCS's table, not from ``pg.ready()``: each ``ready()`` is a fresh
        asynchronous request, so a zero-timeout wait on it can miss a slot placed long ago.
        """
        deadline = time.time() + timeout
        while True:
            states = self.states() or {}
            ready = sorted(i for i, state in states.items() if state == "CREATED")
            if len(ready) == len(self.groups) or time.time() >= deadline:
                return ready
            time.sleep(0.05)

    def remove_all(self) -> None:
        for group in self.groups:
            try:
                remove_placement_group(group)
            except Exception as exc:
                logger.debug("remove_placement_group: %s", exc)
