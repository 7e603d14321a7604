import pytest

from caslie_core.models.ids import resolve_model


def test_tiny_models_load_like_hub_models(tiny_models):
    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    proc = AutoProcessor.from_pretrained(tiny_models["captioner"])
    proc.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["captioner"])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Caption the phone."}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    images = [Image.new("RGB", (50, 40), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))]
    enc = proc(images=images, text=[text, text + " longer"], return_tensors="pt", padding=True)
    n_image_tokens = (enc["input_ids"] == model.config.image_token_id).sum(dim=1)
    assert n_image_tokens.tolist() == [model.config.image_seq_length] * 2
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= enc["input_ids"].shape[1] + 5

    tok = AutoTokenizer.from_pretrained(tiny_models["lm"])
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["lm"])
    assert tok.pad_token == "<pad>" and tok.chat_template
    ids = tok(["yes", "no"], add_special_tokens=False)["input_ids"]
    assert all(len(i) == 1 for i in ids)  # the judge's logits mode needs one token per answer
    assert lm.config.vocab_size == len(tok)


def test_resolve_model(tiny_models):
    assert resolve_model("tiny:lm") == tiny_models["lm"]
    assert resolve_model("meta-llama/Llama-3.2-3B-Instruct") == "meta-llama/Llama-3.2-3B-Instruct"
    with pytest.raises(ValueError, match="tiny:captioner"):
        resolve_model("tiny:giant")


def test_logits_judge_reads_the_last_position_only_and_votes_as_a_full_forward_pass(tiny_models):
    import torch

    from caslie_core.models.judge import Judge

    questions = [f"Is a caption about item {i} useful for its category? Answer yes or no." for i in range(6)]
    judge = Judge("tiny:lm", mode="logits", batch_size=len(questions))  # one batch: the same padding as below
    enc = judge._encode(questions)
    with torch.inference_mode():
        full = judge.model(**enc).logits
        last = judge.model(**enc, logits_to_keep=1).logits
    assert last.shape[1] == 1 and full.shape[1] == enc["input_ids"].shape[1]
    full = full[:, -1, :].float()
    expected = [
        "yes" if y > n else "no"
        for y, n in zip(full[:, judge.yes_ids].max(-1).values.tolist(), full[:, judge.no_ids].max(-1).values.tolist())
    ]
    assert [v.vote for v in judge.vote(questions)] == expected and judge._keep_last
