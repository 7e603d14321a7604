"""Smoke tests on a CUDA GPU in bf16 with the tiny models (skipped without a GPU; see conftest.py)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu


def _prompts(n: int) -> list[str]:
    from caslie_core.prompts import instruction_prompt

    return [
        instruction_prompt(
            "Given a product review, choose the user's sentiment.",
            {"review": f"The {noun} is {word}."},
            ["A: positive", "B: neutral", "C: negative"],
        )
        for noun, word in zip(
            ["mug", "kite", "phone", "helmet", "robot"][:n], ["great", "okay", "broken", "fine", "awful"]
        )
    ]


def test_predictor_and_judge_answer_a_batch_on_cuda_in_bf16(tiny_models):
    import torch

    from caslie_core.models.judge import Judge
    from caslie_core.models.predictor import Predictor

    prompts = _prompts(5)
    predictor = Predictor("tiny:lm", device="cuda", dtype="bfloat16", max_new_tokens=4, batch_size=2)
    param = next(predictor.model.parameters())
    assert param.device.type == "cuda" and param.dtype == torch.bfloat16
    answers = predictor.answer(prompts)  # 3 batches, the last one short
    assert len(answers) == len(prompts)
    assert all(a.error is None and 0 < a.n_new_tokens <= 4 and a.n_prompt_tokens > 0 for a in answers)

    colors = ["red", "blue", "green", "black", "white"]
    questions = [
        f"{p}\nCaption: a {c} product. Is the caption useful? Answer yes or no." for p, c in zip(prompts, colors)
    ]
    questions += [f"Is a caption about item {i} useful for its category? Answer yes or no." for i in range(5)]
    for mode in ("logits", "generate"):
        judge = Judge("tiny:lm", mode=mode, device="cuda", dtype="bfloat16", max_new_tokens=3, batch_size=4)
        assert next(judge.model.parameters()).dtype == torch.bfloat16
        votes = judge.vote(questions)
        assert len(votes) == len(questions) and all(v.error is None for v in votes)
        allowed = ("yes", "no") if mode == "logits" else ("yes", "no", None)
        assert all(v.vote in allowed for v in votes)


def test_captioner_captions_a_batch_on_cuda_in_bf16(tiny_models):
    import numpy as np

    from caslie_core.models.captioner import Captioner

    captioner = Captioner("tiny:captioner", device="cuda", dtype="bfloat16", max_new_tokens=5, batch_size=2)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    results = captioner.caption(images, [f"Describe product {i}." for i in range(3)])
    assert len(results) == 3 and all(r.error is None for r in results)
