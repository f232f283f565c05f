"""Hosts of our own on this one machine: Linux network namespaces, each with its own network
stack and host name, cabled by a veth pair to a switch (a bridge) of a private /24 whose
first address is the database server's.

partition(host) turns the host's port on the switch off (bridge port state `disabled`): the
switch drops every frame from and to that host, both ways, and tells no one. Links stay up,
addresses, routes and neighbours (fixed, so no failed ARP reports an unreachable host) stay
as they were, no socket is closed or reset: each end just stops hearing from the other, a
black hole made by the kernel. heal(host) turns the port back on.

Every name carries this process's id and a random token, so that parallel runs never
collide; what a run killed before its teardown left behind is removed by the next one.
Needs root and iproute2 (`ip netns`); HostsUnavailable says why not.
"""
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from urllib.parse import urlparse, urlunparse

# Namespaces are conveyor-<label>-<token>-<n>; the switch is cv<token>s and host n's port
# on it cv<token>p<n> (15 characters at most). A token is the owner's pid in hex and a
# random byte.
NAMESPACE = re.compile(r"^conveyor-[\w-]+-([0-9a-f]{3,8})-\d+$")
LINK = re.compile(r"^cv([0-9a-f]{3,8})(?:s|p\d+)$")
PORT_OFF, PORT_ON = 0, 3  # bridge port states: disabled, forwarding


class HostsUnavailable(Exception):
    """No network namespaces can be made here (not root, no iproute2, not allowed)."""


@dataclass
class Host:
    name: str  # its host name, which its processes record (an attempt's `host`)
    namespace: str
    address: str
    mac: str
    port: str  # its cable's end on the switch

    def command(self, args):
        """args, run on this host: in its namespace, under its own host name (the `ip netns
        exec`, `unshare` and `sh` each exec the next, so the process is args' own)."""
        return ["ip", "netns", "exec", self.namespace, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.name, *args]


