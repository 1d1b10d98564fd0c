"""Which address Ray binds on this node, by the profile's interface policy."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Iface:
    name: str
    ip: str
    netmask: str

    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.ip}/{self.netmask}", strict=False)


def short_hostname() -> str:
    """This node's name as Slurm lists it (without the domain)."""
    return socket.gethostname().split(".")[0]


def ipv4_interfaces() -> list[Iface]:
    stats = psutil.net_if_stats()
    out = []
    for name, addrs in psutil.net_if_addrs().items():
        if name == "lo" or (name in stats and not stats[name].isup):
            continue
        for a in addrs:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                out.append(Iface(name, a.address, a.netmask or "255.255.255.255"))
    return sorted(out, key=lambda i: i.name)


def choose(policy: list[str], interfaces: list[Iface], head_ip: str | None = None) -> Iface:
    """Pick the interface: named ones in order, or 'auto' = InfiniBand (ib*) first, then the
    interface on the head's subnet, then the first one. Raises LookupError with what exists."""
    by_name = {i.name: i for i in interfaces}
    for wanted in policy:
        if wanted == "auto":
            ib = [i for i in interfaces if i.name.startswith("ib")]
            if head_ip:
                head = ipaddress.IPv4Address(head_ip)
                same = [i for i in ib + interfaces if head in i.network()]
                if same:
                    return same[0]
            if ib:
                return ib[0]
            if interfaces:
                return interfaces[0]
        elif wanted in by_name:
            return by_name[wanted]
    have = ", ".join(f"{i.name}={i.ip}" for i in interfaces) or "none"
    raise LookupError(f"no interface matches {','.join(policy)} (this node has: {have})")
