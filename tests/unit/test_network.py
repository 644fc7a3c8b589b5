"""Which interface the process groups bind to (elastic_moe.parallel.network)."""

from __future__ import annotations

import socket

import pytest

from elastic_moe.config import ElasticConfig
from elastic_moe.parallel.network import (
    NetworkInterfaceError,
    bind_process_groups,
    choose_binding,
    interface_addresses,
)

# a multi-homed node: Ray on the management NIC, a fast NIC for training
NODE = {"lo": ["127.0.0.1", "::1"], "eth0": ["10.0.0.5"], "ens5": ["192.168.8.5", "fe80::1"],
        "docker0": []}


def test_the_interface_of_the_ray_address_by_default():
    binding = choose_binding("10.0.0.5", interfaces=NODE)
    assert (binding.interface, binding.address, binding.named) == ("eth0", "10.0.0.5", False)
    assert "10.0.0.5 (interface eth0, from the node's Ray address)" == binding.describe()


def test_a_named_interface_wins_and_binds_its_own_address():
    binding = choose_binding("10.0.0.5", "ens5", interfaces=NODE)
    assert (binding.interface, binding.address, binding.named) == ("ens5", "192.168.8.5", True)


def test_a_missing_interface_names_the_node_and_what_it_has():
    with pytest.raises(NetworkInterfaceError) as err:
        choose_binding("10.0.0.5", "ib0", node="abc123", interfaces=NODE)
    text = str(err.value)
    assert "elastic.network_interface='ib0'" in text
    assert "node abc123 (10.0.0.5) has no interface 'ib0'" in text
    assert "eth0 (10.0.0.5)" in text and "lo (127.0.0.1 ::1)" in text
    with pytest.raises(NetworkInterfaceError, match="has no IP address"):
        choose_binding("10.0.0.5", "docker0", interfaces=NODE)


def test_a_ray_address_on_no_interface_asks_for_the_setting():
    with pytest.raises(NetworkInterfaceError, match="set elastic.network_interface"):
        choose_binding("203.0.113.9", interfaces=NODE)


def test_this_machines_loopback_is_found():
    assert choose_binding("127.0.0.1", interfaces=interface_addresses()).address == "127.0.0.1"


def test_binding_sets_gloo_and_nccl(monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth9")
    # set, then deleted: monkeypatch restores only what it changed, and a delenv of an absent
    # variable changes nothing, so the value set below would outlive the test (it did, and
    # the Ray nodes of later tests in the same process inherited GLOO_SOCKET_IFNAME=eth0)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "unset-below")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    changed = bind_process_groups(choose_binding("10.0.0.5", interfaces=NODE))
    assert changed == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}
    assert bind_process_groups(choose_binding("10.0.0.5", interfaces=NODE)) == {}


@pytest.mark.parametrize("name", ["eth0,eth1", "eth 0", "a" * 16, "eth/0"])
def test_config_rejects_what_is_not_one_interface_name(name):
    with pytest.raises(ValueError, match="network_interface="):
        ElasticConfig(network_interface=name)
    assert ElasticConfig(network_interface="ens5").network_interface == "ens5"


def test_the_rendezvous_store_listens_on_its_host_only():
    """torch's tcp:// rendezvous listens on every interface; ours on the hosting rank's
    address alone, and ranks still meet through it."""
    import datetime
    import os

    import psutil

    from elastic_moe.parallel.network import rendezvous_store

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    timeout = datetime.timedelta(seconds=10)
    master = rendezvous_store("127.0.0.1", port, is_master=True, world_size=2, timeout=timeout)
    client = rendezvous_store("127.0.0.1", port, is_master=False, world_size=2, timeout=timeout)
    client.set("planted", "by the client")
    assert master.get("planted") == b"by the client"
    listening = [c.laddr for c in psutil.Process(os.getpid()).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


def test_a_client_that_comes_first_meets_the_store_through_the_opened_socket() -> None:
    """The master opens its socket before anyone knows the port (``listen``); a client that
    connects before the store exists waits in the backlog, and both meet through the store,
    which listens on that socket alone."""
    import datetime
    import os
    import threading

    import psutil

    from elastic_moe.parallel.network import listen, rendezvous_store

    sock = listen("127.0.0.1")
    port = sock.getsockname()[1]
    timeout = datetime.timedelta(seconds=10)
    clients: list = []
    thread = threading.Thread(target=lambda: clients.append(rendezvous_store(
        "127.0.0.1", port, is_master=False, world_size=2, timeout=timeout)))
    thread.start()  # before the store: it connects into the backlog
    master = rendezvous_store("127.0.0.1", port, is_master=True, world_size=2, timeout=timeout,
                              listening=sock)
    thread.join(timeout=20)
    assert clients, "the client never reached the store"
    clients[0].set("planted", "by the client")
    assert master.get("planted") == b"by the client"
    listening = [c.laddr for c in psutil.Process(os.getpid()).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert len(listening) == 1 and listening[0].ip == "127.0.0.1", listening