class Hosts:
    """`count` hosts on one switch; destroy() removes them all and returns what is left."""

    def __init__(self, count, label="main"):
        _check_possible()
        sweep()
        self.token = f"{os.getpid():x}{random.randrange(256):02x}"
        self.label = re.sub(r"[^\w-]", "-", label)
        self.switch = f"cv{self.token}s"
        self.subnet = _free_subnet()
        self.server_address = str(self.subnet.network_address + 1)
        self.hosts = []
        try:
            self._build_switch()
            for n in range(count):
                self.hosts.append(self._build_host(n))
        except BaseException:
            self.destroy()
            raise

    def url_for(self, database_url):
        """database_url as the hosts reach it: at the server's address on the switch."""
        parts = urlparse(database_url)
        user = f"{parts.username}@" if parts.username else ""
        port = f":{parts.port}" if parts.port else ""
        return urlunparse(parts._replace(netloc=f"{user}{self.server_address}{port}"))

    def partition(self, host):
        _port_state(host.port, PORT_OFF)

    def heal(self, host):
        _port_state(host.port, PORT_ON)

    def destroy(self):
        """Kill every process left on the hosts, remove them and the switch; returns the
        names of what could not be removed ([] when all is gone)."""
        for n in range(len(self.hosts) + 1):  # a host half built too
            _remove_host(f"conveyor-{self.label}-{self.token}-{n}", f"cv{self.token}p{n}")
        _ip("link", "del", self.switch, check=False)
        return [name for name in [*_namespaces(), *_links()] if self.token in name]

    def _build_switch(self):
        _ip("link", "add", self.switch, "address", _mac(self.token, 0), "type", "bridge")
        _ip("addr", "add", f"{self.server_address}/{self.subnet.prefixlen}", "dev", self.switch)
        _ip("link", "set", self.switch, "up")

    def _build_host(self, n):
        host = Host(name=f"host-{n}", namespace=f"conveyor-{self.label}-{self.token}-{n}",
                    address=str(self.subnet.network_address + 2 + n),
                    mac=_mac(self.token, n + 1), port=f"cv{self.token}p{n}")
        inside = ["-n", host.namespace]
        _ip("netns", "add", host.namespace)
        _ip("link", "add", host.port, "type", "veth", "peer", "name", "eth0",
            "address", host.mac, "netns", host.namespace)
        _ip("link", "set", host.port, "master", self.switch, "up")
        _ip(*inside, "addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip(*inside, "link", "set", "lo", "up")
        _ip(*inside, "link", "set", "eth0", "up")
        # Fixed neighbours: while cut off, frames go out and are lost, as across a real
        # black hole; an ARP lookup would instead fail and report the host unreachable.
        _ip(*inside, "neigh", "replace", self.server_address, "lladdr", _mac(self.token, 0),
            "dev", "eth0", "nud", "permanent")
        _ip("neigh", "replace", host.address, "lladdr", host.mac, "dev", self.switch,
            "nud", "permanent")
        return host


def sweep():
    """Remove the namespaces and links of runs whose process is gone (killed before their
    teardown), with whatever still runs on those hosts."""
    for namespace in _namespaces():
        match = NAMESPACE.match(namespace)
        if match and not _alive(match.group(1)):
            _remove_host(namespace, None)
    for link in _links():
        match = LINK.match(link)
        if match and not _alive(match.group(1)):
            _ip("link", "del", link, check=False)


def _remove_host(namespace, port):
    listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    for pid in listed.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    if port:  # at once: a namespace's own devices go some time after it is deleted
        _ip("link", "del", port, check=False)
    _ip("netns", "del", namespace, check=False)


def _port_state(port, state):
    # `bridge link set`: `ip link set ... type bridge_slave state` is silently ignored.
    subprocess.run(["bridge", "link", "set", "dev", port, "state", str(state)], check=True,
                   capture_output=True, timeout=30)
    shown = subprocess.run(["bridge", "-j", "link", "show", "dev", port], capture_output=True,
                           text=True, check=True).stdout
    wanted = {PORT_OFF: "disabled", PORT_ON: "forwarding"}[state]
    if json.loads(shown)[0].get("state") != wanted:
        raise RuntimeError(f"the switch port {port} is not {wanted}: {shown}")


def _check_possible():
    if os.geteuid() != 0:
        raise HostsUnavailable("network namespaces need root")
    missing = [tool for tool in ("ip", "bridge", "unshare", "hostname")
               if shutil.which(tool) is None]
    if missing:
        raise HostsUnavailable(f"{', '.join(missing)} not found (iproute2, util-linux, hostname)")
    probe = f"conveyor-probe-{os.getpid():x}{random.randrange(256):02x}-0"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        raise HostsUnavailable(f"`ip netns add` failed: {made.stderr.strip()}")
    _ip("netns", "del", probe, check=False)


def _free_subnet():
    """A random /24 of 10.64.0.0/10 that no address or route here overlaps."""
    taken = [ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
             for link in json.loads(_ip("-j", "-4", "addr").stdout or "[]")
             for a in link.get("addr_info", [])]
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        if route.get("dst", "default") != "default":
            taken.append(ipaddress.ip_network(route["dst"], strict=False))
    for _ in range(100):
        subnet = ipaddress.ip_network(
            f"10.{random.randrange(64, 128)}.{random.randrange(256)}.0/24")
        if not any(subnet.overlaps(other) for other in taken):
            return subnet
    raise HostsUnavailable("no free /24 in 10.64.0.0/10")


def _namespaces():
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]


def _links():
    return [link["ifname"] for link in json.loads(_ip("-j", "link").stdout or "[]")]


def _alive(token):
    try:
        os.kill(int(token[:-2], 16), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def _mac(token, n):
    """Locally administered, unicast, unique to the token and n."""
    digits = f"{int(token, 16):08x}"[-8:]
    return ":".join(["02", digits[0:2], digits[2:4], digits[4:6], digits[6:8], f"{n:02x}"])


def _ip(*args, check=True):
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {result.returncode}: "
                           f"{result.stderr.strip()}")
    return result
