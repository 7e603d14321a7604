"""What may be fetched and for how long: `FetchPolicy`, the address rules (checked after DNS), the
total per-image deadline and `Retry-After`."""

from __future__ import annotations

import email.utils
import ipaddress
import math
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timezone

from ..errors import ImageError

# Metadata endpoints of the big clouds; also covered by link-local, listed so refusals say why.
METADATA_ADDRESSES = {"169.254.169.254", "fd00:ec2::254", "100.100.100.200"}

# Connection pool bounds (per process).
POOL_MAX_IDLE_PER_KEY = 32  # idle connections kept per (scheme, host, port, address)
POOL_MAX_IDLE = 256  # idle connections kept in all; the oldest goes first
POOL_IDLE_SECONDS = 30.0  # an idle connection older than this is closed instead of reused

REDIRECTS = (301, 302, 303, 307, 308)
DRAIN_BYTES = 64 * 1024  # error and redirect bodies up to this size are read so the connection can be reused


@dataclass
class FetchPolicy:
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    max_bytes: int = 20 * 1024 * 1024
    retries: int = 3
    backoff: float = 0.5
    max_redirects: int = 5
    schemes: tuple[str, ...] = ("http", "https")
    allow_local_files: bool = False
    block_private: bool = True
    allowlist: list[str] = field(default_factory=list)  # hostnames or CIDRs exempt from the address rules
    user_agent: str = "caslie-image-fetcher/1.0"
    total_timeout: float = 60.0  # seconds from the first attempt to giving up (retries, waits, body included)
    pool: bool = True  # reuse keep-alive HTTP(S) connections


def address_refusal(ip: str, allowlist: list[str] | None = None) -> str | None:
    """Why fetching from `ip` is refused by default, or None if it is a public address (or allowlisted)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return f"not an IP address: {ip!r}"
    if isinstance(addr, ipaddress.IPv6Address):
        # IPv4 carried inside IPv6 is judged as the IPv4 address it reaches: mapped, 6to4 (2002::/16), Teredo.
        embedded = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if embedded is not None:
            why = address_refusal(str(embedded), allowlist)
            return f"{addr} carries {why}" if why and addr.ipv4_mapped is None else why
        if addr.is_site_local:  # fec0::/10, deprecated but still routed inside some networks
            return f"{addr} is a site-local address"
    for entry in allowlist or []:
        try:
            if addr in ipaddress.ip_network(entry, strict=False):
                return None
        except ValueError:
            continue  # a hostname entry; matched by host before resolution
    if str(addr) in METADATA_ADDRESSES:
        return f"{addr} is a cloud metadata address"
    checks = [
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_private", "a private address"),
        ("is_multicast", "a multicast address"),
        ("is_reserved", "a reserved address"),
    ]
    for attr, what in checks:
        if getattr(addr, attr):
            return f"{addr} is {what}"
    if isinstance(addr, ipaddress.IPv4Address) and addr in ipaddress.ip_network("100.64.0.0/10"):
        return f"{addr} is a carrier-grade NAT (shared) address"
    return None


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    return True


def _resolve_checked(host: str, port: int, policy: FetchPolicy) -> list[str]:
    """Resolve `host`; every address must pass the rules. Returns them (connect tries each in turn)."""
    host_allowed = host.lower() in {a.lower() for a in policy.allowlist}
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ImageError("fetch", f"cannot resolve host {host!r}: {e}", transient=True) from None
    ips = list(dict.fromkeys(info[4][0] for info in infos))
    if not ips:
        raise ImageError("fetch", f"host {host!r} has no address")
    if policy.block_private and not host_allowed:
        literal = _is_ip_literal(host)
        for ip in ips:
            why = address_refusal(ip, policy.allowlist)
            if why:
                if not literal:  # the address a name resolved to is not told (no internal DNS oracle)
                    why = why.partition(" is ")[2] or "a refused address"
                    why = f"an address that is {why}"
                raise ImageError("fetch", f"refused: {host} resolves to {why} (allowlist it to fetch from it)")
    return ips


# Deadline


class _DeadlineExceeded(Exception):
    """Raised inside a read or connect when the total deadline has passed (turned into an ImageError)."""


class FetchCancel:
    """Stops fetches from another thread: `cancel()` makes every fetch given this token fail at once, also one
    blocked in a socket read (its socket is shut down), and ends their retry waits. One per client request."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._socks: set = set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            socks, self._socks = list(self._socks), set()
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # a blocked recv/send returns at once
            except OSError:
                pass

    def watch(self, sock) -> None:
        with self._lock:
            if not self._event.is_set():
                self._socks.add(sock)
                return
        raise _DeadlineExceeded

    def unwatch(self, sock) -> None:
        with self._lock:
            self._socks.discard(sock)

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True if cancelled meanwhile."""
        return self._event.wait(seconds)


class _Deadline:
    """The total per-image deadline: `total` seconds from the first attempt (or sooner when cancelled)."""

    def __init__(self, total: float, cancel: FetchCancel | None = None) -> None:
        self.total = total
        self.start = time.monotonic()
        self.end = self.start + total
        self.cancel = cancel

    def left(self) -> float:
        if self.cancel is not None and self.cancel.cancelled:
            return 0.0
        return self.end - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def timeout(self, cap: float) -> tuple[float, bool]:
        """(min(cap, time left), whether the deadline is the limit); raises once no time is left."""
        left = self.left()
        if left <= 0.001:
            raise _DeadlineExceeded
        return (left, True) if left < cap else (cap, False)

    def error(self, url: str, doing: str) -> ImageError:
        if self.cancel is not None and self.cancel.cancelled:
            return ImageError("fetch", f"cancelled {doing} after {self.elapsed():.1f}s: {url}", transient=False)
        return ImageError(
            "fetch",
            f"gave up {doing} after {self.elapsed():.1f}s: over the {self.total:g}s total deadline: {url}",
            transient=False,
        )


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A `Retry-After` header (delta seconds or an HTTP-date) as seconds to wait from now; None if unreadable."""
    if not value:
        return None
    v = value.strip()
    try:
        seconds = float(v)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(v)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
