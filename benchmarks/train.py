"""Training throughput: this job on Ray Train against a plain single-process peft loop, side by side. Writes JSON.

    python benchmarks/train.py [--size medium] [--records 600] [--workers 2] [--device cpu|cuda]

(a) plain loop: one process, the same model, LoRA, data, batch size, max length and optimizer, no Ray;
    on CPU it gets one thread, the share of one worker;
(b) this job (`ray_jobs.train.run`) with `--workers` data-parallel workers;
(c) on CPU, `--workers` plain loops at once in separate processes: the same contention for cores and
    memory bandwidth as the job's workers, so (b)/(c) isolates what Ray Train itself costs.
Both count real (non-padding) tokens from the end of the first optimizer step (start-up excluded).
Target: per-worker tokens/s of (b) >= 0.9 x (a).
The model is a random-weight Llama on the tiny tokenizer (`--size small|medium|large`, or `3b` with the
dimensions of Llama-3.2-3B for a GPU machine), built offline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for k, v in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}.items():
    os.environ.setdefault(k, v)

SIZES = {  # hidden, layers, heads, kv heads, intermediate
    "small": (256, 4, 4, 4, 768),
    "medium": (512, 6, 8, 8, 1536),
    "large": (1024, 8, 16, 16, 3072),
    "3b": (3072, 28, 24, 8, 8192),
}


def build_model(out: Path, size: str) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from caslie_core.models.tiny import ensure_tiny_models

    path = out / f"lm-{size}"
    if (path / "config.json").exists():
        return str(path)
    tok = AutoTokenizer.from_pretrained(ensure_tiny_models()["tokenizer"])
    hidden, layers, heads, kv, inter = SIZES[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def plain_loop(
    model_path: str,
    rows: list[dict],
    *,
    batch_size: int,
    max_length: int,
    epochs: int,
    device: str,
    threads: int | None,
) -> dict:
    """A single-process peft loop: the baseline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from caslie_core.models.loading import pick_dtype
    from caslie_core.training import data as T
    from caslie_core.training import lora as L
    from caslie_core.training import recipe as R

    if threads:
        torch.set_num_threads(threads)
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=pick_dtype("auto", dev)).to(dev)
    model.config.use_cache = False
    model = L.apply_lora(model, r=16, alpha=16, dropout=0.1, target_modules=list(L.DEFAULT_LORA_TARGETS))
    model.train()
    exs = [T.training_example(r) for r in rows if r["split"] == "train"]
    enc = [T.tokenize_example(tok, e.prompt, e.response, max_length) for e in exs]
    opt = R.make_optimizer(model, lr=1e-4, weight_decay=0.0)
    steps = epochs * ((len(enc) + batch_size - 1) // batch_size)
    sched = R.make_scheduler(opt, kind="cosine", warmup_steps=int(0.05 * steps), total_steps=steps)
    t_first, tokens, step = None, 0, 0
    for _ in range(epochs):
        for i in range(0, len(enc), batch_size):
            chunk = enc[i : i + batch_size]
            b = T.collate([c[0] for c in chunk], [c[1] for c in chunk], tok.pad_token_id, device=dev)
            loss, n = R.micro_batch_loss(model, b)
            (loss / max(n, 1)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            step += 1
            if t_first is None:
                t_first = time.time()
            else:
                tokens += int(b["attention_mask"].sum())
    wall = time.time() - t_first
    return {
        "steps": step,
        "tokens_timed": tokens,
        "seconds_timed": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "device": dev,
        "threads": threads,
    }


def job(
    model_path: str,
    data: str,
    work: Path,
    *,
    workers: int,
    batch_size: int,
    max_length: int,
    epochs: int,
    gpu: bool,
    cpus_per_worker: float,
) -> dict:
    from caslie_core.config import TrainConfig, load_config
    from ray_jobs import train

    cfg = load_config(
        TrainConfig,
        ROOT / "configs" / "train-demo.yaml",
        [
            f"model.model={model_path}",
            f"input.path={data}",
            f"run.storage_path={work / 'runs'}",
            f"output.path={work / f'model-{workers}'}",
            f"run.name=bench-{workers}-{int(time.time())}",
            f"scaling.num_workers={workers}",
            f"scaling.use_gpu={str(gpu).lower()}",
            f"scaling.cpus_per_worker={cpus_per_worker}",
            f"optim.batch_size={batch_size}",
            f"optim.epochs={epochs}",
            f"data.max_length={max_length}",
            "eval.enabled=false",
            "checkpoint.every_steps=100000",
            "lora.modules_to_save=[]",
            "lora.alpha=16",
            "lora.dropout=0.1",
            "optim.lr=1e-4",
            "model.dtype=auto",
            "ray.num_cpus=null" if gpu else f"ray.num_cpus={os.cpu_count()}",
        ],
    )
    t = time.time()
    s = train.run(cfg)
    return {
        "workers": workers,
        "steps": s["steps"],
        "tokens_per_s": round(s["tokens_per_s"], 1),
        "tokens_per_s_per_worker": round(s["tokens_per_s"] / workers, 1),
        "wall_seconds": round(time.time() - t, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="medium", choices=list(SIZES))
    ap.add_argument("--records", type=int, default=600)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--work", default="bench-out/train-work")
    ap.add_argument("--out", default="bench-out/train.json")
    args = ap.parse_args()

    from caslie_core.synthetic import write_catalog

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_path = build_model(work, args.size)
    write_catalog(work / "catalog", args.records, seed=0, splits={"train": 0.9, "val": 0.1})
    data = str(work / "catalog" / "records.jsonl")
    rows = [json.loads(line) for line in open(data)]
    gpu = args.device == "cuda"
    ncpu = os.cpu_count() or 2
    per_worker_cpus = max(0.5, (ncpu - 0.5) / args.workers) if not gpu else 4
    threads = None if gpu else max(1, int(per_worker_cpus))
    plain = plain_loop(
        model_path,
        rows,
        batch_size=args.batch_size,
        max_length=args.max_length,
        epochs=args.epochs,
        device=args.device,
        threads=threads,
    )
    print(f"[bench] plain loop: {plain['tokens_per_s']} tokens/s")
    concurrent = None
    if not gpu and args.workers > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
            futs = [
                pool.submit(
                    plain_loop,
                    model_path,
                    rows,
                    batch_size=args.batch_size,
                    max_length=args.max_length,
                    epochs=args.epochs,
                    device=args.device,
                    threads=threads,
                )
                for _ in range(args.workers)
            ]
            runs = [f.result() for f in futs]
        concurrent = {
            "processes": args.workers,
            "tokens_per_s_each": [r["tokens_per_s"] for r in runs],
            "mean_tokens_per_s": round(sum(r["tokens_per_s"] for r in runs) / len(runs), 1),
        }
        print(f"[bench] {args.workers} plain loops at once: {concurrent['mean_tokens_per_s']} tokens/s each")
    ray_job = job(
        model_path,
        data,
        work,
        workers=args.workers,
        batch_size=args.batch_size,
        max_length=args.max_length,
        epochs=args.epochs,
        gpu=gpu,
        cpus_per_worker=per_worker_cpus,
    )
    print(f"[bench] job x{args.workers}: {ray_job['tokens_per_s']} tokens/s")
    ratio = ray_job["tokens_per_s_per_worker"] / plain["tokens_per_s"]
    result = {
        "benchmark": "train",
        "machine": {"cpus": ncpu, "device": args.device},
        "model": {
            "size": args.size,
            "dims": dict(zip(["hidden", "layers", "heads", "kv_heads", "intermediate"], SIZES[args.size])),
        },
        "settings": {
            "records": args.records,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "epochs": args.epochs,
            "lora": "r16 alpha16 all projections",
        },
        "plain_loop": plain,
        "job": ray_job,
        "plain_loops_concurrent": concurrent,
        "per_worker_over_plain": round(ratio, 3),
        "per_worker_over_concurrent_plain": round(
            ray_job["tokens_per_s_per_worker"] / concurrent["mean_tokens_per_s"], 3
        )
        if concurrent
        else None,
        "target": 0.9,
        "met": ratio >= 0.9,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
