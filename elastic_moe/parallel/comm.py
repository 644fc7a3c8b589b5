"""Process groups that survive the loss of a peer: NCCL settings and an abort from outside.

On gloo a dead peer's closed socket fails every pending collective at once. On NCCL it does not:
the survivors' kernels keep spinning on the lost peer's buffers, and the default error handling
(``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``) lets the watchdog end the *survivor's* process at the
collective timeout. An elastic group needs the opposite: the survivors stay up, and their blocked
collectives return as soon as the group knows a member is gone. So

- :func:`survivor_nccl_env` sets ProcessGroupNCCL's error handling to clean-up-only (abort the
  communicators, raise in the waiting thread, keep the process) and turns off the heartbeat
  monitor that kills a process whose watchdog looks stuck. It must run before the first process
  group is created: ProcessGroupNCCL reads these variables when it is built.
- :func:`abort_communicators` aborts every process group of this process from any thread. The
  thread blocked in a collective (or in a CUDA sync after one) then raises; that thread, not this
  one, destroys the groups (``destroy_process_group`` changes torch's global group registry,
  which must not change under a thread that is using it).

Gloo's groups are not aborted by :func:`abort_communicators`: the call finds no NCCL
communicator and returns 0, and the collective fails when the lost peer's connection closes, as
before. The same code path (the group's abort request, the worker's epoch check, this function)
runs on both backends.

A rank whose *own* step raised is the other case: it is alive, so nothing closes its connections,
and its peers wait in their next collective until the timeout. Torch's gloo backend has no abort
that closes connections (``abort()`` and ``destroy_process_group`` leave the sockets open while
anything still refers to the group; only process exit closes them). :class:`GlooLinks` finds the
TCP connections this process's gloo groups opened and shuts them down, which is what a peer sees
when the process exits ("Connection closed by peer"), without ending the process.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["SURVIVOR_NCCL_ENV", "GlooLinks", "abort_communicators", "init_world_group",
           "process_group_backend", "survivor_nccl_env"]

SURVIVOR_NCCL_ENV = {
    # 2 = CleanUpOnly: on a timeout or error the watchdog aborts the communicators and the work
    # raises in the waiting thread; the process stays (3, the default, tears it down).
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
    # the heartbeat monitor ends a process whose watchdog stops beating, e.g. while a lost peer
    # holds a collective: exactly the survivor we want to keep
    "TORCH_NCCL_ENABLE_MONITORING": "0",
    # no flight-recorder dump on timeout: it can take minutes on a large job, inside the pause
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
}


def process_group_backend(device: torch.device) -> str:
    """The backend string for ``init_process_group`` on ``device``. On CUDA the step still
    reduces a few CPU tensors (the commit vote, metric sums, max over ranks), which an NCCL-only
    group refuses: gloo carries those, NCCL the CUDA tensors."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_world_group(device: torch.device, *, store: Any, rank: int, world_size: int,
                     timeout: Any) -> None:
    """``dist.init_process_group`` for ``device``'s backend, under the name every peer gives
    its own.

    Torch names a default group after a per-process counter of the groups made since the last
    default group was destroyed, and the ranks' rendezvous keys carry that name. An
    ``init_process_group`` that raised (a peer lost inside the rendezvous; a warm-up whose
    network interface this node lacks) has already counted its group and destroys nothing, so
    this process's next group would be named "1" while a fresh peer's is "0": each would wait
    for keys the other never writes, until the timeout. With no default group alive the
    counter starts again at 0, as a destroyed default group leaves it."""
    from torch.distributed import distributed_c10d

    if not dist.is_initialized():
        distributed_c10d._world.group_count = 0
    dist.init_process_group(process_group_backend(device), store=store, rank=rank,
                            world_size=world_size, timeout=timeout)


def survivor_nccl_env() -> dict[str, str]:
    """Set the NCCL error-handling variables a surviving rank needs; returns what it changed.

    A value the user set differently is overridden (and logged): with teardown on, one lost peer
    would take every survivor with it, which the elastic group cannot recover from."""
    changed = {}
    for name, value in SURVIVOR_NCCL_ENV.items():
        if os.environ.get(name) != value:
            if name in os.environ:
                logger.warning("%s=%s would end surviving ranks after a peer is lost; using %s",
                               name, os.environ[name], value)
            os.environ[name] = value
            changed[name] = value
    return changed


