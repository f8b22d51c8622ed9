"""Is a worker URL this router itself? A typo in `POST /admin/workers` once turned 3 requests into ~10,000
internal ones (issue #18). Checked twice: here, at once, against the address the admin client reached us
on; and at registration, by the instance id the router names on its own `/health` (any address, NAT or
alias included; `kvroute.router.workers`)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from urllib.parse import urlsplit


def _is_local(ip: str) -> bool:
    """Whether `ip` is an address of this machine (binding to it succeeds)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


async def points_at_self(url: str, sockname: tuple[str, int] | None, timeout: float = 2.0) -> bool:
    """True when `url` names the listening address `sockname` (the local end of the admin request's
    connection): same port, and a host resolving to that address, to loopback, or to another address
    of this machine. Resolution failures say False (registration reports an unreachable worker)."""
    if sockname is None:
        return False
    parts = urlsplit(url)
    try:
        port = parts.port or 80
    except ValueError:
        return False
    if not parts.hostname or port != int(sockname[1]):
        return False
    ips: set[str] = set()
    with contextlib.suppress(OSError, TimeoutError):
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM), timeout
        )
        ips = {str(info[4][0]) for info in infos}
    own = str(sockname[0])
    for ip in ips:
        if ip == own:
            return True
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            continue
        if addr.is_loopback or addr.is_unspecified or _is_local(ip):
            return True
    return False
