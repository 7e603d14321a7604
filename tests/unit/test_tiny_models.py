import pytest

from caslie_core.tiny_models import resolve_model


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
