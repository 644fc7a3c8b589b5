"""Which network interface the process groups (gloo, NCCL) of a worker bind to.

Left alone, gloo binds to and advertises whatever the hostname resolves to: 127.0.0.1 on many
machines, 127.0.1.1 on a stock Debian/Ubuntu ``/etc/hosts``, a NIC other nodes cannot reach on a
multi-homed one. A peer on another host then connects to its own loopback and the first
rendezvous fails (``Gloo connectFullMesh failed ... remote=[127.0.0.1]``). NCCL's bootstrap picks
an interface by its own rules, which need not be the one the nodes share either.

So every worker binds both to one interface, chosen per node: the interface that holds the
address Ray uses for the node (``ray.util.get_node_ip_address()``, what ``ray start
--node-ip-address`` sets), or the one the user names in ``elastic.network_interface``. Both
libraries take it from the environment when a group is created (``GLOO_SOCKET_IFNAME``,
``NCCL_SOCKET_IFNAME``), so :func:`bind_process_groups` runs before ``init_process_group``. A
named interface that a node does not have is a configuration error
(:class:`NetworkInterfaceError`): retrying cannot fix it.

The rendezvous store of each membership epoch (:func:`rendezvous_store`) listens on the hosting
rank's address only: torch's own ``tcp://`` rendezvous starts its store server on every
interface, and that store takes writes from anyone who reaches the port.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["Binding", "NetworkInterfaceError", "bind_process_groups", "choose_binding",
           "interface_addresses", "listen", "rendezvous_store"]

BIND_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


class NetworkInterfaceError(ValueError):
    """The interface to bind the process groups to is not on this node (a setting to fix, not
    a lost peer)."""


@dataclass(frozen=True, slots=True)
class Binding:
    """Where this node's process groups listen and connect from."""

    interface: str
    address: str  # the interface's address (the node's Ray address when it has that one)
    named: bool  # elastic.network_interface named it (else: the interface of the Ray address)

    def describe(self) -> str:
        how = "elastic.network_interface" if self.named else "the node's Ray address"
        return f"{self.address} (interface {self.interface}, from {how})"


def interface_addresses() -> dict[str, list[str]]:
    """Every interface of this node with its IPv4 and IPv6 addresses (IPv4 first)."""
    import psutil

    found: dict[str, list[str]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        v4 = [a.address for a in addrs if a.family == socket.AF_INET]
        v6 = [a.address.split("%", 1)[0] for a in addrs if a.family == socket.AF_INET6]
        found[name] = v4 + v6
    return found


def _describe(interfaces: dict[str, list[str]]) -> str:
    return ", ".join(f"{name} ({' '.join(addrs) or 'no address'})"
                     for name, addrs in sorted(interfaces.items()))


def choose_binding(node_ip: str, interface: str = "", node: str = "",
                   interfaces: dict[str, list[str]] | None = None) -> Binding:
    """The interface this node's process groups bind to: ``interface`` when given (it must
    exist here and have an address), else the one holding ``node_ip`` (the node's Ray address).
    ``node`` names the node in errors; ``interfaces`` defaults to this node's."""
    have = interface_addresses() if interfaces is None else interfaces
    where = f"node {node} ({node_ip})" if node else f"node {node_ip}"
    if interface:
        addrs = have.get(interface)
        if addrs is None:
            raise NetworkInterfaceError(
                f"elastic.network_interface={interface!r}: {where} has no interface "
                f"{interface!r}; it has {_describe(have)}")
        if not addrs:
            raise NetworkInterfaceError(
                f"elastic.network_interface={interface!r}: on {where} the interface has no IP "
                f"address; interfaces there: {_describe(have)}")
        return Binding(interface, node_ip if node_ip in addrs else addrs[0], named=True)
    for name, addrs in sorted(have.items()):
        if node_ip in addrs:
            return Binding(name, node_ip, named=False)
    raise NetworkInterfaceError(
        f"{where}: no interface holds the node's Ray address {node_ip}, so the process groups "
        f"cannot bind to it; set elastic.network_interface to one of {_describe(have)}")


def bind_process_groups(binding: Binding) -> dict[str, str]:
    """Make the process groups created from now on in this process bind to ``binding``'s
    interface; returns the variables it changed. A different value set from outside is
    replaced (and logged): ``elastic.network_interface`` is the one setting for it."""
    changed = {}
    for name in BIND_ENV:
        if os.environ.get(name) != binding.interface:
            if name in os.environ:
                logger.warning("%s=%s replaced by %s (elastic.network_interface decides)",
                               name, os.environ[name], binding.interface)
            os.environ[name] = binding.interface
            changed[name] = binding.interface
    return changed


def listen(host: str, port: int = 0) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: a free port) and listening: the rendezvous
    store's server socket, opened ahead of the store (:func:`rendezvous_store`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


def rendezvous_store(host: str, port: int, *, is_master: bool, world_size: int,
                     timeout: datetime.timedelta, listening: socket.socket | None = None
                     ) -> Any:
    """The store a membership epoch's process groups rendezvous through, at ``host:port``.

    The rank hosting it (``is_master``) binds the listening socket to ``host`` itself and hands
    it to the store (``master_listen_fd``, libuv backend): the server then listens there only,
    not on every interface. The others connect as clients.

    ``listening``: the master's socket, already listening on ``port`` (:func:`listen`). Open it
    before the others are told the port: a client that finds nothing listening yet backs off
    for about half a second before it tries again, while one that finds the socket waits in
    its backlog until the store serves it (measured: 0.5-0.6 s against 5 ms to a formed group).
    """
    import torch.distributed as dist

    if not is_master:
        return dist.TCPStore(host, port, world_size, False, timeout)
    sock = listening if listening is not None else listen(host, port)
    # the store owns the descriptor from here on
    return dist.TCPStore(host, port, world_size, True, timeout, wait_for_workers=False,
                         master_listen_fd=sock.detach(), use_libuv=True)
