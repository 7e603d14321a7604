"""A client request's images read in bounded thread pools of the service's own, never the event loop's.

Fetches (network waits) and decodes (CPU) run in separate pools, so a slow image host can hold fetch threads
but never the decoding of another client's `data:` image. Each request reads at most `per_request` images at
a time, each fetch within what is left of the request's deadline; when the request ends for any reason
(done, deadline passed, client gone) every fetch it still has running is cancelled at once (its socket shut
down) and its thread is free again. Any failure reading one image is that image's `ImageError`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor

from ..errors import ImageError
from ..images import FetchCancel, FetchPolicy, decode_image, fetch_image
from ..items import ImageSlot


class ImageIntake:
    def __init__(
        self,
        policy: FetchPolicy,
        *,
        fetch_threads: int,
        decode_threads: int,
        per_request: int,
        size: int,
        max_pixels: int,
        max_decoded_bytes: int,
    ) -> None:
        self.policy, self.per_request = policy, per_request
        self.decode = functools.partial(
            decode_image, size=size, max_pixels=max_pixels, max_decoded_bytes=max_decoded_bytes
        )
        self.fetch_pool = ThreadPoolExecutor(fetch_threads, thread_name_prefix="caslie-fetch")
        self.decode_pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="caslie-decode")

    @classmethod
    def from_config(cls, fetch, *, size: int) -> ImageIntake:
        """From the service's `fetch` section (`ServeFetchConfig`); `size`: the captioner's image size."""
        return cls(
            fetch.policy(),
            fetch_threads=fetch.threads,
            decode_threads=fetch.decode_threads,
            per_request=fetch.per_request,
            size=size,
            max_pixels=fetch.max_pixels,
            max_decoded_bytes=fetch.max_decoded_bytes,
        )

    async def load(self, slots: list[ImageSlot], *, deadline: float) -> list[tuple[ImageSlot, ImageError]]:
        """Pixels onto each slot; returns the (slot, error) of those that could not be read. `deadline` is the
        request's end on `time.monotonic()`."""
        from .flow import read_data_uri

        loop = asyncio.get_running_loop()
        cancel, gate = FetchCancel(), asyncio.Semaphore(self.per_request)
        failures: list[tuple[ImageSlot, ImageError]] = []

        async def one(slot: ImageSlot) -> None:
            try:
                async with gate:
                    if slot.url[:5].lower() == "data:":
                        data = await loop.run_in_executor(
                            self.decode_pool, read_data_uri, slot.url, self.policy.max_bytes
                        )
                    else:
                        left = deadline - time.monotonic()
                        fetch = functools.partial(fetch_image, slot.url, self.policy, cancel=cancel, timeout=left)
                        data = await loop.run_in_executor(self.fetch_pool, fetch)
                    slot.pixels = await loop.run_in_executor(self.decode_pool, self.decode, data)
            except Exception as e:  # noqa: BLE001 - whatever goes wrong with one image is that image's error
                err = (
                    e
                    if isinstance(e, ImageError)
                    else ImageError("fetch", f"cannot read this image ({type(e).__name__})")
                )
                slot.error = {"stage": err.stage, "message": err.reason}
                failures.append((slot, err))

        try:
            await asyncio.gather(*(one(s) for s in slots))
        finally:
            cancel.cancel()  # a request cancelled mid-way: its fetches still running stop now
        return failures

    def close(self) -> None:
        for pool in (self.fetch_pool, self.decode_pool):
            pool.shutdown(wait=False, cancel_futures=True)
