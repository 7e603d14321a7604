"""Image fetching and decoding, safe for catalog scale and for fetching on behalf of clients.

`fetch_image(url, policy)` returns bytes or raises `ImageError(stage="fetch")`. It is called from many
threads at once. Rules:

- only allowed schemes; local paths only with `allow_local_files`;
- connect and read timeouts (`read_timeout` bounds each silence between bytes), and a total per-image
  deadline (`total_timeout`, from the first attempt: connecting, retries, backoff, Retry-After waits,
  response headers and body). Every socket read is given min(read_timeout, time left), so a server that
  drips one byte a second fails at the deadline ("... over the Ns total deadline ...", not retried);
- a `FetchCancel` token given to `fetch_image` stops its fetch from another thread at once (a blocked read's
  socket is shut down, a retry wait ends): a client request whose deadline passed frees its fetch threads;
- retries with exponential backoff on transient errors (connection errors, timeouts, 429, 5xx); on 429
  and 503 a `Retry-After` (seconds or an HTTP-date) is waited instead, within the retry budget; one that
  asks for longer than the deadline leaves fails at once, naming the status and the header;
- a byte cap (from Content-Length before reading, and while reading);
- loopback, private, link-local, metadata and other special addresses refused unless allowlisted,
  checked after DNS resolution on every request and on every redirect hop, and the connection is pinned
  to the checked address (no DNS-rebinding window);
- an HTTP 200 with an empty body returns b"" (decoding then fails with "empty file").

HTTP(S) connections are kept alive (HTTP/1.1) in a bounded module-level pool keyed by (scheme, host,
port, checked IP address): a request takes an idle connection only for an address that has just passed
the checks for its host, and a connection is used by one thread at a time. A connection goes back only
after its response was read completely and the server did not say `Connection: close`; at most
`POOL_MAX_IDLE_PER_KEY` idle per key and `POOL_MAX_IDLE` in all, each dropped after `POOL_IDLE_SECONDS`
or when found closed. A pooled connection the server has closed meanwhile is replaced by a fresh one
once, without counting as a retry. HTTPS keeps SNI and certificate checks. `FetchPolicy(pool=False)`
opens one connection per request (and says `Connection: close`). `pool_stats()` and
`close_idle_connections()` inspect and empty the pool.

`decode_image(data, max_pixels, size)` returns an RGB `uint8` array of `size x size` (aspect kept,
letterboxed) or raises `ImageError(stage="decode")`: EXIF orientation, palette/alpha/CMYK/16-bit/
grayscale to RGB, first frame of animations, and a pixel-count guard against decompression bombs
checked from the header before any pixel is decoded.
"""

from __future__ import annotations

from .connections import POOL_IDLE_SECONDS, POOL_MAX_IDLE, POOL_MAX_IDLE_PER_KEY, close_idle_connections, pool_stats
from .decode import decode_image, letterbox, to_rgb
from .fetch import digest, fetch_image, fetch_once
from .policy import METADATA_ADDRESSES, FetchCancel, FetchPolicy, address_refusal, retry_after_seconds

__all__ = [
    "METADATA_ADDRESSES",
    "POOL_IDLE_SECONDS",
    "POOL_MAX_IDLE",
    "POOL_MAX_IDLE_PER_KEY",
    "FetchCancel",
    "FetchPolicy",
    "address_refusal",
    "close_idle_connections",
    "decode_image",
    "digest",
    "fetch_image",
    "fetch_once",
    "letterbox",
    "pool_stats",
    "retry_after_seconds",
    "to_rgb",
]
