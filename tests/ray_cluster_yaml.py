"""What ray_cluster.yaml tells each node to run: the environment and flags of every `ray start`."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from typing import Any

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_YAML = os.path.join(ROOT, "ray_cluster.yaml")


@dataclass(frozen=True)
class RayStart:
    env: dict[str, str]  # variables the command exports before `ray start`
    args: list[str]  # the words after `ray start`


def load_cluster_yaml() -> dict[str, Any]:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def ray_starts(config: dict[str, Any], key: str) -> list[RayStart]:
    """Every `ray start` in ``config[key]`` (a list of shell lines) with what is exported before it."""
    starts = []
    for line in config[key]:
        env: dict[str, str] = {}
        for part in line.split(";"):
            words = shlex.split(part)
            if words[:1] == ["export"]:
                env.update(word.split("=", 1) for word in words[1:])
            elif words[:2] == ["ray", "start"]:
                starts.append(RayStart(dict(env), words[2:]))
    return starts


def flag_value(args: list[str], flag: str) -> str | None:
    for arg in args:
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None
