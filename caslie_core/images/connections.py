"""Kept-alive HTTP(S) connections, pinned to checked addresses, in a bounded per-process pool."""

from __future__ import annotations

import collections
import functools
import http.client
import io
import os
import select
import socket
import ssl
import threading
import time

from ..errors import ImageError
from .policy import (
    POOL_IDLE_SECONDS,
    POOL_MAX_IDLE,
    POOL_MAX_IDLE_PER_KEY,
    FetchPolicy,
    _Deadline,
    _DeadlineExceeded,
)

# Connections


class _Stale(Exception):
    """A pooled connection turned out to be closed by the server before it answered."""


_STALE_ERRORS = (ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError)  # ConnectionError has RemoteDisconnected


class _Conn(http.client.HTTPConnection):
    """An HTTP/1.1 connection on a socket opened by `_connect` to a checked address; never connects itself."""

    pool_key: tuple = ()

    def connect(self):  # http.client would resolve the host again: no unchecked, unpinned connections
        raise ImageError("fetch", "internal error: a connection must be opened to a checked address")


class _TimedReader(io.RawIOBase):
    """The socket as HTTPResponse reads it: before every read the timeout is min(read_timeout, time left)."""

    def __init__(self, sock, deadline: _Deadline, read_timeout: float) -> None:
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # keeps the socket open while the response is read
        self._deadline = deadline
        self._read_timeout = read_timeout

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int | None:
        timeout, by_deadline = self._deadline.timeout(self._read_timeout)
        self._sock.settimeout(timeout)
        try:
            n = self._raw.readinto(b)
        except TimeoutError:
            if by_deadline or self._deadline.left() <= 0:
                raise _DeadlineExceeded from None
            raise
        except OSError:
            if self._deadline.left() <= 0:  # cancelled: the socket was shut down under the read
                raise _DeadlineExceeded from None
            raise
        if not n and self._deadline.left() <= 0:
            raise _DeadlineExceeded
        return n

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _TimedSocket:
    """What HTTPResponse is given instead of the socket: it only calls `makefile`."""

    def __init__(self, sock, deadline: _Deadline, read_timeout: float) -> None:
        self._args = (sock, deadline, read_timeout)

    def makefile(self, mode, *args, **kwargs):
        return io.BufferedReader(_TimedReader(*self._args))


def _timed_response(sock, *args, deadline: _Deadline, read_timeout: float, **kwargs):
    return http.client.HTTPResponse(_TimedSocket(sock, deadline, read_timeout), *args, **kwargs)


def _is_dropped(sock) -> bool:
    """An idle keep-alive socket that is readable has been closed (or sent something unasked): unusable."""
    if sock is None:
        return True
    try:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        if hasattr(select, "poll"):
            p = select.poll()
            p.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return bool(p.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class _Pool:
    """Idle keep-alive connections by (scheme, host, port, checked IP). `take` hands a connection to one
    caller only; `give` puts it back. Bounded per key and in all; idle ones expire."""

    def __init__(self, per_key: int, max_idle: int, idle_seconds: float) -> None:
        self.per_key, self.max_idle, self.idle_seconds = per_key, max_idle, idle_seconds
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[tuple, collections.deque] = {}
        self._count = 0
        self._purged = time.monotonic()
        self._stats = collections.Counter()

    def after_fork(self) -> None:
        """In a forked child the sockets are the parent's: forget them (the parent keeps using them)."""
        self._reset()

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self._stats[what] += n

    def take(self, scheme: str, host: str, port: int, ips: list[str]) -> _Conn | None:
        """An idle, live connection to one of `ips` (all checked for this request), or None."""
        while True:
            now = time.monotonic()
            conn = None
            with self._lock:
                for ip in ips:
                    key = (scheme, host, port, ip)
                    q = self._idle.get(key)
                    if q:
                        since, conn = q.pop()
                        self._count -= 1
                        if not q:
                            del self._idle[key]
                        break
            if conn is None:
                return None
            if now - since > self.idle_seconds or _is_dropped(conn.sock):
                conn.close()
                self.count("discarded")
                continue
            self.count("reused")
            return conn

    def give(self, conn: _Conn) -> None:
        key, now, evicted = conn.pool_key, time.monotonic(), []
        with self._lock:
            if now - self._purged > self.idle_seconds:  # idle ones of hosts not asked for again
                self._purged = now
                for k in list(self._idle):
                    q = self._idle[k]
                    while q and now - q[0][0] > self.idle_seconds:
                        evicted.append(q.popleft()[1])
                        self._count -= 1
                    if not q:
                        del self._idle[k]
            q = self._idle.get(key)
            if q is not None and len(q) >= self.per_key:
                evicted.append(q.popleft()[1])
                self._count -= 1
                if not q:
                    del self._idle[key]
            while self._count >= self.max_idle and self._idle:  # the oldest idle connection goes
                oldest = min(self._idle, key=lambda k: self._idle[k][0][0])
                oq = self._idle[oldest]
                evicted.append(oq.popleft()[1])
                self._count -= 1
                if not oq:
                    del self._idle[oldest]
            self._idle.setdefault(key, collections.deque()).append((now, conn))
            self._count += 1
        for c in evicted:
            c.close()

    def clear(self) -> int:
        with self._lock:
            conns = [c for q in self._idle.values() for _, c in q]
            self._idle.clear()
            self._count = 0
        for c in conns:
            c.close()
        return len(conns)

    def stats(self) -> dict:
        with self._lock:
            out = {k: self._stats.get(k, 0) for k in ("opened", "reused", "stale_replaced", "discarded")}
            out["idle"] = self._count
        return out


_POOL = _Pool(POOL_MAX_IDLE_PER_KEY, POOL_MAX_IDLE, POOL_IDLE_SECONDS)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL.after_fork)


