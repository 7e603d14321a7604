"""Enrichment throughput and memory, side by side in one run. Writes JSON.

    python benchmarks/enrich.py [--images 64] [--out bench-out/enrich.json] [--device cpu|cuda]

(a) the research code's way: one image at a time (fetch, decode, caption, judge) in a Python loop;
(b) a batched plain loop without Ray (the compute limit of this machine);
(c) this job on Ray Data, with its models in split pools (a captioner pool and a judge pool overlapping) and
    in one shared pool (`model_pools: shared`: each actor runs the captioner, then the judge, as (b) does).
    Throughput of (c) is marginal (runs at N and 2N images: the difference cancels start-up), and also
    reported end to end.
Memory: peak RSS of the whole process tree of the job at N and 10N records (tiny models).
Judges: logits vs generate mode on the same questions.
The captioner is a random-weight LLaVA big enough that compute dominates (built offline; `--size`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_bench_models(out: Path, size: str) -> dict[str, str]:
    """A bigger random LLaVA captioner and Llama LM on the tiny tokenizer."""
    import torch
    from transformers import (
        AutoProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from caslie_core.models.tiny import ensure_tiny_models

    tiny = ensure_tiny_models()
    if (out / "DONE").exists():
        return {"captioner": str(out / "captioner"), "lm": str(out / "lm"), "image_size": 64}
    dims = {"small": (256, 4, 4), "medium": (512, 6, 8), "large": (1024, 8, 16)}[size]
    hidden, layers, heads = dims
    torch.manual_seed(0)
    proc = AutoProcessor.from_pretrained(tiny["captioner"])
    tok = proc.tokenizer
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    image_size, patch = 64, 8
    vision = CLIPVisionConfig(
        hidden_size=hidden // 2,
        intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads // 2,
        image_size=image_size,
        patch_size=patch,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(image_size // patch) ** 2,
        pad_token_id=tok.pad_token_id,
    )
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = None  # random weights: always generate the full length
    model.save_pretrained(out / "captioner")
    proc.image_processor.size = {"shortest_edge": image_size}
    proc.image_processor.crop_size = {"height": image_size, "width": image_size}
    proc.patch_size = patch
    proc.save_pretrained(out / "captioner")
    lm = LlamaForCausalLM(text)
    lm.generation_config.pad_token_id = tok.pad_token_id
    lm.generation_config.eos_token_id = None
    lm.save_pretrained(out / "lm")
    tok.save_pretrained(out / "lm")
    (out / "DONE").write_text("ok")
    return {"captioner": str(out / "captioner"), "lm": str(out / "lm"), "image_size": image_size}


def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakSampler:
    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.pid, self.every, self.peak, self._stop = pid, every, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            time.sleep(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def raw_rows(jsonl: str, limit: int | None = None) -> list[dict]:
    rows = [{"text": line} for line in open(jsonl)]
    return rows[:limit] if limit else rows


def count_images(rows) -> int:
    return sum(len(json.loads(json.loads(r["text"])["images"])) for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64, help="images per throughput run (N)")
    ap.add_argument("--size", default="medium", choices=["small", "medium", "large"])
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--memory-records", type=int, default=100, help="N for the memory test (10N also runs)")
    ap.add_argument("--judge-questions", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default="bench-out/enrich-work")
    ap.add_argument("--out", default="bench-out/enrich.json")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides for the (c) job runs (e.g. captioner.pool.num_cpus=1)",
    )
    args = ap.parse_args()

    import torch

    from caslie_core.config import EnrichConfig, load_config
    from caslie_core.enrichment import pipeline
    from caslie_core.images import FetchPolicy
    from caslie_core.models.captioner import Captioner
    from caslie_core.models.judge import Judge
    from caslie_core.synthetic import write_catalog

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    models = build_bench_models(work / f"models-{args.size}", args.size)
    size = models["image_size"]
    # Single-image tasks only, so N records = N images.
    cat = write_catalog(work / "catalog", args.images * 2, seed=7, tasks=["CC", "AP", "SA", "MPC", "PSI"])
    rows_n, rows_2n = raw_rows(cat["jsonl"], args.images), raw_rows(cat["jsonl"])
    n_images = count_images(rows_n)
    policy = FetchPolicy(allow_local_files=True)
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "captioner": {"size": args.size, "image_size": size, "max_new_tokens": args.max_new_tokens},
        "images": n_images,
    }
    micro = 16
    captioner_1 = Captioner(models["captioner"], max_new_tokens=args.max_new_tokens, batch_size=1, device=args.device)
    captioner_b = Captioner(
        models["captioner"], max_new_tokens=args.max_new_tokens, batch_size=micro, device=args.device
    )
    judge = Judge(models["lm"], mode="logits", batch_size=micro, device=args.device)
    prov = {"run_id": "bench"}

    # warm-up (first generate call compiles kernels / allocates)
    pipeline.run_local(
        rows_n[:2],
        policy=policy,
        captioner=captioner_b,
        judges={"j": judge},
        size=size,
        max_pixels=10**8,
        provenance=prov,
        batch=2,
    )

    t = time.perf_counter()  # (a) one image at a time, no dedup cache
    pipeline.run_local(
        rows_n,
        policy=policy,
        captioner=captioner_1,
        judges={"j": judge},
        size=size,
        max_pixels=10**8,
        provenance=prov,
        batch=1,
        cache=_NoCache(),
    )
    a = time.perf_counter() - t
    t = time.perf_counter()  # (b) batched plain loop
    pipeline.run_local(
        rows_n,
        policy=policy,
        captioner=captioner_b,
        judges={"j": judge},
        size=size,
        max_pixels=10**8,
        provenance=prov,
        batch=micro * 2,
        cache=_NoCache(),
    )
    b = time.perf_counter() - t
    results["a_one_at_a_time"] = {"seconds": round(a, 3), "images_per_s": round(n_images / a, 3)}
    results["b_batched_loop"] = {"seconds": round(b, 3), "images_per_s": round(n_images / b, 3)}
    del captioner_1, captioner_b

    # (c) the Ray job at N and 2N images
    from ray_jobs import enrich

    def job_cfg(n_rows, out, pools):
        path = work / f"records-{n_rows}.jsonl"
        path.write_text("".join(r["text"] for r in rows_2n[:n_rows]))
        gpu = 1 if torch.cuda.is_available() else 0
        return load_config(
            EnrichConfig,
            ROOT / "configs" / "enrich-demo.yaml",
            [
                f"input.path={path}",
                f"output.path={out}",
                f"captioner.model={models['captioner']}",
                f"captioner.max_new_tokens={args.max_new_tokens}",
                f"captioner.micro_batch={micro}",
                f"captioner.pool.batch_size={micro * 2}",
                f"captioner.pool.num_gpus={gpu}",
                "captioner.pool.num_cpus=2",
                f"model_pools={pools}",
                f"judges=[{{name: j, model: {models['lm']}, mode: logits, micro_batch: {micro}"
                + (
                    "}]"
                    if pools == "shared"
                    else f", pool: {{num_cpus: 1, batch_size: {micro * 2}, num_gpus: {0.5 * gpu}}}}}]"
                ),
                f"decode.image_size={size}",
                f"records_per_batch={micro}",
                "ray.num_cpus=4",
                *args.overrides,
            ],
        )

    import shutil

    import ray

    n_2 = count_images(rows_2n)
    results["ratios"] = {"b_over_a": round(a / b, 3), "targets": {"c_over_b": 0.9, "c_over_a": 10.0}}
    for pools in ("split", "shared"):  # the two pool layouts, side by side in this run
        timings = {}
        for label, n_rows in (("N", args.images), ("2N", args.images * 2)):
            out = work / f"job-{pools}-{label}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            summary = enrich.run(job_cfg(n_rows, out, pools))
            timings[label] = time.perf_counter() - t
            assert summary["records"] == n_rows
            if ray.is_initialized():
                ray.shutdown()
        delta = timings["2N"] - timings["N"]
        # With too few images the difference is inside start-up noise: report end-to-end only.
        marginal = (n_2 - n_images) / delta if delta > 0.2 * timings["N"] else float("nan")
        key = "c_ray_job" if pools == "split" else "c_ray_job_shared"
        results[key] = {
            "model_pools": pools,
            "seconds_N": round(timings["N"], 3),
            "seconds_2N": round(timings["2N"], 3),
            "images_per_s_end_to_end_N": round(n_images / timings["N"], 3),
            "images_per_s_marginal": None if marginal != marginal else round(marginal, 3),
        }
        suffix = "" if pools == "split" else "_shared"
        results["ratios"][f"c{suffix}_marginal_over_b"] = _ratio(marginal, results["b_batched_loop"]["images_per_s"])
        results["ratios"][f"c{suffix}_marginal_over_a"] = _ratio(marginal, results["a_one_at_a_time"]["images_per_s"])

    # Judge modes on the same questions
    lm_judge_gen = Judge(models["lm"], mode="generate", max_new_tokens=16, batch_size=micro, device=args.device)
    questions = [
        f"A model must identify a product's category. Product title: 'Acme phone {i}'. Information "
        f"extracted from the product image: 'a black phone'. Will the information help? Answer only "
        f"yes or no."
        for i in range(args.judge_questions)
    ]
    judge.vote(questions[:micro])
    t = time.perf_counter()
    judge.vote(questions)
    lg = time.perf_counter() - t
    t = time.perf_counter()
    lm_judge_gen.vote(questions)
    gen = time.perf_counter() - t
    results["judge"] = {
        "questions": len(questions),
        "logits_s": round(lg, 3),
        "generate_s": round(gen, 3),
        "generate_over_logits": round(gen / lg, 2),
        "target": 5.0,
    }

    if not args.skip_memory:  # tiny models: memory, not compute, is the question here
        mem = {}
        for label, n in (("N", args.memory_records), ("10N", args.memory_records * 10)):
            mcat = write_catalog(work / f"mem-{label}", n, seed=3)
            out = work / f"mem-out-{label}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = load_config(
                EnrichConfig,
                ROOT / "configs" / "enrich-demo.yaml",
                [f"input.path={mcat['jsonl']}", f"output.path={out}"],
            )
            with PeakSampler(os.getpid()) as sampler:
                t = time.perf_counter()
                s = enrich.run(cfg)
                elapsed = time.perf_counter() - t
            mem[label] = {
                "records": n,
                "images": s["images"],
                "peak_rss_mb": round(sampler.peak / 2**20, 1),
                "seconds": round(elapsed, 2),
            }
        mem["ratio_10N_over_N"] = round(mem["10N"]["peak_rss_mb"] / mem["N"]["peak_rss_mb"], 3)
        mem["target"] = 1.25
        results["memory"] = mem

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def _ratio(x, y):
    return None if x != x else round(x / y, 3)


class _NoCache:
    """Disables de-duplication so that the baselines caption every image."""

    def claim(self, keys, owner):
        return {k: ("mine", None) for k in keys}

    def put(self, items, owner):
        pass

    def release(self, keys, owner):
        pass


if __name__ == "__main__":
    main()
