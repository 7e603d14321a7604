"""Run-wide caption de-duplication: the cache protocol, an in-process cache and the claim table.

A (image content, caption request) pair is captioned once per run. An actor *claims* the keys it is
about to caption, *puts* the captions when done and *releases* the keys that failed, so another actor
may try them. `ClaimTable` is the state behind the run-wide cache (one Ray actor in the batch job);
`LocalCaptionCache` serves one process (tests, benchmarks, the reference loop).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Protocol


class CaptionCache(Protocol):
    """Run-wide de-duplication of (image content, caption request) pairs."""

    def claim(self, keys: list[str], owner: str) -> dict[str, Any]: ...
    def put(self, items: dict[str, str | None], owner: str) -> None: ...
    def release(self, keys: list[str], owner: str) -> None: ...


class LocalCaptionCache:
    """In-process cache (one process: tests, benchmarks, a single actor)."""

    def __init__(self) -> None:
        self.done: dict[str, str | None] = {}

    def claim(self, keys, owner):
        return {k: ("hit", self.done[k]) if k in self.done else ("mine", None) for k in keys}

    def put(self, items, owner):
        self.done.update(items)

    def release(self, keys, owner):
        pass  # one process: nobody else is waiting


def caption_key(image_digest: str, prompt: str) -> str:
    return hashlib.sha256(f"{image_digest}\x00{prompt}".encode()).hexdigest()[:32]


class ClaimTable:
    """The run-wide cache state: finished captions and in-flight claims (one Ray actor in the batch job).

    Claims expire after `ttl` seconds; a restarted actor keeps its actor id, so it takes its own claims
    back at once."""

    def __init__(self, ttl: float, max_entries: int) -> None:
        self.done: dict[str, str | None] = {}
        self.claims: dict[str, tuple[str, float]] = {}
        self.ttl = ttl
        self.max_entries = max_entries
        self.hits = 0

    def claim(self, keys: list[str], owner: str) -> dict[str, Any]:
        now = time.monotonic()
        out = {}
        for k in keys:
            if k in self.done:
                out[k] = ("hit", self.done[k])
                self.hits += 1
                continue
            holder = self.claims.get(k)
            if holder and holder[0] != owner and now - holder[1] < self.ttl:
                out[k] = ("pending", None)
            else:
                self.claims[k] = (owner, now)
                out[k] = ("mine", None)
        return out

    def put(self, items: dict[str, str | None], owner: str) -> None:
        for k, v in items.items():
            self.done[k] = v
            self.claims.pop(k, None)
        while len(self.done) > self.max_entries:
            self.done.pop(next(iter(self.done)))

    def release(self, keys: list[str], owner: str) -> None:
        for k in keys:
            if self.claims.get(k, ("", 0))[0] == owner:
                del self.claims[k]

    def stats(self) -> dict:
        return {"entries": len(self.done), "hits": self.hits, "claims": len(self.claims)}