def pool_stats() -> dict:
    """Counts since start: connections `opened`, `reused` from the pool, `stale_replaced` (a pooled one the
    server had closed, replaced by a fresh one), `discarded` (idle ones found closed or expired); `idle` now."""
    return _POOL.stats()


def close_idle_connections() -> int:
    """Close every idle pooled connection; returns how many."""
    return _POOL.clear()


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # certificate and host name checks on


def _connect(scheme: str, host: str, port: int, ips: list[str], policy: FetchPolicy, deadline: _Deadline) -> _Conn:
    """A new connection to the first reachable address of `ips` (all checked), TLS with SNI for https."""
    sock, ip, last, by_deadline = None, None, None, False
    for ip in ips:  # pinned: we connect only to checked addresses
        timeout, by_deadline = deadline.timeout(policy.connect_timeout)
        try:
            sock = socket.create_connection((ip, port), timeout=timeout)
            break
        except OSError as e:
            last = e
    if sock is not None and deadline.cancel is not None:
        try:
            deadline.cancel.watch(sock)  # from here on, a cancel shuts it down
        except _DeadlineExceeded:
            sock.close()
            raise
    if sock is None:
        if isinstance(last, TimeoutError):
            if by_deadline:
                raise _DeadlineExceeded
            raise ImageError(
                "fetch", f"connect timed out after {policy.connect_timeout}s: {host}:{port}", transient=True
            )
        raise ImageError("fetch", f"cannot connect to {host}:{port}: {last}", transient=True)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if scheme == "https":
            timeout, by_deadline = deadline.timeout(policy.read_timeout)
            sock.settimeout(timeout)
            sock = _ssl_context().wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as e:
        sock.close()
        raise ImageError("fetch", f"TLS certificate check failed for {host}: {e.verify_message or e}") from None
    except TimeoutError:
        sock.close()
        if by_deadline or deadline.left() <= 0:
            raise _DeadlineExceeded from None
        raise ImageError(
            "fetch", f"TLS handshake timed out after {policy.read_timeout}s: {host}", transient=True
        ) from None
    except _DeadlineExceeded:
        sock.close()
        raise
    except OSError as e:
        sock.close()
        if deadline.left() <= 0:
            raise _DeadlineExceeded from None
        raise ImageError("fetch", f"TLS handshake with {host} failed: {e}", transient=True) from None
    conn = _Conn(host, port, timeout=policy.read_timeout)
    if scheme == "https":
        conn.default_port = 443  # Host: header without :443
    conn.sock = sock
    conn.pool_key = (scheme, host, port, ip)
    _POOL.count("opened")
    return conn
