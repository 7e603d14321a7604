"""Ray-free training pieces: prompt/label masking, truncation, collation, LoRA checks, schedules."""

from __future__ import annotations

import json

import pytest

from caslie_core.training import data as T
from caslie_core.training import lora as L
from caslie_core.training import recipe as R


@pytest.fixture(scope="module")
def tok(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["lm"])


def test_loss_only_on_the_response(tok):
    ex = T.training_example(
        {
            "id": "1",
            "task": "sentiment_analysis",
            "split": "train",
            "instruction": "Judge.",
            "input": json.dumps({"review": "great"}),
            "options": json.dumps(["A: pos", "B: neg"]),
            "output": "A",
        }
    )
    assert ex.prompt.rstrip().endswith("### Response:") and ex.response == "A"
    ids, labels, cut = T.tokenize_example(tok, ex.prompt, ex.response, 512)
    assert not cut and len(ids) == len(labels)
    answer = [t for t in labels if t != T.IGNORE_INDEX]
    assert answer == tok("A", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert labels[: len(ids) - len(answer)] == [T.IGNORE_INDEX] * (len(ids) - len(answer))


def test_truncation_keeps_head_marker_and_answer(tok):
    prompt = "Instruction. " + "word " * 400 + "\n\n### Response:\n"
    ids, labels, cut = T.tokenize_example(tok, prompt, "B", 64)
    assert cut and len(ids) == 64
    full = tok(prompt, add_special_tokens=False)["input_ids"]
    answer = tok("B", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids[-len(answer) :] == answer and labels[-len(answer) :] == answer
    assert ids[-len(answer) - 8 : -len(answer)] == full[-8:]  # the response marker survives
    assert ids[1:5] == full[:4]  # so does the head (after BOS)


def test_rows_render_their_captions_as_asked(tok):
    row = {
        "id": "x",
        "task": "SA",
        "split": "train",
        "instruction": "i",
        "output": "A",
        "input": json.dumps({"review": "r", "product information extracted from image": "cap"}),
        "options": "[]",
        "images": json.dumps(["http://x/1.png"]),
        "original_input": json.dumps({"review": "r"}),
        "original_options": "[]",
        "image_results": [{"index": 0, "caption": "cap", "kept": True}],
    }
    key = '"product information extracted from image"'
    assert f'{key}: "cap"' in T.training_example(row).prompt  # auto = kept for enrichment output
    assert f"{key}: null" in T.training_example(row, captions="none").prompt
    rejected = {**row, "image_results": [{"index": 0, "caption": "cap", "kept": False}]}
    assert f"{key}: null" in T.training_example(rejected).prompt
    assert f'{key}: "cap"' in T.training_example(rejected, captions="all").prompt
    raw = {k: row[k] for k in ("id", "task", "split", "instruction", "output", "options", "images")}
    raw |= {"input": json.dumps({"review": "r"}), "caption_info": json.dumps(["released cap"])}
    assert f"{key}: null" in T.training_example(raw).prompt  # auto = none for raw records
    assert f'{key}: "released cap"' in T.training_example(raw, captions="all").prompt


def test_collate_pads_right_and_masks(tok):
    b = T.collate([[5, 6, 7], [8]], [[-100, 6, 7], [8]], pad_id=0, pad_to_multiple=4)
    assert b["input_ids"].shape == (2, 4)
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert b["labels"][1].tolist() == [8, -100, -100, -100]


def test_lora_targets_are_checked(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["lm"])
    assert L.lora_target_problems(model, list(L.DEFAULT_LORA_TARGETS)) == []
    problems = L.lora_target_problems(model, ["q_proj", "qkv_proj"])
    assert problems and "qkv_proj" in problems[0] and "q_proj" in problems[0]
    with pytest.raises(ValueError, match="qkv_proj"):
        L.apply_lora(model, r=4, alpha=4, dropout=0.0, target_modules=["qkv_proj"])
    peft_model = L.apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=list(L.DEFAULT_LORA_TARGETS))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_schedule_warms_up_then_decays():
    import torch

    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = R.make_scheduler(opt, kind="cosine", warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.25) and lrs[3] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] < 0.05


def test_steps_per_epoch():
    assert R.steps_per_epoch(100, num_workers=2, batch_size=8, grad_accum=2) == 4  # 50 rows -> 7 micro -> 4
    assert R.steps_per_epoch(1, num_workers=2, batch_size=8, grad_accum=1) == 0
