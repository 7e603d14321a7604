"""The real model families, on tiny random stand-ins built offline with each family's own config, model,
processor and image-processor classes, the hub's special tokens and its chat template (`tests/families`).

For every captioner and judge: it loads with the project's classes, a batch is ONE model call, batched output
equals one-at-a-time output (greedy, fp32), and the prompt's token ids are exactly what transformers' own
processor or tokenizer path gives (BOS count, image tokens, generation prompt). Random weights: the checks are
on token ids, call counts and statuses, never on text."""

from __future__ import annotations

import numpy as np
import pytest
from families.build import BASES, CAPTIONERS, JUDGES
from PIL import Image

from caslie_core.models.chat import RESEARCH_DATE, RESEARCH_SYSTEM, date_vars

RNG = np.random.default_rng(0)
IMAGES = [Image.fromarray(RNG.integers(0, 255, (20 + 9 * i, 40 - 5 * i, 3), dtype=np.uint8)) for i in range(4)]
PROMPTS = [
    "Write a concise caption of the product.",
    "Write a concise caption of the product, to help tell its category: 'Acme trail shoe, size 42'.",
    "Caption it.",
    "Write a concise caption of the product, to help judge whether it answers: 'Is the case waterproof?'",
]
QUESTIONS = [
    f"A model must identify a product's category. Product title: 'Acme phone {i}'. Information extracted from "
    f"the product image: 'a black phone{' with a case' * i}'. Will the information help? Answer only yes or no."
    for i in range(5)
]


def _folder(families, name: str) -> str:
    path = families[name]
    if path.startswith("skip: "):
        pytest.skip(path[len("skip: ") :])
    return path


class Calls:
    """Records each call of `obj.method`: its batch size, and (for generate) the new tokens of each row."""

    def __init__(self, obj, method: str = "generate") -> None:
        self.sizes: list[int] = []
        self.rows: list[list[list[int]]] = []
        inner = getattr(obj, method)

        def wrapped(*args, **kwargs):
            out = inner(*args, **kwargs)
            ids = kwargs["input_ids"]
            self.sizes.append(ids.shape[0])
            self.rows.append([r[ids.shape[1] :].tolist() for r in out])
            return out

        setattr(obj, method, wrapped)


def _trim(row: list[int], stops: set[int]) -> list[int]:
    """The generated ids up to and with the first end-of-sequence id (batched rows are padded after it)."""
    for i, t in enumerate(row):
        if t in stops:
            return row[: i + 1]
    return row


def _stops(model, tok) -> set[int]:
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    return {t for t in [*eos, tok.eos_token_id, tok.pad_token_id] if t is not None}


def _unpadded(enc, row: int) -> list[int]:
    return [i for i, m in zip(enc["input_ids"][row].tolist(), enc["attention_mask"][row].tolist()) if m]


def _own_ids(proc, image, prompt: str) -> list[int]:
    """transformers' own path for one image and request: the chat template through the processor where it has
    one, else the processor called as its model card shows (the processor places its image tokens itself)."""
    if getattr(proc, "chat_template", None):
        msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
        enc = proc.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=True, return_dict=True, **date_vars(proc.chat_template)
        )
        return list(enc["input_ids"][0])
    return list(proc(images=image, text=prompt)["input_ids"][0])


@pytest.mark.parametrize("name", list(CAPTIONERS))
def test_captioner_family_batches_in_one_call_as_its_processor_builds_it(families, name):
    from caslie_core.models.captioner import Captioner

    cap = Captioner(_folder(families, name), max_new_tokens=6, batch_size=len(IMAGES))
    proc, tok = cap.processor, cap.processor.tokenizer
    calls = Calls(cap.model)
    results = cap.caption(IMAGES, PROMPTS)
    assert calls.sizes == [len(IMAGES)], f"{name}: one generate call for the batch"
    assert [r.error for r in results] == [None] * len(IMAGES) and cap.fallbacks.count == 0

    # the prompt of every row, unpadded, is exactly transformers' own (BOS once, image tokens, generation prompt)
    enc = cap._inputs(IMAGES, PROMPTS)
    for i, (image, prompt) in enumerate(zip(IMAGES, PROMPTS)):
        ids, own = _unpadded(enc, i), _own_ids(proc, image, prompt)
        assert ids == own, (
            f"{name} row {i}: {tok.convert_ids_to_tokens(ids)[:12]} vs {tok.convert_ids_to_tokens(own)[:12]}"
        )
        if tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id:
            assert ids.count(tok.bos_token_id) == 1, f"{name}: one BOS"
        image_token = getattr(proc, "image_token_id", None) or tok.convert_tokens_to_ids(str(proc.image_token))
        assert image_token in ids, f"{name}: the image's tokens are in the prompt"

    # batched == one at a time (greedy, fp32), token for token
    stops = _stops(cap.model, tok)
    calls.rows.clear()
    cap._generate(IMAGES, PROMPTS)
    batched = [_trim(r, stops) for r in calls.rows[0]]
    calls.rows.clear()
    for image, prompt in zip(IMAGES, PROMPTS):
        cap._generate([image], [prompt])
    single = [_trim(rows[0], stops) for rows in calls.rows]
    assert batched == single


