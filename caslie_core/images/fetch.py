"""`fetch_image`: one image's bytes over HTTP(S) (pooled), S3/GCS/Azure or local files, with retries."""

from __future__ import annotations

import functools
import hashlib
import http.client
import random
import time
from urllib.parse import urljoin, urlsplit

from ..errors import ImageError
from .connections import _POOL, _STALE_ERRORS, _Conn, _connect, _Stale, _timed_response
from .policy import (
    DRAIN_BYTES,
    REDIRECTS,
    FetchCancel,
    FetchPolicy,
    _Deadline,
    _DeadlineExceeded,
    _resolve_checked,
    retry_after_seconds,
)


def _read_rest(resp, deadline_doing: list, limit: int) -> tuple[bytes, bool]:
    """Read the body with partial reads (each bounded by the deadline). (body, complete); stops past `limit`."""
    chunks, total = [], 0
    while resp.length != 0:
        chunk = resp.read1(65536)
        if not chunk:
            break
        total += len(chunk)
        chunks.append(chunk)
        deadline_doing[0] = (
            f"reading the body ({total} of {resp.length + total if resp.length is not None else '?'} bytes)"
        )
        if total > limit:
            return b"".join(chunks), False
    complete = resp.length == 0 if resp.length is not None else resp.isclosed()
    return b"".join(chunks), complete


def _exchange(conn: _Conn, url: str, path: str, policy: FetchPolicy, deadline: _Deadline, pooled: bool):
    """One GET on `conn`. Returns (status, headers, body, redirect_location); the connection goes back to
    the pool or is closed. Raises `_Stale` if a pooled connection was closed before it answered."""
    doing = ["waiting for the response"]
    resp = None
    reusable = False
    cancel = deadline.cancel
    try:
        if cancel is not None and conn.sock is not None:
            cancel.watch(conn.sock)
        conn.response_class = functools.partial(_timed_response, deadline=deadline, read_timeout=policy.read_timeout)
        sent = {
            "User-Agent": policy.user_agent,
            "Accept": "image/*",
            "Connection": "keep-alive" if policy.pool else "close",
        }
        try:
            conn.sock.settimeout(deadline.timeout(policy.read_timeout)[0])
            conn.request("GET", path, headers=sent)
            resp = conn.getresponse()
        except _STALE_ERRORS:
            if pooled:
                raise _Stale from None
            raise
        headers = {k.lower(): v for k, v in resp.getheaders()}
        if resp.status != 200:
            try:  # a small error or redirect body is read so the connection can be reused
                if not resp.will_close and (resp.length is None or resp.length <= DRAIN_BYTES):
                    _, reusable = _read_rest(resp, doing, DRAIN_BYTES)
            except Exception:
                reusable = False
            location = headers.get("location") if resp.status in REDIRECTS else None
            return resp.status, headers, None, location
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > policy.max_bytes:
            raise ImageError("fetch", f"image is {int(length)} bytes, over the {policy.max_bytes}-byte cap")
        body, complete = _read_rest(resp, doing, policy.max_bytes)
        if len(body) > policy.max_bytes:
            raise ImageError("fetch", f"image exceeds the {policy.max_bytes}-byte cap")
        if resp.length:  # the server closed before sending all it announced
            raise ImageError("fetch", f"connection closed after {len(body)} of {length} bytes", transient=True)
        reusable = complete
        return 200, headers, body, None
    except _DeadlineExceeded:
        raise deadline.error(url, doing[0]) from None
    except TimeoutError:
        if deadline.left() <= 0:
            raise deadline.error(url, doing[0]) from None
        raise ImageError("fetch", f"read timed out after {policy.read_timeout}s: {url}", transient=True) from None
    except (http.client.HTTPException, OSError) as e:
        if deadline.left() <= 0:
            raise deadline.error(url, doing[0]) from None
        raise ImageError("fetch", f"{type(e).__name__}: {e}", transient=True) from None
    finally:
        if cancel is not None and conn.sock is not None:
            cancel.unwatch(conn.sock)
        # Back to the pool only after a complete response on a connection the server keeps open.
        keep = reusable and policy.pool and resp is not None and not resp.will_close and conn.sock is not None
        if resp is not None:
            resp.close()
        if keep:
            _POOL.give(conn)
        else:
            conn.close()


def _http_get(url: str, policy: FetchPolicy, deadline: _Deadline | None = None):
    """One GET to a checked, pinned address. Returns (status, headers, body, redirect_location)."""
    deadline = deadline or _Deadline(policy.total_timeout)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    ips = _resolve_checked(host, port, policy)  # every request: a pooled connection must match these
    try:
        conn = _POOL.take(scheme, host, port, ips) if policy.pool else None
        if conn is not None:
            try:
                return _exchange(conn, url, path, policy, deadline, pooled=True)
            except _Stale:
                _POOL.count("stale_replaced")  # once, on a fresh connection; not a retry attempt
        conn = _connect(scheme, host, port, ips, policy, deadline)
        return _exchange(conn, url, path, policy, deadline, pooled=False)
    except _DeadlineExceeded:
        raise deadline.error(url, "connecting") from None


