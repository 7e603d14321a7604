"""Serving: what our app costs over a bare Serve deployment, time to first token, and batching. Writes JSON.

    python benchmarks/serve.py [--parts hops,ttft,batching] [--clients 1,8,32] [--requests 6]

All parts run on one local Ray, side by side, so the figures are ratios measured in one run:
- hops: a bare Serve echo (FastAPI, one replica, through the same proxy) against the whole app, tiny models,
  in layout `split` (a deployment per model), `colocated` (one Models replica; and two of them, one per core) and
  `single` (the models in the ingress replica: no deployment call; one and two replicas), at 1/8/32 clients. Each app
  request is `/v1/predict` with a category-classification record and one image (decode, caption, two judges,
  answer); the echo makes 10 times `--requests` per client and the app 3 times, so that each rate is measured over
  a second or more, and the echo is measured again after the apps at the top client count (its rate moves from
  run to run: 460-710 req/s here): the ratios use the faster of the two. Also where the time goes: the app's own
  per-stage times (`timings_ms`), what is left for the proxy, the ingress and the HTTP round trip, and the CPU per
  request of each process (proxy, each deployment's replicas, the load generator, the rest of Ray; psutil) against
  what 0.4 of the echo's rate leaves (on the machine, and in one process: about one core), and what the models
  alone cost per request (Ray-free, one thread, alone and in batches of the top client count).
- ttft: chat completions of 32 tokens with each `--ttft-sizes` predictor (default medium and large, random-weight
  Llamas, see benchmarks/train.py), text only, layout `--ttft-layout` (single), `batching.wait_timeout_s: 0` (a
  request that finds the replica idle starts at once): time to the first content chunk streamed, against the
  whole answer's latency streamed and not, at 1/8/32 clients.
- batching: the medium predictor, `/v1/predict`, batching (`Gather`) on vs off (batches of one) at the top client
  count, layout split (`--batching-layout`); one replica per deployment; the predictor's replica at 1 and at 2 CPUs
  (Ray gives it as many torch threads). The ratio at equal threads, next to the Ray-free ceiling at those threads
  (time per answer alone over in a full batch, on the same prompt), and each mode at its best (the check).
Targets (issues 18 and 37, this 2-core machine): ttft p50 at 1 client <= 0.2 of the full answer; batching on/off
>= 2x at 32 clients; at the top client count, the app's CPU per request beyond what its models alone cost
(`models_alone`, batches of that size) <= 1.5x the bare echo's CPU per request, in the best layout (issue 37
restated the earlier "0.4 of the echo's req/s", which the models alone make unreachable on 2 cores).
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` annotation of the echo route.
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
}.items():
    os.environ.setdefault(k, v)
# No OMP_NUM_THREADS here: Ray sets it in each replica from its num_cpus (floor, at least 1), as on a user's cluster;
# the 0.25-CPU replicas get one torch thread, the batching part's predictor one or two.

PORT = 8123
ECHO_MORE, APP_MORE = 10, 3  # hops: requests per client times these, so each rate is measured over a second or more
RECORD = {
    "task": "CC",
    "instruction": "Given a product title, choose the product's category from the options.",
    "input": {"title": "Polar green mug"},
    "options": ["A: Electronics", "B: Kitchen", "C: Toys", "D: Garden"],
}
CHAT = [{"role": "user", "content": "Describe a polar green mug for a kitchen catalog in one sentence."}]


def image_uri() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 140, 60)).save(buf, "JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))] * 1000, 1) if s else None


def process_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds used so far by this machine's processes, by pid with its role: the Serve proxy, a deployment's
    replica (by deployment name), this process (the load generator) or the rest of Ray (psutil, as the other
    benchmarks measure processes)."""
    import psutil

    out: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        cmd, times = " ".join(proc.info["cmdline"] or []), proc.info["cpu_times"]
        if times is None:
            continue
        if proc.info["pid"] == os.getpid():
            role = "client"
        elif cmd.startswith("ray::ProxyActor"):
            role = "proxy"
        elif cmd.startswith("ray::ServeReplica:"):
            role = cmd.split()[0].split(":")[-1].split(".")[0]  # ray::ServeReplica:APP:DEPLOYMENT[.method]
        elif "ray" in cmd:
            role = "ray_other"
        else:
            continue
        out[proc.info["pid"]] = (role, times.user + times.system)
    return out


