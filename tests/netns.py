"""Hosts made on this machine with network namespaces, for tests of a deployment over several machines: a switch (a
bridge in a namespace of its own) and one namespace per host, cabled to it by a veth pair. Addresses live on those
links only, in a private /24 that nothing routes beyond. Root only."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass

PREFIX = "rqmh"  # namespaces rqmh-<pid>-<host>; the test process's own link rqmh<pid>


class NetnsError(RuntimeError):
    pass


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _quiet(*args: str) -> None:
    subprocess.run(["ip", *args], capture_output=True, timeout=30)


def stale(pid: str) -> bool:
    """Whether a name made by a run with this pid is left over: that run's process is gone (or it had our pid)."""
    return pid.isdigit() and (int(pid) == os.getpid() or not os.path.exists(f"/proc/{pid}"))


def remove_stale() -> None:
    """What crashed earlier runs left behind: their namespaces with the processes still in them, and the link each
    gave its test process."""
    for line in ip("netns", "list").splitlines():
        name = line.split(" ", 1)[0]
        parts = name.split("-")
        if len(parts) >= 3 and parts[0] == PREFIX and stale(parts[1]):
            for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _quiet("netns", "del", name)
    for line in ip("-o", "link", "show").splitlines():
        dev = line.split(":", 2)[1].strip().split("@", 1)[0]
        if dev.startswith(PREFIX) and stale(dev[len(PREFIX) :]):
            _quiet("link", "del", "dev", dev)


def free_subnet() -> str:
    """'10.231.N.' for an N that no address or route of this machine's own namespace uses."""
    used = ip("-4", "-o", "addr", "show") + ip("-4", "route", "show", "table", "all")
    for k in range(250):
        octet = (os.getpid() + k) % 250 + 1
        if not re.search(rf"(?<![\d.])10\.231\.{octet}\.", used):
            return f"10.231.{octet}."
    raise NetnsError("no free 10.231.N.0/24")


@dataclass
class Host:
    name: str
    ns: str
    addr: str
    hostname: str

    def argv(self, *cmd: str) -> list[str]:
        """``cmd`` as run on this host: in its network namespace, under its own hostname (a UTS namespace), so a
        worker id (hostname:pid) names the host as it would on a real machine. Each step execs the next: the pid is
        the command's own."""
        script = 'hostname "$0" && exec "$@"'
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "--", "sh", "-c", script, self.hostname, *cmd]

    def can_connect(self, addr: str, port: int, timeout: float = 3.0) -> bool:
        """Whether a TCP connection from this host to addr:port is accepted within ``timeout`` seconds."""
        code = f"import socket; socket.create_connection(({addr!r}, {port}), timeout={timeout}).close()"
        cmd = ["ip", "netns", "exec", self.ns, sys.executable, "-I", "-S", "-c", code]
        return subprocess.run(cmd, capture_output=True, timeout=timeout + 30).returncode == 0


class Network:
    """One switch and the hosts plugged into it. ``close`` removes everything, whatever state it is in."""

    def __init__(self) -> None:
        remove_stale()
        self.tag = f"{PREFIX}-{os.getpid()}"
        self.prefix = free_subnet()
        self.switch = f"{self.tag}-sw"
        self.root_link = f"{PREFIX}{os.getpid()}"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        try:
            self._add_ns(self.switch)
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "dev", "br0", "up")
        except BaseException:
            self.close()
            raise

    def _add_ns(self, name: str) -> None:
        ip("netns", "add", name)
        self._namespaces.append(name)
        ip("-n", name, "link", "set", "dev", "lo", "up")

    def _plug(self, port: str) -> None:
        ip("-n", self.switch, "link", "set", "dev", port, "master", "br0")
        ip("-n", self.switch, "link", "set", "dev", port, "up")

    def add_host(self, name: str, hostname: str) -> Host:
        """A host with one interface, eth0, cabled to the switch port ``port-<name>``."""
        ns = f"{self.tag}-{name}"
        self._add_ns(ns)
        host = Host(name, ns, f"{self.prefix}{len(self.hosts) + 2}", hostname)
        ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"port-{name}", "netns", self.switch)
        self._plug(f"port-{name}")
        ip("-n", ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "dev", "eth0", "up")
        self.hosts[name] = host
        return host

    def attach_test_process(self) -> str:
        """Cable this machine's own namespace to the switch (address .254), so the test process reaches the hosts;
        the only change outside the namespaces: one link and its subnet's route."""
        ip("link", "add", self.root_link, "type", "veth", "peer", "name", "port-root", "netns", self.switch)
        self._plug("port-root")
        addr = f"{self.prefix}254"
        ip("addr", "add", f"{addr}/24", "dev", self.root_link)
        ip("link", "set", "dev", self.root_link, "up")
        return addr

    def cut(self, host: Host) -> None:
        """Pull the host's cable at the switch: its eth0 loses carrier and every packet it sends is lost."""
        ip("-n", self.switch, "link", "set", "dev", f"port-{host.name}", "down")

    def heal(self, host: Host) -> None:
        ip("-n", self.switch, "link", "set", "dev", f"port-{host.name}", "up")

    def close(self) -> None:
        _quiet("link", "del", "dev", self.root_link)  # both ends go, at once (a namespace's devices go lazily)
        for ns in reversed(self._namespaces):
            _quiet("netns", "del", ns)
        self._namespaces.clear()
