"""Run a function on W local processes joined in a real gloo process group."""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, never one this process was handed before: the kernel can
    give a closed probe's port to the next probe, and a test that asks for a head's ports one
    by one must not get the same one twice."""
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def launch(fn, world_size: int, *args) -> None:
    """``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; raises if any fails."""
    port = free_port()
    mp.spawn(_entry, args=(fn, world_size, port, *args), nprocs=world_size, join=True)


def _entry(rank: int, fn, world_size: int, port: int, *args) -> None:
    faulthandler.enable()  # a native crash prints every thread's Python stack
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()
    # Done and checked: leave without interpreter finalisation. One CI run saw a rank end with
    # SIGSEGV here (not reproduced in 6 reruns); gloo's threads alive during static destructors
    # at exit are a known source of such crashes, and they would fail a test that had passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
