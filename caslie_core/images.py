"""Image fetching and decoding, safe for catalog scale and for fetching on behalf of clients.

`fetch_image(url, policy)` returns bytes or raises `ImageError(stage="fetch")`: only allowed schemes;
connect and read timeouts; retries with exponential backoff on transient errors (connection errors,
timeouts, 429, 5xx); a byte cap; loopback, private, link-local, metadata and other special addresses
refused unless allowlisted, checked after DNS resolution and on every redirect, and the connection is
pinned to the checked address (no DNS-rebinding window).

`decode_image(data, max_pixels, size)` returns an RGB `uint8` array of `size x size` (aspect kept,
letterboxed) or raises `ImageError(stage="decode")`: EXIF orientation, palette/alpha/CMYK/16-bit/
grayscale to RGB, first frame of animations, and a pixel-count guard against decompression bombs
checked from the header before any pixel is decoded.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
import socket
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from .errors import ImageError

# Metadata endpoints of the big clouds; also covered by link-local, listed so refusals say why.
METADATA_ADDRESSES = {"169.254.169.254", "fd00:ec2::254", "100.100.100.200"}


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


def address_refusal(ip: str, allowlist: list[str] | None = None) -> str | None:
    """Why fetching from `ip` is refused by default, or None if it is a public address (or allowlisted)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return f"not an IP address: {ip!r}"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
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
        for ip in ips:
            why = address_refusal(ip, policy.allowlist)
            if why:
                raise ImageError("fetch", f"refused: {host} resolves to {why} (allowlist it to fetch from it)")
    return ips


def _http_get(url: str, policy: FetchPolicy) -> tuple[int, dict, bytes | None, str | None]:
    """One GET to a checked, pinned address. Returns (status, headers, body, redirect_location)."""
    import http.client

    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    sock = None
    last: Exception | None = None
    for ip in _resolve_checked(host, port, policy):  # pinned: we connect only to checked addresses
        try:
            sock = socket.create_connection((ip, port), timeout=policy.connect_timeout)
            break
        except OSError as e:
            last = e
    if sock is None:
        if isinstance(last, TimeoutError):
            raise ImageError("fetch", f"connect timed out after {policy.connect_timeout}s: {url}", transient=True)
        raise ImageError("fetch", f"cannot connect to {host}:{port}: {last}", transient=True)
    sock.settimeout(policy.read_timeout)
    if parts.scheme == "https":
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
    conn = http.client.HTTPConnection(host, port, timeout=policy.read_timeout)
    conn.sock = sock
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        conn.request("GET", path, headers={"User-Agent": policy.user_agent, "Accept": "image/*"})
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        if resp.status in (301, 302, 303, 307, 308):
            return resp.status, headers, None, headers.get("location")
        if resp.status != 200:
            return resp.status, headers, None, None
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > policy.max_bytes:
            raise ImageError("fetch", f"image is {int(length)} bytes, over the {policy.max_bytes}-byte cap")
        chunks, total = [], 0
        while True:
            chunk = resp.read(65536)
            if not chunk:
                break
            total += len(chunk)
            if total > policy.max_bytes:
                raise ImageError("fetch", f"image exceeds the {policy.max_bytes}-byte cap")
            chunks.append(chunk)
        body = b"".join(chunks)
        if length and length.isdigit() and len(body) < int(length):
            raise ImageError("fetch", f"connection closed after {len(body)} of {length} bytes", transient=True)
        return 200, headers, body, None
    except TimeoutError:
        raise ImageError("fetch", f"read timed out after {policy.read_timeout}s: {url}", transient=True) from None
    except (http.client.HTTPException, OSError) as e:
        raise ImageError("fetch", f"{type(e).__name__}: {e}", transient=True) from None
    finally:
        conn.close()


def _fetch_http(url: str, policy: FetchPolicy) -> bytes:
    current = url
    for _ in range(policy.max_redirects + 1):
        status, _, body, location = _http_get(current, policy)
        if location:
            nxt = urljoin(current, location)
            if urlsplit(nxt).scheme not in ("http", "https") or urlsplit(nxt).scheme not in policy.schemes:
                raise ImageError("fetch", f"refused: redirect to a disallowed scheme: {nxt}")
            current = nxt
            continue
        if status == 200:
            return body or b""
        transient = status == 429 or status >= 500
        raise ImageError("fetch", f"HTTP {status} for {current}", transient=transient)
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
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
        if not policy.allow_local_files:
            raise ImageError("fetch", f"refused: local file paths are not allowed here: {url}")
        return _fetch_fsspec(url, policy)
    if scheme not in policy.schemes:
        raise ImageError("fetch", f"refused: scheme {scheme!r} not allowed; allowed: {', '.join(policy.schemes)}")
    if scheme in ("http", "https"):
        return _fetch_http(url, policy)
    return _fetch_fsspec(url, policy)


def fetch_image(url: str, policy: FetchPolicy | None = None, *, sleep=time.sleep) -> bytes:
    """Fetch with retries on transient errors (exponential backoff with jitter)."""
    policy = policy or FetchPolicy()
    attempt = 0
    while True:
        try:
            return fetch_once(url, policy)
        except ImageError as e:
            if not e.transient or attempt >= policy.retries:
                if attempt:
                    e.reason = f"{e.reason} (after {attempt + 1} attempts)"
                    e.args = (f"{e.stage}: {e.reason}",)
                raise
        attempt += 1
        sleep(policy.backoff * (2 ** (attempt - 1)) * (1 + random.random() * 0.25))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Decoding


def decode_image(data: bytes, *, max_pixels: int = 40_000_000, size: int = 336):
    """Bytes -> RGB uint8 array `size x size` (letterboxed on white). Raises `ImageError('decode')`."""
    import io
    import warnings

    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageError("decode", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(
                    "decode",
                    f"{w}x{h} = {w * h} pixels is over the {max_pixels}-pixel limit (decompression-bomb guard)",
                )
            if getattr(im, "is_animated", False):
                im.seek(0)
            im = ImageOps.exif_transpose(im) or im
            im.load()
            im = to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("decode", "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("decode", f"decompression-bomb guard: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError("decode", f"corrupt or truncated image: {e}") from None
    return np.asarray(letterbox(im, size), dtype=np.uint8)


def to_rgb(im):
    """Any PIL mode -> RGB; transparency is composited on white."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max() or 1.0
        im = Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype("uint8"), "L")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def letterbox(im, size: int):
    from PIL import Image

    w, h = im.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = im.resize((nw, nh), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return canvas