def cpu_used(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds by role between two `process_cpu` snapshots (processes alive at both)."""
    used: dict[str, float] = {}
    for pid, (role, secs) in after.items():
        if pid in before:
            used[role] = used.get(role, 0.0) + secs - before[pid][1]
    return used


async def load(url: str, body: dict, clients: int, per_client: int, *, stream: bool = False) -> dict:
    """`clients` concurrent clients, `per_client` requests each, after a warm-up. Streaming: the time to the
    first content chunk too. Also the CPU each role used per request (`process_cpu`) while it ran."""
    import aiohttp

    lat, first, codes, stages = [], [], {}, []

    async def one(session) -> None:
        t = time.perf_counter()
        async with session.post(url, json=body) as r:
            codes[r.status] = codes.get(r.status, 0) + 1
            if stream:
                seen = False
                async for line in r.content:
                    if (
                        not seen
                        and line.startswith(b"data: {")
                        and b'"content": "' in line
                        and b'"content": ""' not in line
                    ):
                        first.append(time.perf_counter() - t)
                        seen = True
            else:
                data = await r.read()
                if r.status == 200 and b"timings_ms" in data:
                    stages.append(json.loads(data)["timings_ms"])
        lat.append(time.perf_counter() - t)

    async def client(session) -> None:
        for _ in range(per_client):
            await one(session)

    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=900), connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        await asyncio.gather(*(client(session) for _ in range(min(clients, 4))))  # warm-up
        lat.clear(), first.clear(), codes.clear(), stages.clear()
        cpu0, t0 = process_cpu(), time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - t0
        cpu = cpu_used(cpu0, process_cpu())
    out = {
        "clients": clients,
        "requests": len(lat),
        "codes": codes,
        "rps": round(len(lat) / wall, 2),
        "p50_ms": pct(lat, 0.5),
        "p99_ms": pct(lat, 0.99),
    }
    if stream:
        out.update(ttft_p50_ms=pct(first, 0.5), ttft_p99_ms=pct(first, 0.99))
    if cpu:
        used = {k: v for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v > 0}
        out["cpu_ms_per_request"] = {k: round(v * 1000 / max(1, len(lat)), 2) for k, v in used.items()}
        out["cpu_ms_per_request"]["all"] = round(sum(used.values()) * 1000 / max(1, len(lat)), 2)
        out["cores_busy"] = round(sum(used.values()) / wall, 2)
    if stages:
        keys = stages[0].keys()
        out["stages_ms_mean"] = {k: round(sum(s[k] for s in stages) / len(stages), 1) for k in keys}
        out["stages_ms_mean"]["outside_the_handler"] = round(
            sum(lat) / len(lat) * 1000 - out["stages_ms_mean"]["total"], 1
        )
    return out


def app_config(
    *,
    layout: str,
    predictor: str,
    max_new_tokens: int,
    batching: bool = True,
    replicas: int = 1,
    wait_s: float = 0.01,
    predictor_cpus: float = 0.25,
):
    """The app's config; `predictor_cpus`: the predictor's replica's num_cpus, so its torch threads (Ray sets
    OMP_NUM_THREADS from it); the other replicas share what is left of the machine's CPUs (0.25 each at most)."""
    from caslie_core.config import ServeConfig, load_config

    others = max(0.0, min(0.25, ((os.cpu_count() or 1) - predictor_cpus) / 4))

    def dep(cpus: float) -> str:
        return (
            f"{{num_cpus: {cpus}, max_ongoing_requests: 256, max_queued_requests: -1, "
            f"autoscaling: {{min_replicas: {replicas}, max_replicas: {replicas}}}, "
            f"batching: {{enabled: {str(batching).lower()}, max_batch_size: 32, wait_timeout_s: {wait_s}}}}}"
        )

    return load_config(
        ServeConfig,
        ROOT / "configs" / "serve-demo.yaml",
        [
            f"http.port={PORT}",
            f"http.ingress={{num_cpus: {others}, max_ongoing_requests: 256, max_queued_requests: -1}}",
            "model.path=null",
            f"model.model={predictor}",
            "model.serve_base=false",
            "model.name=bench",
            f"model.max_new_tokens={max_new_tokens}",
            f"layout={layout}",
            f"model.deployment={dep(predictor_cpus)}",
            f"captioner.deployment={dep(others)}",
            f"judges.0.deployment={dep(others)}",
            f"judges.1.deployment={dep(others)}",
            "ray.num_cpus=null",
        ],
    )


