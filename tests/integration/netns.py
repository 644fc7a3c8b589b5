"""Two network hosts on one machine: a network namespace behind a veth pair, a Ray node on each side.

``ray.cluster_utils.Cluster`` starts every node in one network namespace, so any address works
between them, the loopback one included. Here the second node lives in a namespace of its own,
reached only over a veth pair, as a second machine is reached over its NIC:

    host (Ray head)  198.18.N.1/24  <-- veth -->  198.18.N.2/24  namespace (Ray worker node)

Addresses come from 198.18.0.0/15 (RFC 2544, reserved for network tests); N is the first /24
no interface of this machine uses (1 unless another such test runs). The namespace gets its own
``/etc/hosts`` (``ip netns exec`` mounts ``/etc/netns/NAME/hosts`` over it) that resolves the
hostname to 127.0.0.1, as this machine's does and as a stock Debian/Ubuntu one resolves it to
127.0.1.1: a process group that binds to what the hostname resolves to advertises an address no
other host can reach.

:meth:`VethNamespace.cut` / :meth:`VethNamespace.heal` take the link down and up (a partition);
``tc netem`` is not available in every kernel this runs on (gVisor has none).

Only pids started here are ever signalled: each Ray node has its own ``--temp-dir``, and its
processes are the ones whose command line names it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil

from tests.integration.multiproc import free_port

TEST_NET = "198.18"  # 198.18.0.0/15: benchmarking / network tests (RFC 2544)
BIN = os.path.dirname(sys.executable)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root (ip netns add)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    probe = f"emoe-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> int:
    used = {addr.address for addrs in psutil.net_if_addrs().values() for addr in addrs}
    for n in range(1, 255):
        if not any(a.startswith(f"{TEST_NET}.{n}.") for a in used):
            return n
    raise RuntimeError(f"every {TEST_NET}.N.0/24 is in use on this machine")


@dataclass
class VethNamespace:
    """A network namespace joined to the host by one veth pair."""

    name: str
    host_if: str  # the host's end
    ns_if: str  # the namespace's end
    host_ip: str
    ns_ip: str
    prefix: int = 24
    _hosts_dir: str = ""

    @classmethod
    def create(cls) -> VethNamespace:
        tag = f"{os.getpid() % 100000}{int(time.time() * 1000) % 1000:03d}"
        # one at a time on this machine (`make test` runs tests in two processes): a subnet is
        # free until the host's end has its address
        with open(os.path.join(tempfile.gettempdir(), "emoe-netns.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            subnet = _free_subnet()
            link = cls(name=f"emoe-{tag}", host_if=f"emh{tag}", ns_if=f"emn{tag}",
                       host_ip=f"{TEST_NET}.{subnet}.1", ns_ip=f"{TEST_NET}.{subnet}.2")
            try:
                link._setup()
            except BaseException:
                link.remove()
                raise
        return link

    def _setup(self) -> None:
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/{self.prefix}", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        self.run("ip", "addr", "add", f"{self.ns_ip}/{self.prefix}", "dev", self.ns_if)
        self.run("ip", "link", "set", self.ns_if, "up")
        self.run("ip", "link", "set", "lo", "up")
        # the hostname resolves to loopback inside the namespace, whatever the host's file says
        self._hosts_dir = f"/etc/netns/{self.name}"
        os.makedirs(self._hosts_dir, exist_ok=True)
        with open(os.path.join(self._hosts_dir, "hosts"), "w") as f:
            f.write(f"127.0.0.1 localhost\n127.0.0.1 {socket.gethostname()}\n")

    def argv(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*argv), capture_output=True, text=True, check=True,
                              timeout=60)

    def holds(self, pid: int) -> bool:
        """Whether process ``pid`` lives in this namespace."""
        try:
            return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(
                f"/run/netns/{self.name}").st_ino
        except OSError:
            return False

    def cut(self) -> None:
        """Partition: nothing passes between the host and the namespace until :meth:`heal`."""
        _ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_if, "up")

    def remove(self) -> None:
        _ip("link", "del", self.host_if, check=False)  # takes its peer with it
        _ip("netns", "del", self.name, check=False)
        if self._hosts_dir:
            shutil.rmtree(self._hosts_dir, ignore_errors=True)




@dataclass
class RayNode:
    """One ``ray start`` (head or worker), its temp dir, and how to stop only its processes."""

    temp_dir: str
    ip: str
    proc: subprocess.CompletedProcess | None = None
    address: str = ""  # the head's GCS address

    def pids(self) -> list[int]:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = proc.info.get("cmdline") or []
            if any(self.temp_dir in part for part in cmdline):
                found.append(proc.info["pid"])
        return found

    def stop(self) -> None:
        for _ in range(3):  # a raylet may start a worker while the first ones go
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def worker_logs(self) -> list[str]:
        """Paths of the Ray worker processes' stdout/stderr files of this node."""
        logs = os.path.join(self.temp_dir, "session_latest", "logs")
        if not os.path.isdir(logs):
            return []
        return [os.path.join(logs, name) for name in sorted(os.listdir(logs))
                if name.startswith("worker-") and name.endswith((".out", ".err"))]


