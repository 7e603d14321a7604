"""Image fetching with pooled keep-alive connections vs. one connection per image, side by side. Writes JSON.

    python benchmarks/fetch.py [--images 2000] [--threads 16] [--rounds 5] [--out benchmarks/results/fetch-cpu-2core.json]

A local HTTP/1.1 keep-alive server (tests/imageserver.py, in a process of its own so that it does not share
the client's GIL) serves one small PNG on 127.0.0.1. The client fetches it `--images` times with
`--threads` threads through `fetch_image` (the SSRF checks, DNS resolution and byte cap included), once
with `FetchPolicy(pool=True)` and once with `pool=False`, alternating for `--rounds` rounds; every body is
checked, and the server's request count must match. Reported per mode: images/s (median of the rounds, and each round), TCP connections the server
accepted per round, connections the client opened; and the pooled/unpooled ratio.
Loopback has no network latency and no TLS: on a real network, where a connection costs a round trip (two or
more with TLS), the gap is larger.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def small_png() -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def serve(root: str, conn) -> None:
    """The server process: answers "count" with the connections accepted so far, stops on "stop"."""
    from imageserver import ImageServer

    srv = ImageServer(Path(root))
    conn.send(srv.port)
    while True:
        msg = conn.recv()
        if msg == "count":
            conn.send((srv.connections, sum(srv.hits.values())))
        else:
            srv.close()
            conn.send("stopped")
            return


def run_mode(url: str, expected: bytes, policy, images: int, threads: int, ask) -> dict:
    from caslie_core.images import close_idle_connections, fetch_image, pool_stats

    close_idle_connections()
    (conns0, requests0), opened0 = ask("count"), pool_stats()["opened"]

    def one(_):
        return fetch_image(url, policy) == expected

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as ex:
        ok = sum(ex.map(one, range(images)))
    seconds = time.perf_counter() - t0
    conns, requests = ask("count")
    if ok != images or requests - requests0 != images:
        raise SystemExit(f"{images - ok} of {images} bodies wrong; the server answered {requests - requests0}")
    return {
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1),
        "server_connections": conns - conns0,
        "client_connections_opened": pool_stats()["opened"] - opened0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fetch-cpu-2core.json"))
    args = ap.parse_args()

    from caslie_core.images import FetchPolicy

    png = small_png()
    root = tempfile.mkdtemp(prefix="fetch-bench-")
    (Path(root) / "img.png").write_bytes(png)
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=serve, args=(root, child), daemon=True)
    proc.start()
    port = parent.recv()

    def ask(msg):
        parent.send(msg)
        return parent.recv()

    url = f"http://127.0.0.1:{port}/img.png"
    base = dict(allowlist=["127.0.0.1/32"], retries=0, connect_timeout=5, read_timeout=10)
    policies = {"pooled": FetchPolicy(**base, pool=True), "unpooled": FetchPolicy(**base, pool=False)}
    try:
        for pol in policies.values():  # warm-up: imports, first connections, server threads
            run_mode(url, png, pol, 100, args.threads, ask)
        rounds: dict[str, list[dict]] = {name: [] for name in policies}
        for _ in range(args.rounds):
            for name, pol in policies.items():
                rounds[name].append(run_mode(url, png, pol, args.images, args.threads, ask))
    finally:
        ask("stop")
        proc.join(5)

    modes = {}
    for name, rs in rounds.items():
        modes[name] = {
            "images_per_s": round(statistics.median(r["images_per_s"] for r in rs), 1),
            "connections_opened": int(statistics.median(r["server_connections"] for r in rs)),
            "client_connections_opened": int(statistics.median(r["client_connections_opened"] for r in rs)),
            "rounds": rs,
        }
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "setup": {
            "images": args.images,
            "threads": args.threads,
            "rounds": args.rounds,
            "png_bytes": len(png),
            "server": "tests/imageserver.py (ThreadingHTTPServer, HTTP/1.1 keep-alive) in its own process, 127.0.0.1",
            "client": "caslie_core.images.fetch_image, FetchPolicy(pool=True|False), figures are medians of the rounds",
        },
        **modes,
        "ratio_pooled_over_unpooled": round(modes["pooled"]["images_per_s"] / modes["unpooled"]["images_per_s"], 2),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "setup")}, indent=2))


if __name__ == "__main__":
    main()