def _status_error(status: int, url: str, headers: dict) -> ImageError:
    raw = headers.get("retry-after") if status in (429, 503) else None
    err = ImageError(
        "fetch",
        f"HTTP {status} for {url}" + (f" (Retry-After: {raw})" if raw else ""),
        transient=status == 429 or status >= 500,
    )
    err.status = status
    err.retry_after = retry_after_seconds(raw)
    err.retry_after_header = raw
    return err


def _fetch_http(url: str, policy: FetchPolicy, deadline: _Deadline | None = None) -> bytes:
    deadline = deadline or _Deadline(policy.total_timeout)
    current = url
    for _ in range(policy.max_redirects + 1):
        status, headers, body, location = _http_get(current, policy, deadline)
        if location:
            nxt = urljoin(current, location)
            if urlsplit(nxt).scheme not in ("http", "https") or urlsplit(nxt).scheme not in policy.schemes:
                raise ImageError("fetch", f"refused: redirect to a disallowed scheme: {nxt}")
            current = nxt
            continue
        if status == 200:
            return body or b""
        raise _status_error(status, current, headers)
    raise ImageError("fetch", f"more than {policy.max_redirects} redirects")


def _fetch_fsspec(url: str, policy: FetchPolicy) -> bytes:
    import fsspec

    try:
        with fsspec.open(url, "rb") as fh:
            data = fh.read(policy.max_bytes + 1)
    except FileNotFoundError:
        raise ImageError("fetch", f"not found: {url}") from None
    except PermissionError as e:
        raise ImageError("fetch", f"access denied: {url} ({e})") from None
    except Exception as e:
        raise ImageError("fetch", f"{type(e).__name__}: {e}", transient=True) from None
    if len(data) > policy.max_bytes:
        raise ImageError("fetch", f"image exceeds the {policy.max_bytes}-byte cap")
    return data


def fetch_once(url: str, policy: FetchPolicy) -> bytes:
    """One attempt (redirects followed), within `policy.total_timeout`. Raises ImageError."""
    return _fetch_once(url, policy, _Deadline(policy.total_timeout))


def _fetch_once(url: str, policy: FetchPolicy, deadline: _Deadline) -> bytes:
    if deadline.left() <= 0:
        raise deadline.error(url, "before starting")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a port out of range or a broken IPv6 literal raises here
    except ValueError as e:
        raise ImageError("fetch", f"malformed URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme in ("http", "https") and not parts.hostname:
        raise ImageError("fetch", "malformed URL (no host)")
    if scheme in ("", "file") or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
        if not policy.allow_local_files:
            raise ImageError("fetch", f"refused: local file paths are not allowed here: {url}")
        return _fetch_fsspec(url, policy)
    if scheme not in policy.schemes:
        raise ImageError("fetch", f"refused: scheme {scheme!r} not allowed; allowed: {', '.join(policy.schemes)}")
    if scheme in ("http", "https"):
        return _fetch_http(url, policy, deadline)
    return _fetch_fsspec(url, policy)


def _given_up(e: ImageError, attempt: int, why: str = "") -> ImageError:
    if attempt or why:
        note = f"after {attempt + 1} attempts" if attempt else ""
        note = "; ".join(x for x in (note, why) if x)
        e.reason = f"{e.reason} ({note})"
        e.args = (f"{e.stage}: {e.reason}",)
    return e


def fetch_image(
    url: str,
    policy: FetchPolicy | None = None,
    *,
    sleep=time.sleep,
    cancel: FetchCancel | None = None,
    timeout: float | None = None,
) -> bytes:
    """Fetch with retries on transient errors (exponential backoff with jitter, or the server's
    Retry-After on 429/503), all within `policy.total_timeout` seconds from the first attempt (or `timeout`,
    when shorter: what is left of a client's request). `cancel` stops it from another thread at once."""
    policy = policy or FetchPolicy()
    total = policy.total_timeout if timeout is None else max(0.0, min(timeout, policy.total_timeout))
    deadline = _Deadline(total, cancel)
    if cancel is not None:
        sleep = cancel.wait
    attempt = 0
    while True:
        try:
            return _fetch_once(url, policy, deadline)
        except ImageError as e:
            if not e.transient or attempt >= policy.retries:
                raise _given_up(e, attempt) from None
            left = deadline.left()
            retry_after = getattr(e, "retry_after", None)
            if retry_after is not None:
                if retry_after >= left:
                    raise ImageError(
                        "fetch",
                        f"{e.reason}: the server asks to wait {retry_after:.0f}s, more than the "
                        f"{max(left, 0):.1f}s left of the {deadline.total:g}s total deadline; not retried",
                        transient=True,
                    ) from None
                wait = retry_after
            else:
                wait = policy.backoff * (2**attempt) * (1 + random.random() * 0.25)
                if wait >= left:
                    why = f"no time left for a retry within the {deadline.total:g}s total deadline"
                    raise _given_up(e, attempt, why) from None
        attempt += 1
        if sleep(wait) is True:  # FetchCancel.wait: cancelled while waiting
            raise deadline.error(url, "waiting to retry")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
