"""What the tests that make network namespaces share (tests/test_tree_netns.py, tests/sshhost.py):
running ``ip``, turning IPv6 off on what they make, and the networks this machine already uses
(a test's subnet must overlap none of them)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from pathlib import Path


def run(*cmd: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def ip(*args: str) -> str:
    """``ip ARGS``' output; RuntimeError, with its stderr, when it fails."""
    p = run("ip", *args)
    if p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} -> {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def no_ipv6(ns: str | None, ifname: str) -> None:
    """IPv6 off, so that nothing (router solicitations, MLD) is sent but what the test sends."""
    path = f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"
    if ns is None:
        if os.path.exists(path):
            Path(path).write_text("1\n")
    else:
        run("ip", "netns", "exec", ns, "sh", "-c", f"[ ! -e {path} ] || echo 1 > {path}")


def taken_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network an address or a route of this machine is in."""
    taken: list[ipaddress.IPv4Network] = []
    for line in (ip("-4", "-o", "addr", "show") + ip("-4", "route", "show", "table", "all")
                 ).splitlines():
        for word in line.split():
            try:
                taken.append(ipaddress.IPv4Network(word, strict=False))
            except ValueError:
                continue
    return taken