def echo_app():
    """The floor: a FastAPI deployment that reads the JSON body and answers it, one replica."""
    from fastapi import FastAPI, Request
    from ray import serve

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
    @serve.ingress(api)
    class Echo:
        @api.post("/v1/predict")
        async def predict(self, request: Request):
            return {"echo": await request.json()}

    return Echo.bind()


def run_app(cfg, fn):
    from ray import serve

    from ray_jobs.serve import start

    url = start(cfg)
    try:
        return fn(url)
    finally:
        serve.delete("caslie")


def part_hops(clients, per_client) -> dict:
    from ray import serve

    body = {**RECORD, "images": [image_uri()]}
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})

    def echo(counts) -> dict:
        serve.run(echo_app(), name="echo", route_prefix="/")
        url = f"http://127.0.0.1:{PORT}/v1/predict"
        res = {str(c): asyncio.run(load(url, body, c, per_client * ECHO_MORE)) for c in counts}
        serve.delete("echo")
        print("echo", json.dumps(res), flush=True)
        return res

    out = {"echo": echo(clients)}
    variants = {
        "split": ("split", 1),
        "colocated": ("colocated", 1),
        "colocated_2_replicas": ("colocated", 2),
        "single": ("single", 1),
        "single_2_replicas": ("single", 2),
    }
    for name, (layout, replicas) in variants.items():
        cfg = app_config(layout=layout, predictor="tiny:lm", max_new_tokens=16, replicas=replicas)
        out[name] = run_app(
            cfg,
            lambda url: {
                str(c): asyncio.run(load(url + "/v1/predict", body, c, per_client * APP_MORE)) for c in clients
            },
        )
        print(name, json.dumps(out[name]), flush=True)
    top = str(max(clients))
    # the echo again after the apps (its rate moves from run to run): the ratios use the faster of the two
    out["echo_after"] = echo([max(clients)])
    floor = max(out["echo"], out["echo_after"], key=lambda e: e[top]["rps"])[top]
    out["at_top_clients"] = {
        f"{name}_over_echo_rps": round(out[name][top]["rps"] / floor["rps"], 3) for name in variants
    }
    # what the rest costs: CPU per request by process against what 0.4 of the echo's rate leaves on this machine
    out["cpu_at_top_clients"] = {
        "ms_per_request": {
            "echo": floor.get("cpu_ms_per_request"),
            **{name: out[name][top].get("cpu_ms_per_request") for name in variants},
        },
        "budget_ms_per_request_for_0.4_of_echo": round((os.cpu_count() or 1) * 1000 / (0.4 * floor["rps"]), 2),
        # one process (one interpreter lock) is held to about a core: its budget at 0.4 of the echo's rate
        "one_process_budget_ms_per_request": round(1000 / (0.4 * floor["rps"]), 2),
        "models_alone": models_alone(int(top)),
    }
    # the restated target (issue 37): per request, what the app's processes spend beyond its models' own compute
    # (Ray-free, batches of the top client count), over what the bare echo's spend
    models_ms = out["cpu_at_top_clients"]["models_alone"][f"batch_{top}"]["all"]
    echo_ms = floor["cpu_ms_per_request"]["all"]
    out["cpu_beyond_models_over_echo"] = {
        name: round((out[name][top]["cpu_ms_per_request"]["all"] - models_ms) / echo_ms, 3) for name in variants
    }
    return out


