"""A chat template that writes the BOS must not get a second one from the tokenizer (captioner and judge).

The tiny tokenizer adds no BOS and its template writes none, so each test builds the situation on a
copy: a post-processor that adds `<s>` and a template that starts with `{{ bos_token }}`."""

from PIL import Image

from caslie_core.models.tiny import CHAT_TEMPLATE

BOS_TEMPLATE = "{{ bos_token }}" + CHAT_TEMPLATE


def _add_bos_by_default(tok):
    from tokenizers import processors

    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    assert tok("hi")["input_ids"][0] == bos  # the tokenizer now adds a BOS of its own
    return bos


def _real_tokens(enc, row):
    ids, mask = enc["input_ids"][row].tolist(), enc["attention_mask"][row].tolist()
    return [i for i, m in zip(ids, mask) if m]


def test_captioner_inputs_hold_one_bos_at_the_start(tiny_models):
    from caslie_core.models.captioner import Captioner

    cap = Captioner("tiny:captioner", max_new_tokens=3)
    bos = _add_bos_by_default(cap.processor.tokenizer)
    cap.processor.chat_template = BOS_TEMPLATE
    prompts = ["Describe the phone.", "Describe the phone and the colour of its case in a few words."]
    images = [Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (32, 48), (0, 0, 255))]
    texts = [cap.render(p) for p in prompts]
    assert all(t.startswith("<s>") for t in texts)
    doubled = cap.processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert _real_tokens(doubled, 0)[:2] == [bos, bos]  # what tokenizing with special tokens on gives

    enc = cap._inputs(images, prompts)
    for row in range(len(prompts)):
        ids = _real_tokens(enc, row)
        assert ids[0] == bos and ids.count(bos) == 1
    assert all(r.error is None for r in cap.caption(images, prompts))


def test_captioner_without_a_template_keeps_the_tokenizer_bos(tiny_models):
    from caslie_core.models.captioner import Captioner

    cap = Captioner("tiny:captioner", max_new_tokens=3)
    bos = _add_bos_by_default(cap.processor.tokenizer)
    cap.processor.chat_template = None
    assert not cap.templated
    enc = cap._inputs([Image.new("RGB", (40, 40))], ["Describe the phone."])
    ids = _real_tokens(enc, 0)
    assert ids[0] == bos and ids.count(bos) == 1


def test_judge_inputs_hold_one_bos_at_the_start(tiny_models):
    from caslie_core.models.judge import Judge

    judge = Judge("tiny:lm", mode="generate", max_new_tokens=2)
    bos = _add_bos_by_default(judge.tokenizer)
    judge.tokenizer.chat_template = BOS_TEMPLATE
    enc = judge._encode(["Is it useful? Answer yes or no.", "Is the caption about the phone useful? Answer yes or no."])
    for row in range(2):
        ids = _real_tokens(enc, row)
        assert ids[0] == bos and ids.count(bos) == 1
