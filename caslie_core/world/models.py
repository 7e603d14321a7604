"""A captioner and a judge trained offline on the world of `catalog` (seconds on 2 CPU cores, cached).

- `world-captioner`: the tiny LLaVA architecture (CLIP vision tower, Llama text model, the tiny tokenizer and
  processor), trained from scratch to answer a caption request, the real context-conditioned one of
  `prompts.caption_request`, with what the picture shows in that context: asked about a task the picture
  decides, what the task turns on ("a ring" for the category, "a blue product" for query relevance, "a
  striped product" for substitutes); asked about any other task, the whole picture ("a red striped ring");
  of an uninformative picture, "no product shown".
- `world-judge`: a tiny Llama trained on the real judge questions (`prompts.judge_question`, rendered with and
  without the research system message) to answer "yes" when the caption carries what the task is decided by
  (CC, MPC, PSI, for a product picture) and "no" otherwise (SA, AP, PRP, SR, and any uninformative picture).

The same code, seed and step counts build the same weights. `tiny:world-captioner` and `tiny:world-judge` in a
config resolve here (built on first use under `CASLIE_CACHE`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from pathlib import Path

from .catalog import INSTRUCTIONS, NO_PRODUCT, WORLD_VERSION, Look, World, draw, encode

WORLD_NAMES = ("world-captioner", "world-judge")
MODELS_VERSION = f"{WORLD_VERSION}-models-2"  # 2: context-conditioned captions
IMAGE_TASKS = ("CC", "MPC", "PSI")
ALL_TASKS = ("CC", "MPC", "PSI", "SA", "AP", "PRP", "SR")


def _record(abbr: str, rec: dict, n_images: int):
    """The parsed record of a world draw (its pictures are not files: only their count matters here)."""
    from ..records import parse_record
    from ..synthetic import catalog_row

    return parse_record(catalog_row("world", abbr, "train", INSTRUCTIONS[abbr], rec, ["x"] * n_images))


def samples(seed: int, n: int, uninformative: float = 0.1) -> list[tuple[str, object, int, Look]]:
    """`n` (task, record, picture index, look) drawn from the world, tasks in turn."""
    world, out = World(seed, uninformative), []
    for i in range(n):
        abbr = ALL_TASKS[i % len(ALL_TASKS)]
        rec, looks = world.record(abbr)
        k = world.rng.randrange(len(looks))
        out.append((abbr, _record(abbr, rec, len(looks)), k, looks[k]))
    return out


def judge_answer(abbr: str, caption: str | None) -> str:
    """What the trained judge learns: yes when the caption carries the attribute that decides the task."""
    useful = caption not in (None, "", "NA", NO_PRODUCT)
    return "yes" if abbr in IMAGE_TASKS and useful else "no"


def _pixels(look: Look, rng: random.Random, size: int):
    """The picture as the enrichment job hands it to the captioner: encoded, decoded, letterboxed."""
    from PIL import Image

    from ..images import decode_image

    data, _ = encode(draw(look, rng), rng)
    return Image.fromarray(decode_image(data, size=size))


def _train(model, batches, steps: int, lr: float, seed: int) -> list[float]:
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1 - max(0, s - warm) / max(1, steps - warm))
    )
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batches(step)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    model.eval()
    return losses


def _pad(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input ids, attention mask and labels (-100 outside the answer)."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        labels[i, : len(x)] = torch.tensor(y)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _example(prompt_ids: list[int], answer_ids: list[int]) -> tuple[list[int], list[int]]:
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def build_captioner(
    out: Path, tiny: dict, *, seed: int, steps: int, n_examples: int, n_images: int, batch: int
) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

    from .. import prompts

    proc = AutoProcessor.from_pretrained(tiny["captioner"])
    tok = proc.tokenizer
    cfg = LlavaConfig.from_pretrained(tiny["captioner"])
    cfg.vision_config.hidden_size, cfg.vision_config.intermediate_size = 64, 128
    cfg.vision_config.num_attention_heads = 4
    cfg.vision_config.num_hidden_layers = 4
    cfg.text_config.hidden_size, cfg.text_config.intermediate_size = 96, 192
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    size = cfg.vision_config.image_size
    # The caption depends on the picture and on the task the request is about (its context), so requests and
    # pictures are drawn apart and paired at random: every step sees new pairs, and the pictures outnumber
    # what the model could learn by heart.
    requests = []
    for abbr, record, k, _look in samples(seed + 2, n_examples):
        content = [{"type": "image"}, {"type": "text", "text": prompts.caption_request(record, k)}]
        text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        requests.append((abbr, text))
    blank = Image.new("RGB", (size, size))
    prompt_ids = [
        (abbr, proc(images=[blank], text=[t], add_special_tokens=False)["input_ids"][0]) for abbr, t in requests
    ]
    rng = random.Random(seed + 1)
    world = World(seed + 7, uninformative=0.2)
    looks = [world.look() for _ in range(n_images)]
    pixels = proc.image_processor(images=[_pixels(look, rng, size) for look in looks], return_tensors="pt")
    pixels = pixels["pixel_values"]
    answers: dict[str, list[int]] = {}  # a few dozen distinct captions, tokenized once

    def answer(caption: str) -> list[int]:
        if caption not in answers:
            answers[caption] = tok(caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return answers[caption]

    order = random.Random(seed + 3)

    def batches(step):
        idx = order.sample(range(n_images), batch)
        pairs = [(order.choice(prompt_ids), looks[i]) for i in idx]
        b = _pad([_example(ids, answer(look.caption_for(abbr))) for (abbr, ids), look in pairs], tok.pad_token_id)
        b["pixel_values"] = pixels[idx]
        return b

    losses = _train(model, batches, steps, 2e-3, seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return {
        "steps": steps,
        "requests": n_examples,
        "pictures": n_images,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def build_judge(out: Path, tiny: dict, *, seed: int, steps: int, n_examples: int, batch: int) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from .. import prompts
    from ..models.chat import RESEARCH_SYSTEM, chat_text

    tok = AutoTokenizer.from_pretrained(tiny["lm"])
    cfg = LlamaConfig.from_pretrained(tiny["lm"])
    cfg.hidden_size, cfg.intermediate_size = 96, 192
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    rng = random.Random(seed + 4)
    data = []
    for abbr, record, k, look in samples(seed + 5, n_examples):
        caption = look.caption_for(abbr) if rng.random() > 0.05 else "NA"  # research CQE: a missing caption is NA
        text, templated = chat_text(
            tok, prompts.judge_question(record, k, caption), rng.choice([None, RESEARCH_SYSTEM])
        )
        ids = tok(text, add_special_tokens=not templated)["input_ids"]
        answer = tok(judge_answer(abbr, caption), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        data.append(_example(ids, answer))
    order = random.Random(seed + 6)
    losses = _train(
        model,
        lambda step: _pad([data[i] for i in order.sample(range(len(data)), batch)], tok.pad_token_id),
        steps,
        3e-3,
        seed,
    )
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"steps": steps, "examples": n_examples, "loss_first": losses[0], "loss_last": losses[-1]}


DEFAULT_STEPS = {"captioner": 800, "judge": 200}


def build_world_models(
    out_dir: str | Path, *, seed: int = 0, steps: dict | None = None, pictures: int = 8000, tiny: dict | None = None
) -> dict[str, str]:
    """Train both models under `out_dir`; return their paths. `steps` overrides `DEFAULT_STEPS` and `pictures`
    is the captioner's pool of training pictures (tests build small ones)."""
    from ..models.tiny import ensure_tiny_models

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tiny = tiny or ensure_tiny_models()  # the tokenizer and architectures of the random tiny models
    steps = {**DEFAULT_STEPS, **(steps or {})}
    t = time.time()
    with _all_cores():
        report = _build_both(out, tiny, seed=seed, steps=steps, pictures=pictures)
    report.update(version=MODELS_VERSION, seed=seed, seconds=round(time.time() - t, 1), built=time.time())
    (out / "VERSION").write_text(json.dumps(report, indent=2))
    return {name: str(out / name) for name in WORLD_NAMES}


@contextlib.contextmanager
def _all_cores(most: int = 8):
    """Torch on every core (up to `most`) for the one-off build: it usually runs in the first model actor that
    needs it, whose Ray worker is held to one thread, while the other actors wait for it (2 cores: 62 s, not 84)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(before, min(most, os.cpu_count() or 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build_both(out: Path, tiny: dict, *, seed: int, steps: dict, pictures: int) -> dict:
    return {
        "world-captioner": build_captioner(
            out / "world-captioner",
            tiny,
            seed=seed,
            steps=steps["captioner"],
            n_examples=1400,
            n_images=pictures,
            batch=32,
        ),
        "world-judge": build_judge(
            out / "world-judge", tiny, seed=seed, steps=steps["judge"], n_examples=1400, batch=32
        ),
    }


def ensure_world_models(root: str | Path | None = None) -> dict[str, str]:
    """Build the world's models once per cache folder (safe when several processes race)."""
    from ..models.tiny import build_once, cache_dir

    root = Path(root) if root else cache_dir() / MODELS_VERSION
    build_once(root, build_world_models)
    return {name: str(root / name) for name in WORLD_NAMES}