@dataclass
class TwoHostCluster:
    """A Ray head on the host and a worker node in ``link``'s namespace, one CPU slot each."""

    link: VethNamespace
    head: RayNode
    worker: RayNode
    env: dict[str, str] = field(default_factory=dict)  # for drivers: token auth, PYTHONPATH

    @property
    def address(self) -> str:
        return self.head.address


def write_auth_token(path: str) -> str:
    """A fresh random Ray auth token written to ``path`` (mode 0600, as Ray wants it); returns
    the token."""
    token = os.urandom(32).hex()
    with open(path, "w") as f:
        f.write(token)
    os.chmod(path, 0o600)
    return token


def _ray_env(root: str, token_file: str, home: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=token_file, HOME=home,
               # the nodes' workers import elastic_moe from this checkout (no working dir shipped)
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    return env


def _ray_start(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@contextmanager
def two_host_cluster(root: str, *, head_resources: dict[str, float] | None = None,
                     worker_resources: dict[str, float] | None = None,
                     num_cpus: int = 1,
                     head_env: dict[str, str] | None = None) -> Iterator[TwoHostCluster]:
    """A Ray head bound to the host's veth address and a worker node inside the namespace, both
    with ``num_cpus`` CPU slots; everything is stopped and removed on exit, on failures too.
    ``head_env``: extra environment of the head's ``ray start`` (Ray's ``RAY_<setting>``
    overrides, e.g. its node health check)."""
    link = VethNamespace.create()
    base = tempfile.mkdtemp(prefix="emoe-net-", dir="/tmp")  # short: Ray's socket paths
    head = RayNode(temp_dir=os.path.join(base, "h"), ip=link.host_ip)
    worker = RayNode(temp_dir=os.path.join(base, "w"), ip=link.ns_ip)
    try:
        token_file = os.path.join(base, "auth_token")
        write_auth_token(token_file)
        os.makedirs(os.path.join(base, "home"))
        env = _ray_env(root, token_file, os.path.join(base, "home"))
        port = free_port(link.host_ip)
        head.address = f"{link.host_ip}:{port}"
        head.proc = _ray_start([
            os.path.join(BIN, "ray"), "start", "--head", f"--node-ip-address={link.host_ip}",
            f"--port={port}", f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(head_resources or {})}", "--include-dashboard=false",
            f"--dashboard-agent-listen-port={free_port(link.host_ip)}",
            f"--object-manager-port={free_port(link.host_ip)}",
            "--disable-usage-stats", f"--temp-dir={head.temp_dir}"], {**env, **(head_env or {})})
        # The namespace has a port space of its own: Ray's default ports are free in it
        worker.proc = _ray_start(link.argv(
            os.path.join(BIN, "ray"), "start", f"--address={head.address}",
            f"--node-ip-address={link.ns_ip}", f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(worker_resources or {})}", "--disable-usage-stats",
            f"--temp-dir={worker.temp_dir}"), env)
        yield TwoHostCluster(link=link, head=head, worker=worker, env=env)
    finally:
        worker.stop()
        head.stop()
        link.remove()
        shutil.rmtree(base, ignore_errors=True)


def tcp_sockets(pid: int) -> list[tuple[str, tuple[str, int], tuple[str, int]]]:
    """(state, local, remote) of process ``pid``'s IPv4 TCP sockets, read from ``/proc/PID``
    (its own network namespace's table: psutil reads the caller's)."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    states = {"0A": "LISTEN", "01": "ESTABLISHED"}
    found = []
    with open(f"/proc/{pid}/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[9] not in inodes:
                continue
            found.append((states.get(parts[3], parts[3]), _addr(parts[1]), _addr(parts[2])))
    return found


def _addr(hex_addr: str) -> tuple[str, int]:
    ip, port = hex_addr.split(":")
    return socket.inet_ntoa(bytes.fromhex(ip)[::-1]), int(port, 16)
