"""Launcher options: which Ray address is used, --connect-timeout's bounds, and
--wait-for-capacity reaching the config."""

from __future__ import annotations

import argparse

import pytest
from elastic_moe.actors.cluster import LaunchError, bundles_that_fit, check_address, requested_address
from elastic_moe.jobs.train import build_config


def test_requested_address_explicit_then_env_else_embedded(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert requested_address() is None
    assert requested_address("10.0.0.5:6379") == "10.0.0.5:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    assert requested_address() == "10.0.0.7:6379"
    assert requested_address("10.0.0.5:6379") == "10.0.0.5:6379"
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert requested_address() is None


def test_malformed_address_is_rejected_with_the_expected_form() -> None:
    with pytest.raises(LaunchError, match="expected host:port"):
        check_address("my-head-node", timeout_s=0)


def test_bundles_that_fit_a_node() -> None:
    assert bundles_that_fit({"CPU": 3.0, "GPU": 8.0}, {"GPU": 1.0}) == 8
    assert bundles_that_fit({"CPU": 3.0}, {"GPU": 1.0}) == 0
    assert bundles_that_fit({"CPU": 2.5, "GPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}) == 2


def test_wait_for_capacity_flag_sets_the_config() -> None:
    args = argparse.Namespace(recipe="debug", set=None, steps=None, data=None, val_data=None,
                              init_from=None, workers="2:4", wait_for_capacity=42.0)
    cfg = build_config(args)
    assert cfg.elastic.capacity_wait_s == 42.0
    assert (cfg.parallel.min_workers, cfg.parallel.max_workers) == (2, 4)
    with pytest.raises(ValueError, match="capacity_wait_s"):
        build_config(argparse.Namespace(**{**vars(args), "wait_for_capacity": -1.0}))


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf"])
def test_connect_timeout_must_be_positive(value, capsys) -> None:
    from elastic_moe.jobs.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--connect-timeout", value, "--steps", "1"])
    assert exc.value.code == 2
    assert f"--connect-timeout {value}: must be a number of seconds more than 0" in \
        capsys.readouterr().err


def test_connect_timeout_help_names_the_default_the_launcher_uses(capsys) -> None:
    """The help text writes the default as a literal (importing it would import ray for
    --help): it must stay the value the launcher falls back to."""
    from elastic_moe.actors.cluster import DEFAULT_CONNECT_TIMEOUT_S
    from elastic_moe.jobs.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert f"(default {DEFAULT_CONNECT_TIMEOUT_S:g};" in help_text, help_text
