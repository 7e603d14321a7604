"""Caption quality evaluation: judge seconds per 1,000 captions by judge preset, side by side. Writes JSON.

    python benchmarks/cqe.py [--captions 1000] [--micro-batch 32] [--repeats 5] [--device cpu]

The same questions (built from synthetic records with `prompts.judge_question` and a caption of realistic
length) go to three presets of one judge model (default `tiny:lm`, random weights):
(a) `logits`: one forward pass, yes-token vs no-token scores;
(b) `generate_strict`: greedy generation of 4 new tokens, strict yes/no parsing;
(c) `research`: the research code's judge: greedy generation of 16 new tokens, the reply cut to a ballot
    (`reply: research`) and the system message "You are a helpful AI assistant.".
Each preset is warmed up on one micro-batch first (not timed); the presets then run in turn, `--repeats`
rounds, and the median round counts. Ratios are to (a). `reply_tokens_approx`: the replies re-tokenized
(shows whether generation ran to its limit or stopped at EOS; re-tokenizing can count a few more).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CAPTION = (
    "A {colour} product photographed from the front on a plain white background. The item fills most of "
    "the frame, its outline and finish are clearly visible, and a small brand logo sits near the lower edge; "
    "no other text is legible (view {i})."
)
COLOURS = ["black", "white", "red", "blue", "green", "grey", "silver", "yellow"]


def questions(n: int, work: Path) -> list[str]:
    """`n` judge questions: one per image of synthetic records (all tasks), with a caption each."""
    from caslie_core.prompts import judge_question
    from caslie_core.records import parse_record
    from caslie_core.synthetic import write_catalog

    cat = write_catalog(work / "catalog", n, seed=11)
    out: list[str] = []
    with open(cat["jsonl"], encoding="utf-8") as fh:
        for line in fh:
            rec = parse_record(json.loads(line))
            for idx in range(len(rec.images)):
                caption = CAPTION.format(colour=COLOURS[len(out) % len(COLOURS)], i=len(out))
                out.append(judge_question(rec, idx, caption))
                if len(out) == n:
                    return out
    raise RuntimeError(f"only {len(out)} questions from {n} records")


def presets(model: str, micro: int, device: str) -> dict:
    from caslie_core.models.judge import RESEARCH_SYSTEM, Judge

    common = {"batch_size": micro, "device": device}
    specs = {
        "logits": {"mode": "logits"},
        "generate_strict": {"mode": "generate", "max_new_tokens": 4, "reply": "strict"},
        "research": {"mode": "generate", "max_new_tokens": 16, "reply": "research", "system_message": RESEARCH_SYSTEM},
    }
    return {name: (spec, Judge(model, **spec, **common)) for name, spec in specs.items()}


def machine() -> dict:
    import torch
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", type=int, default=1000, help="questions per round (one per caption)")
    ap.add_argument("--micro-batch", type=int, default=32, help="questions per forward/generate call")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds over all presets; the median counts")
    ap.add_argument("--model", default="tiny:lm", help="judge model (hub id, path, or tiny:lm)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/cqe-cpu-2core.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="cqe-bench-") as tmp:
        qs = questions(args.captions, Path(tmp))
    judges = presets(args.model, args.micro_batch, args.device)
    tok = next(iter(judges.values()))[1].tokenizer
    n_tokens = [len(ids) for ids in tok(qs, add_special_tokens=False)["input_ids"]]

    for _, judge in judges.values():  # warm-up: one micro-batch each, not timed
        judge.vote(qs[: args.micro_batch])
    runs: dict[str, list[float]] = {name: [] for name in judges}
    votes: dict[str, Counter] = {}
    reply_tokens: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, (_, judge) in judges.items():
            t = time.perf_counter()
            out = judge.vote(qs)
            runs[name].append(time.perf_counter() - t)
            votes[name] = Counter("<error>" if v.error else str(v.vote) for v in out)
            if judge.mode == "generate":  # how long the replies were (generation stops early at EOS)
                lens = [len(ids) for ids in tok([v.raw or "" for v in out], add_special_tokens=False)["input_ids"]]
                reply_tokens[name] = round(statistics.mean(lens), 2)

    per_1000 = {name: statistics.median(r) * 1000 / len(qs) for name, r in runs.items()}
    results = {
        "benchmark": "cqe judge presets",
        "machine": machine(),
        "model": args.model,
        "device": args.device,
        "captions": len(qs),
        "micro_batch": args.micro_batch,
        "repeats": args.repeats,
        "question_chars": {
            "mean": round(statistics.mean(len(q) for q in qs), 1),
            "min": min(len(q) for q in qs),
            "max": max(len(q) for q in qs),
        },
        "question_tokens_mean": round(statistics.mean(n_tokens), 1),
        "presets": {
            name: {
                **spec,
                "seconds_per_1000": round(per_1000[name], 3),
                "runs_s": [round(x, 3) for x in runs[name]],
                "votes": dict(votes[name].most_common(8)),
                "distinct_votes": len(votes[name]),
                "reply_tokens_approx": reply_tokens.get(name),
            }
            for name, (spec, _) in judges.items()
        },
        "ratio_to_logits": {name: round(per_1000[name] / per_1000["logits"], 2) for name in judges},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