def models_alone(rows: int) -> dict:
    """Ray-free, in this process, one torch thread (as the 0.25-CPU replicas have): what the hops part's tiny models
    cost per request on the app's own prompts (RECORD, its image decoded as the ingress does), alone and in
    batches of `rows` (what layout single reaches at the top client count): the captioner, both judges, the
    predictor; the rest of a request's CPU is the service's."""
    import torch

    from caslie_core import serving as sv
    from caslie_core.images.decode import decode_image
    from caslie_core.models.predictor import AdapterPredictor
    from caslie_core.models.registry import build_captioner, build_judge
    from caslie_core.serving.spec import app_spec

    cfg = app_config(layout="single", predictor="tiny:lm", max_new_tokens=16)
    spec = app_spec(cfg)
    record = sv.to_record(sv.parse_body(json.dumps({**RECORD, "images": [image_uri()]}).encode(), sv.PredictRequest))
    slots = sv.record_slots(record)
    pixels = decode_image(base64.b64decode(image_uri().split(",", 1)[1]), size=cfg.captioner.image_size)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        captioner = build_captioner(cfg.captioner, batch_size=rows)
        judges = [build_judge(j, batch_size=rows) for j in cfg.judges]
        predictor = AdapterPredictor.from_spec(spec["predictor"], batch_size=rows)
        sv.caption_outcome(slots[0], vars(captioner.caption([pixels], [slots[0].prompt])[0]))  # the app's caption
        slots[0].caption = slots[0].caption or "a green ceramic mug"  # (random weights may caption nothing)
        question = sv.record_questions(record, slots)[0]
        prompt = sv.record_prompt(record, slots, style=spec["style"])
        stages = {
            "caption": lambda n: captioner.caption([pixels] * n, [slots[0].prompt] * n),
            **{f"judge_{j.name}": (lambda n, m=m: m.vote([question] * n)) for j, m in zip(cfg.judges, judges)},
            "answer": lambda n: predictor.answer([prompt] * n),
        }
        per: dict = {}
        for n in (1, rows):
            for name, run in stages.items():
                run(n)  # warm-up
                t, rounds = time.process_time(), max(2, 16 // n)
                for _ in range(rounds):
                    run(n)
                per.setdefault(n, {})[name] = (time.process_time() - t) / rounds / n * 1000
    finally:
        torch.set_num_threads(before)
    return {
        f"batch_{n}": {"ms_per_request": {k: round(v, 2) for k, v in by.items()}, "all": round(sum(by.values()), 2)}
        for n, by in per.items()
    }


def part_ttft(clients, per_client, predictor: str, layout: str) -> dict:
    # latency tuning: a request that finds the replica idle starts at once (no batch window)
    cfg = app_config(layout=layout, predictor=predictor, max_new_tokens=32, wait_s=0.0)
    body = {"model": "bench", "messages": CHAT, "max_tokens": 32}

    def measure(url):
        res = {}
        for c in clients:
            streamed = asyncio.run(
                load(url + "/v1/chat/completions", {**body, "stream": True}, c, per_client, stream=True)
            )
            whole = asyncio.run(load(url + "/v1/chat/completions", body, c, per_client))
            res[str(c)] = {"streamed": streamed, "not_streamed": whole}
            print("ttft", c, json.dumps(res[str(c)]), flush=True)
        return res

    out = run_app(cfg, measure)
    one = out[str(min(clients))]
    out["at_1_client"] = {
        "ttft_over_full_answer_p50": round(one["streamed"]["ttft_p50_ms"] / one["not_streamed"]["p50_ms"], 3)
    }
    return out


def batching_ceiling(predictor: str, rows: int, threads: int, max_new_tokens: int = 16) -> dict:
    """Ray-free, in this process: the predictor's time per answer alone and in a batch of `rows`, with `threads`
    torch threads, on RECORD's instruction prompt with a caption in its input (the app's prompt up to the caption's
    text): the most batching can buy here."""
    import torch

    from caslie_core.models.predictor import AdapterPredictor
    from caslie_core.prompts import instruction_prompt

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = AdapterPredictor(predictor, max_new_tokens=max_new_tokens, batch_size=rows)
        fields = {**RECORD["input"], "caption": "a green ceramic mug with a handle on a white table"}
        prompt = instruction_prompt(RECORD["instruction"], fields, RECORD["options"])
        model.answer([prompt] * 2)  # warm-up (and the template head's cache)
        per = {}
        for n in (1, rows):
            t, rounds = time.perf_counter(), max(2, 16 // n)
            for _ in range(rounds):
                model.answer([prompt] * n)
            per[n] = (time.perf_counter() - t) / rounds / n * 1000
    finally:
        torch.set_num_threads(before)
    return {
        "threads": threads,
        "ms_per_answer_alone": round(per[1], 1),
        f"ms_per_answer_in_{rows}": round(per[rows], 1),
        "ceiling": round(per[1] / per[rows], 2),
    }


def part_batching(clients, per_client, predictor: str, layout: str) -> dict:
    """On vs off with the predictor's replica at 1 and at 2 CPUs (so 1 or 2 torch threads): the ratio at equal
    threads (against the Ray-free ceiling at those threads), and each mode at its best."""
    body = {**RECORD, "images": [image_uri()]}
    top = max(clients)
    cpus = os.cpu_count() or 1
    out: dict = {}
    for threads in sorted({1, min(2, cpus)}):
        res: dict = {"threads": threads}
        for mode in ("on", "off"):
            cfg = app_config(
                layout=layout, predictor=predictor, max_new_tokens=16, batching=mode == "on", predictor_cpus=threads
            )
            res[mode] = run_app(cfg, lambda url: asyncio.run(load(url + "/v1/predict", body, top, per_client)))
            print("batching", threads, mode, json.dumps(res[mode]), flush=True)
        res["throughput_on_over_off"] = round(res["on"]["rps"] / res["off"]["rps"], 2)
        res["ray_free"] = batching_ceiling(predictor, top, threads)
        print("batching", threads, "ray-free", json.dumps(res["ray_free"]), flush=True)
        out[f"predictor_threads_{threads}"] = res
    best = {m: max(out.values(), key=lambda r: r[m]["rps"]) for m in ("on", "off")}
    out[f"at_{top}_clients"] = {
        "on_best_rps": best["on"]["on"]["rps"],
        "on_best_threads": best["on"]["threads"],
        "off_best_rps": best["off"]["off"]["rps"],
        "off_best_threads": best["off"]["threads"],
        "throughput_on_over_off": round(best["on"]["on"]["rps"] / best["off"]["off"]["rps"], 2),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="hops,ttft,batching")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=6, help="requests per client")
    parser.add_argument("--ttft-sizes", default="medium,large", help="predictor sizes for the ttft part")
    parser.add_argument("--ttft-layout", default="single", choices=["split", "panel", "colocated", "single"])
    parser.add_argument("--batching-size", default="medium", choices=["tiny", "small", "medium", "large"])
    parser.add_argument("--batching-layout", default="split", choices=["split", "panel", "colocated"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve-cpu-2core.json"))
    args = parser.parse_args()

    import ray
    from ray import serve

    from caslie_core.models.tiny import ensure_tiny_models

    ensure_tiny_models()
    sys.path.insert(0, str(ROOT / "benchmarks"))

    def model(size: str) -> str:
        if size == "tiny":
            return "tiny:lm"
        from train import build_model

        return build_model(Path(os.environ.get("CASLIE_CACHE", "/tmp/caslie-bench")), size)

    clients = [int(c) for c in args.clients.split(",")]
    parts = args.parts.split(",")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    results: dict = {}
    t0 = time.time()
    try:
        if "hops" in parts:
            results["hops"] = part_hops(clients, args.requests)
        if "ttft" in parts:
            results["ttft"] = {
                size: part_ttft(clients, args.requests, model(size), args.ttft_layout)
                for size in args.ttft_sizes.split(",")
            }
        if "batching" in parts:
            results["batching"] = part_batching(
                clients, max(2, args.requests // 2), model(args.batching_size), args.batching_layout
            )
    finally:
        serve.shutdown()
        ray.shutdown()
    checks = {}
    if "hops" in results:
        # the app's CPU per request beyond what its models alone cost, over the bare echo's, in the best layout
        checks["app_cpu_beyond_models_over_echo_at_top"] = min(results["hops"]["cpu_beyond_models_over_echo"].values())
    if "ttft" in results:
        for size, res in results["ttft"].items():
            checks[f"ttft_over_full_answer_p50_at_1_{size}"] = res["at_1_client"]["ttft_over_full_answer_p50"]
    if "batching" in results:
        checks["batching_on_over_off"] = next(v for k, v in results["batching"].items() if k.startswith("at_"))[
            "throughput_on_over_off"
        ]
    targets = {
        "app_cpu_beyond_models_over_echo_at_top": ("<= 1.5", lambda v: v <= 1.5),
        "batching_on_over_off": (">= 2", lambda v: v >= 2),
        **{k: ("<= 0.2", lambda v: v <= 0.2) for k in checks if k.startswith("ttft")},
    }
    out = {
        "benchmark": "serve",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": "cpu"},
        "setup": {
            "clients": clients,
            "requests_per_client": args.requests,
            "ttft_predictors": args.ttft_sizes,
            "batching_predictor": args.batching_size,
            "ttft_layout": args.ttft_layout,
            "batching_layout": args.batching_layout,
            "replicas_per_deployment": 1,
        },
        "results": results,
        "checks": checks,
        "targets": {k: targets[k][0] for k in checks},
        "targets_met": {k: targets[k][1](v) for k, v in checks.items()},
        "wall_s": round(time.time() - t0, 1),
        "command": "python " + " ".join(sys.argv),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"checks": checks, "targets_met": out["targets_met"]}))


if __name__ == "__main__":
    main()
