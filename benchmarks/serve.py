"""Serving throughput and latency with dynamic batching on and off, side by side in one run. Writes JSON.

    python benchmarks/serve.py [--clients 1,8,32] [--requests 8] [--size tiny|small|medium] [--device cpu|cuda]

The whole app (`ray_jobs.serve`) on a local Ray: each request is a category-classification record with one
image as a data: URI, so it goes through image decode, the captioner, two judges and the predictor.
`on`: every model deployment batches (`@serve.batch`, max 32, 10 ms wait); `off`: batches of one. One
replica per deployment in both (no autoscaling), so the difference is batching alone. Each client sends
`--requests` requests back to back (after a warm-up); p50/p99 latency and requests/s per client count.
Target: at 32 clients, `on` gives >= 3x the requests/s of `off` with p99 no worse than 2x `off`'s p99.
`--size` swaps the predictor for a random-weight Llama of that size (see benchmarks/train.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for k, v in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(k, v)

RECORD = {
    "task": "CC",
    "instruction": "Given a product title, choose the product's category from the options.",
    "input": {"title": "Polar green mug"},
    "options": ["A: Electronics", "B: Kitchen", "C: Toys", "D: Garden"],
}


def image_uri() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 140, 60)).save(buf, "JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def load(url: str, body: dict, clients: int, per_client: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    codes: dict[int, int] = {}

    async def client(session):
        for _ in range(per_client):
            t = time.perf_counter()
            async with session.post(url, json=body) as r:
                await r.read()
                codes[r.status] = codes.get(r.status, 0) + 1
            latencies.append(time.perf_counter() - t)

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(session) for _ in range(min(clients, 4))))  # warm-up
        latencies.clear()
        codes.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": len(latencies),
        "codes": codes,
        "wall_s": round(wall, 2),
        "rps": round(len(latencies) / wall, 2),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
    }


def config(port: int, batching: bool, predictor: str, device: str, max_new_tokens: int):
    from caslie_core.config import ServeConfig, load_config

    gpu = 0.2 if device == "cuda" else 0
    dep = (
        f"{{num_cpus: 0.25, num_gpus: {gpu}, max_ongoing_requests: 64, max_queued_requests: -1, "
        f"autoscaling: {{min_replicas: 1, max_replicas: 1}}, "
        f"batching: {{enabled: {str(batching).lower()}, max_batch_size: 32, wait_timeout_s: 0.01}}}}"
    )
    return load_config(
        ServeConfig,
        ROOT / "configs" / "serve-demo.yaml",
        [
            f"http.port={port}",
            "http.ingress={num_cpus: 0.25, max_ongoing_requests: 256, max_queued_requests: -1}",
            "model.path=null",
            f"model.model={predictor}",
            "model.serve_base=false",
            "model.name=bench",
            f"model.max_new_tokens={max_new_tokens}",
            f"model.deployment={dep}",
            f"captioner.deployment={dep}",
            f"judges.0.deployment={dep}",
            f"judges.1.deployment={dep}",
            "ray.num_cpus=null",
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "medium", "large", "3b"])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve-cpu-2core.json"))
    args = parser.parse_args()

    import ray
    from ray import serve

    from caslie_core.models.tiny import ensure_tiny_models
    from ray_jobs.serve import start

    ensure_tiny_models()
    predictor = "tiny:lm"
    if args.size != "tiny":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from train import build_model

        predictor = build_model(Path(os.environ.get("CASLIE_CACHE", "/tmp/caslie-bench")), args.size)
    clients = [int(c) for c in args.clients.split(",")]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    body = {**RECORD, "images": [image_uri()]}
    results: dict = {}
    try:
        for mode in ("on", "off"):
            cfg = config(8123, mode == "on", predictor, args.device, args.max_new_tokens)
            url = start(cfg) + "/v1/predict"
            results[mode] = {str(c): asyncio.run(load(url, body, c, args.requests)) for c in clients}
            print(mode, json.dumps(results[mode]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    top = str(max(clients))
    on, off = results["on"][top], results["off"][top]
    ratios = {
        "throughput_on_over_off": round(on["rps"] / off["rps"], 2),
        "p99_on_over_off": round(on["p99_ms"] / off["p99_ms"], 2),
    }
    out = {
        "benchmark": "serve",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": args.device},
        "setup": {
            "predictor": args.size,
            "max_new_tokens": args.max_new_tokens,
            "requests_per_client": args.requests,
            "max_batch_size": 32,
            "replicas_per_deployment": 1,
            "request": "CC record, one 64x48 JPEG as data: URI; captioner + 2 judges + predictor",
        },
        "results": results,
        f"at_{top}_clients": ratios,
        "target": {"throughput_on_over_off": ">= 3", "p99_on_over_off": "<= 2"},
        "target_met": ratios["throughput_on_over_off"] >= 3 and ratios["p99_on_over_off"] <= 2,
        "command": "python " + " ".join(sys.argv),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out[f"at_{top}_clients"]), "target met:", out["target_met"])


if __name__ == "__main__":
    main()