def test_production_captioner_captions_sixteen_images_in_one_generate_call(families):
    """configs/enrich-mmecinstruct.yaml's captioner (Llama-3.2-11B-Vision-Instruct), on its tiny stand-in, at
    the config's own micro-batch: one generate call for 16 images, no item redone alone."""
    from helpers import ROOT

    from caslie_core.config import EnrichConfig, load_config
    from caslie_core.models.captioner import Captioner

    cfg = load_config(EnrichConfig, ROOT / "configs" / "enrich-mmecinstruct.yaml", [])
    assert cfg.captioner.model == CAPTIONERS["mllama"] and cfg.captioner.micro_batch == 16
    stand_in = cfg.captioner.model_copy(update={"model": _folder(families, "mllama"), "max_new_tokens": 4})
    cap = Captioner.from_config(stand_in)
    calls = Calls(cap.model)
    images = [IMAGES[i % 4].rotate(90 * (i // 4), expand=True) for i in range(16)]
    results = cap.caption(images, [PROMPTS[i % 4] for i in range(16)])
    assert calls.sizes == [16] and [r.error for r in results] == [None] * 16 and cap.fallbacks.count == 0


def test_a_batch_that_fails_is_counted_and_a_model_that_cannot_batch_is_reported(families, caplog):
    """The defect Mllama had (a flat image list: every batch raised, each item alone worked) no longer passes
    for a slow GPU: each redone batch is counted, the first logged with its exception, and after three in a row
    the model is reported as running at batch size 1."""
    import logging

    from caslie_core.models.captioner import Captioner

    cap = Captioner(_folder(families, "mllama"), max_new_tokens=2, batch_size=2)
    flat = cap._inputs

    def flat_list(images, prompts):  # the old input building: one flat image list for the whole batch
        if len(images) == 1:
            return flat(images, prompts)
        enc = cap.processor(images=images, text=[cap.render(p) for p in prompts], padding=True, return_tensors="pt")
        return dict(enc)

    cap._inputs = flat_list
    with caplog.at_level(logging.WARNING, logger="caslie"):
        results = cap.caption(IMAGES * 2, PROMPTS * 2)  # 4 batches of 2
    assert [r.error for r in results] == [None] * 8
    assert cap.fallbacks.count == 4 and cap.fallbacks.take() == 4 and cap.fallbacks.take() == 0
    assert cap.fallbacks.single_only
    logged = [r.getMessage() for r in caplog.records if r.name == "caslie"]
    assert len(logged) == 2  # the first fallback with its exception, then "running at batch size 1", once
    assert "redone item by item" in logged[0] and "images" in logged[0]
    assert "running at batch size 1" in logged[1]


@pytest.mark.parametrize("mode", ["logits", "generate"])
@pytest.mark.parametrize("name", list(JUDGES))
def test_judge_family_votes_in_one_call_on_the_tokenizers_own_prompt(families, name, mode):
    from caslie_core.models.judge import Judge

    reply = "research" if mode == "generate" else "strict"
    judge = Judge(
        _folder(families, name),
        mode=mode,
        reply=reply,
        max_new_tokens=4,
        batch_size=len(QUESTIONS),
        system_message=RESEARCH_SYSTEM,
    )
    tok = judge.tokenizer
    calls = []
    inner = judge._batch
    judge._batch = lambda qs: calls.append(len(qs)) or inner(qs)
    votes = judge.vote(QUESTIONS)
    assert calls == [len(QUESTIONS)] and [v.error for v in votes] == [None] * len(QUESTIONS)
    assert judge.fallbacks.count == 0
    if mode == "logits":
        assert all(v.vote in ("yes", "no") for v in votes)

    # the prompt is the tokenizer's own apply_chat_template(tokenize=True), the system turn where it has one
    enc = judge._encode(QUESTIONS)
    for i, q in enumerate(QUESTIONS):
        msgs = [{"role": "user", "content": q}]
        if judge._system is not None:
            msgs.insert(0, {"role": "system", "content": RESEARCH_SYSTEM})
        own = tok.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=True, return_dict=True, **date_vars(tok.chat_template)
        )["input_ids"]
        assert _unpadded(enc, i) == list(own)
        if tok.bos_token_id is not None:
            assert own.count(tok.bos_token_id) <= 1
    # batched == one at a time
    single = [judge.vote([q])[0] for q in QUESTIONS]
    assert [v.vote for v in votes] == [v.vote for v in single]
    if mode == "generate":
        assert [v.raw for v in votes] == [v.raw for v in single]


def test_mllama_judge_is_the_text_model_of_the_full_checkpoint(families):
    """AutoModelForCausalLM on a Llama-3.2-Vision checkpoint: MllamaForCausalLM, with the full model's logits."""
    import torch
    from transformers import MllamaForConditionalGeneration

    from caslie_core.models.judge import Judge

    judge = Judge(_folder(families, "mllama"), mode="logits")
    assert type(judge.model).__name__ == "MllamaForCausalLM"
    full = MllamaForConditionalGeneration.from_pretrained(_folder(families, "mllama")).eval()
    enc = judge._encode(QUESTIONS[:2])
    with torch.inference_mode():
        assert torch.allclose(judge.model(**enc).logits, full(**enc).logits, atol=1e-5)


def test_llama_templates_write_the_configured_date_not_todays(families):
    """Llama-3.2's template writes the day it runs unless told: pinned, the same question renders byte for byte
    the same every day (the research code's date by default), as the Llama-3 prompt format lays it out."""
    from datetime import date

    from caslie_core.models.chat import chat_text
    from caslie_core.models.judge import Judge

    judge = Judge(_folder(families, "llama32"), mode="logits", system_message=RESEARCH_SYSTEM)
    text, templated = chat_text(judge.tokenizer, QUESTIONS[0], judge._system, judge.chat_date)
    assert templated and judge.chat_date == RESEARCH_DATE
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"Cutting Knowledge Date: December 2023\nToday Date: {RESEARCH_DATE}\n\n{RESEARCH_SYSTEM}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{QUESTIONS[0]}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    unpinned = judge.tokenizer.apply_chat_template(
        [{"role": "system", "content": RESEARCH_SYSTEM}, {"role": "user", "content": QUESTIONS[0]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert date.today().strftime("%d %b %Y") in unpinned  # what the template does by itself
    other = Judge(_folder(families, "llama32"), mode="logits", system_message=RESEARCH_SYSTEM, chat_date="03 Mar 2031")
    assert "Today Date: 03 Mar 2031" in chat_text(other.tokenizer, QUESTIONS[0], other._system, other.chat_date)[0]
    # the captioner's template (Llama-3.2-Vision) too, where it writes a date
    from caslie_core.models.captioner import Captioner

    cap = Captioner(_folder(families, "mllama"), max_new_tokens=2)
    assert cap.render(PROMPTS[0]) == cap.render(PROMPTS[0]) and cap.chat_date == RESEARCH_DATE


def test_chat_date_is_checked_in_the_config():
    from caslie_core.config import JudgeConfig

    assert JudgeConfig(name="a", model="m").chat_date == RESEARCH_DATE
    with pytest.raises(ValueError, match="chat_date '2024-07-26' is not a date like '26 Jul 2024'"):
        JudgeConfig(name="a", model="m", chat_date="2024-07-26")


@pytest.mark.parametrize("name", list(BASES))
def test_lora_base_family_trains_and_its_merged_adapter_answers_as_the_served_one(families, name, tmp_path):
    """A few LoRA steps on the family's base with the project's recipe pieces; the adapter merged into the base
    (evaluation) answers token for token as the same adapter loaded beside the base (the service)."""
    from types import SimpleNamespace

    import torch

    from caslie_core.models.predictor import AdapterPredictor, Predictor
    from caslie_core.prompts import instruction_prompt
    from caslie_core.training.data import collate, tokenize_example
    from caslie_core.training.lora import DEFAULT_LORA_TARGETS, apply_lora
    from caslie_core.training.recipe import load_model, micro_batch_loss

    section = dict(revision=None, dtype="float32", trust_remote_code=False, gradient_checkpointing=False)
    cfg = SimpleNamespace(model=SimpleNamespace(model=_folder(families, name), **section))  # what load_model reads
    model, tok = load_model(cfg, "cpu")
    torch.manual_seed(0)
    model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=list(DEFAULT_LORA_TARGETS))
    prompts = [
        instruction_prompt("Pick the category.", {"title": f"Acme item {i}"}, ["A: shoe", "B: phone"]) for i in range(4)
    ]
    examples = [tokenize_example(tok, p, "AB"[i % 2], 256) for i, p in enumerate(prompts)]
    batch = collate([e[0] for e in examples], [e[1] for e in examples], tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(6):
        loss, n = micro_batch_loss(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item() / n)
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")

    merged = Predictor(_folder(families, name), adapter=str(tmp_path / "adapter"), max_new_tokens=6, batch_size=4)
    served = AdapterPredictor(_folder(families, name), max_new_tokens=6, batch_size=4)
    served.load("a", str(tmp_path / "adapter"))
    a, b = merged.answer(prompts), served.answer(prompts, adapter="a")
    assert [x.error for x in a + b] == [None] * 8
    assert [(x.raw, x.n_new_tokens) for x in a] == [(x.raw, x.n_new_tokens) for x in b]


def test_phi35_is_refused_as_a_lora_base_with_a_clear_message(families):
    """Phi-3.5 fuses its projections (qkv_proj, gate_up_proj): the default targets are named missing, with the
    model's own linear modules, before any worker starts."""
    from caslie_core.config.common import ModelRef
    from caslie_core.config.train import LoraSettings
    from caslie_core.training.lora import model_problems

    problems = model_problems(ModelRef(model=_folder(families, "phi35")), LoraSettings())
    assert len(problems) == 1 and "not in the model" in problems[0] and "qkv_proj" in problems[0]