def abort_communicators() -> int:
    """Abort the NCCL communicators of every process group of this process; callable from any
    thread. Returns how many were aborted (0 on gloo, or when no group exists).

    Only the communicators are aborted: torch's registry of groups is left for the thread that
    owns them to destroy once its collective has raised. Gloo groups are left alone: a lost
    peer's closed connection already fails their collectives, and aborting a gloo group while
    that failure is on its way can leave the waiting receive to run into its full timeout
    (seen here: 16 s more for a survivor of a fenced, stopped peer)."""
    if not dist.is_available() or not dist.is_initialized() or not torch.cuda.is_available() \
            or not dist.is_nccl_available():
        return 0
    from torch.distributed import ProcessGroupNCCL
    from torch.distributed.distributed_c10d import _world

    backends = []
    for group, _name in sorted(_world.pg_names.items(), key=lambda item: item[1], reverse=True):
        try:
            backend = group._get_backend(torch.device("cuda"))
        except RuntimeError:  # a group without a CUDA backend (gloo only)
            continue
        if isinstance(backend, ProcessGroupNCCL):
            backends.append(backend)
    if not backends:
        return 0
    # Abort them inside one NCCL group call: one at a time can deadlock (pytorch/pytorch#119797).
    backends[0]._group_start()
    aborted = 0
    try:
        for backend in backends:
            try:
                backend.abort()
                aborted += 1
            except Exception as exc:  # one communicator already gone must not stop the others
                logger.warning("aborting an NCCL communicator: %s", exc)
    finally:
        backends[0]._group_end()
    return aborted


def _socket_inodes() -> dict[int, str]:
    """This process's socket file descriptors and their inodes (``socket:[N]``)."""
    sockets = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed since the listing
            continue
        if target.startswith("socket:"):
            sockets[int(name)] = target
    return sockets


def _endpoints(fd: int) -> tuple[bool, tuple[str, int], tuple[str, int] | None] | None:
    """(listening, local, remote) of a TCP socket fd; None for any other kind of socket."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) \
                or sock.type != socket.SOCK_STREAM:
            return None
        listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        local = sock.getsockname()[:2]
        try:
            remote = sock.getpeername()[:2]
        except OSError:  # not connected
            remote = None
        return listening, local, remote
    finally:
        sock.close()  # the duplicate only: the socket itself stays open


def _shut_down_fd(fd: int) -> int:
    """Shut down the socket behind ``fd`` in both directions (through a duplicate, so the fd
    itself stays its owner's to close); 1 if it was shut down, 0 if it was already gone."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return 0
    try:
        sock.shutdown(socket.SHUT_RDWR)
        return 1
    except OSError:  # already disconnected
        return 0
    finally:
        sock.close()


class GlooLinks:
    """The TCP connections of the gloo process groups this process opens between
    :meth:`opening` and :meth:`collect`, so that :meth:`shut_down` can close them.

    Gloo's pairs are found by their endpoints, not by when they were opened (Ray opens sockets
    of its own at any time): every rank publishes the ports its gloo groups listen on, and a
    pair is a connection that was accepted on one of this rank's listeners or that reaches
    another rank's. The listeners themselves are left open (gloo's accept loop ends the process
    when its listener fails), and so is the rendezvous store's connection (``store_port``).
    """

    def __init__(self) -> None:
        self._before: set[str] = set()
        self._links: dict[int, str] = {}  # fd -> inode, checked again before a shutdown

    def opening(self) -> None:
        """Call right before the process groups are created."""
        self._before = set(_socket_inodes().values())
        self._links = {}

    def collect(self, store_port: int) -> int:
        """Call once every group of the layout exists, on every rank (one all-gather over the
        default group). Returns how many connections were found."""
        fresh = {fd: inode for fd, inode in _socket_inodes().items() if inode not in self._before}
        found = {fd: _endpoints(fd) for fd in fresh}
        ends = {fd: e for fd, e in found.items() if e is not None}
        own = [local for listening, local, _ in ends.values()
               if listening and local[1] != store_port]
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, own)
        listeners = {tuple(addr) for addrs in everyone for addr in addrs}
        # a listener on every interface is reached at one of them: match it by its port
        wildcard = {port for host, port in listeners if host in ("0.0.0.0", "::")}
        own_ports = {port for _, port in own}
        self._links = {}
        for fd, (listening, local, remote) in ends.items():
            if listening or remote is None or store_port in (local[1], remote[1]):
                continue
            if local[1] in own_ports or tuple(remote) in listeners or remote[1] in wildcard:
                self._links[fd] = fresh[fd]
        return len(self._links)

    def shut_down_rendezvous(self, store_port: int) -> int:
        """Shut down this process's connections to the rendezvous store on ``store_port``
        opened since :meth:`opening` (from any thread): a join blocked waiting in the store for
        a member that died fails now instead of at the timeout. Returns how many."""
        closed = 0
        for fd, inode in _socket_inodes().items():
            if inode in self._before:
                continue
            ends = _endpoints(fd)
            if ends is None or ends[0] or ends[2] is None or ends[2][1] != store_port:
                continue
            closed += _shut_down_fd(fd)
        return closed

    def shut_down(self) -> int:
        """Shut down every connection found (both directions), from any thread: the peers'
        pending and next collectives fail at once, and so do this rank's. Returns how many
        were shut down."""
        current = _socket_inodes()
        closed = 0
        for fd, inode in self._links.items():
            if current.get(fd) != inode:  # gloo closed it (and the number may be reused)
                continue
            closed += _shut_down_fd(fd)
        self._links = {}
        return closed
