"""A non-loopback interface for WebRTC tests on one machine: a veth pair into a network namespace.

libwebrtc (inside the ``livekit`` SDK) gathers no candidates on loopback interfaces, so a client and a
server on one machine need an interface that is not loopback and has an address. A test makes one: a
veth pair whose far end lives in a fresh network namespace (a veth has carrier only while both ends
are up), with a random /30 out of 198.18.0.0/15, the range reserved for network tests. The near end's
address (``address``) is local to this namespace, so a server bound to it is reachable from every
process here (stage processes included, which also keeps them on the test's NATS) and libwebrtc
offers it as a host candidate. IPv6 is off on the pair (no tentative link-local addresses to trip
over). Everything is removed afterwards, and what a killed test run left behind is removed the next
time. Needs root (CAP_NET_ADMIN), as in the dev container and CI.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RANGE = ipaddress.ip_network("198.18.0.0/15")


#: Namespaces made here are named ``vb-lk-<pid>-<tag>``: the pid tells which are left over.
PREFIX = "vb-lk-"


class NetnsUnavailable(RuntimeError):
    """This machine cannot create network namespaces (no ``ip`` tool, or not root)."""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _remove_stale() -> None:
    """Remove the namespaces (so their veth pairs) of test processes killed before they cleaned up."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    for match in re.finditer(rf"^({re.escape(PREFIX)}(\d+)-\w+)", listed, flags=re.MULTILINE):
        if not Path(f"/proc/{match.group(2)}").exists():
            subprocess.run(["ip", "netns", "del", match.group(1)], capture_output=True, timeout=10)


def _disable_ipv6(interface: str, namespace: str = "") -> None:
    command = ["sysctl", "-q", "-w", f"net.ipv6.conf.{interface}.disable_ipv6=1"]
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    if Path("/proc/sys/net/ipv6").exists():
        subprocess.run([*prefix, *command], capture_output=True, timeout=10)


@contextmanager
def veth_address() -> Iterator[str]:
    """An IPv4 address of a fresh non-loopback interface in this namespace, for the ``with`` block."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        raise NetnsUnavailable("a veth pair needs the ip tool and root")
    _remove_stale()
    tag = uuid.uuid4().hex[:6]
    namespace, near, far = f"{PREFIX}{os.getpid()}-{tag}", f"vblk{tag}n", f"vblk{tag}f"
    base = int(RANGE.network_address) + 4 * random.randrange(RANGE.num_addresses // 4)
    address, peer = str(ipaddress.ip_address(base + 1)), str(ipaddress.ip_address(base + 2))
    try:
        _ip("netns", "add", namespace)
    except subprocess.CalledProcessError as e:
        raise NetnsUnavailable(f"ip netns add failed: {e.stderr.decode().strip()}") from None
    try:
        _ip("link", "add", near, "type", "veth", "peer", "name", far, "netns", namespace)
        _disable_ipv6(near)
        _disable_ipv6(far, namespace)
        _ip("addr", "add", f"{address}/30", "dev", near)
        _ip("-n", namespace, "addr", "add", f"{peer}/30", "dev", far)
        _ip("-n", namespace, "link", "set", far, "up")
        _ip("link", "set", near, "up")
        yield address
    finally:
        subprocess.run(["ip", "link", "del", near], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)
