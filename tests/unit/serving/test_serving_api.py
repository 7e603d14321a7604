"""The Ray-free parts of the service: request parsing, client image intake, chat shapes, auth, adapters."""

from __future__ import annotations

import base64
import io
import json

import pytest
from helpers import ROOT
from PIL import Image

from caslie_core import serving as sv
from caslie_core.errors import ImageError
from caslie_core.images import FetchPolicy

RECORD = {
    "task": "CC",
    "instruction": "Pick the category.",
    "input": {"title": "Red mug"},
    "options": ["A: Kitchen", "B: Garden"],
    "images": ["https://cdn.example.com/a.jpg"],
}


def png(size=(20, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def test_parse_body_reports_where_the_problem_is():
    with pytest.raises(sv.ApiError) as e:
        sv.parse_body(b'{"task": ', sv.PredictRequest)
    assert e.value.status == 422 and e.value.detail[0]["type"] == "json_invalid"
    with pytest.raises(sv.ApiError) as e:
        sv.parse_body(b"[1, 2]", sv.PredictRequest)
    assert "JSON object" in e.value.detail[0]["msg"]
    with pytest.raises(sv.ApiError) as e:
        sv.parse_body(json.dumps({**RECORD, "instruction": "", "colour": 1}).encode(), sv.PredictRequest)
    locs = {tuple(d["loc"]) for d in e.value.detail}
    assert locs == {("body", "instruction"), ("body", "colour")}
    req = sv.parse_body(json.dumps(RECORD).encode(), sv.PredictRequest)
    assert req.adapter is None and req.image_errors == "fail"


def test_records_from_requests_accept_json_strings_or_values_and_name_the_field():
    as_strings = {**RECORD, "input": json.dumps(RECORD["input"]), "options": json.dumps(RECORD["options"])}
    a = sv.to_record(sv.PredictRequest(**RECORD))
    b = sv.to_record(sv.PredictRequest(**as_strings))
    assert a.input == b.input == {"title": "Red mug"} and a.options == b.options and a.id == b.id
    for bad, field in [
        ({"task": "XX"}, "task"),
        ({"input": {"name": "x"}}, "input"),
        ({"images": []}, "images"),
        ({"options": "not json"}, "options"),
    ]:
        with pytest.raises(sv.ApiError) as e:
            sv.to_record(sv.PredictRequest(**{**RECORD, **bad}))
        assert e.value.status == 422 and e.value.detail[0]["loc"] == ["body", field], bad


def _load(url: str, policy: FetchPolicy, *, size: int, max_pixels: int):
    """One image through the service's intake (its own pools, the request's deadline): the slot."""
    import asyncio
    import time

    intake = sv.ImageIntake(
        policy,
        fetch_threads=2,
        decode_threads=1,
        per_request=2,
        size=size,
        max_pixels=max_pixels,
        max_decoded_bytes=10**8,
    )
    slot = sv.ImageSlot(0, url, "caption request")
    try:
        asyncio.run(intake.load([slot], deadline=time.monotonic() + 10))
    finally:
        intake.close()
    return slot


def test_data_uris_are_capped_and_decoded():
    data = png()
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    assert sv.read_data_uri(uri, 10_000) == data
    slot = _load(uri, FetchPolicy(), size=16, max_pixels=1000)
    assert slot.error is None and slot.pixels.shape == (16, 16, 3)
    with pytest.raises(ImageError, match="cap"):
        sv.read_data_uri(uri, 50)
    with pytest.raises(ImageError, match="base64"):
        sv.read_data_uri("data:image/png;base64,@@@@", 1000)
    with pytest.raises(ImageError, match="no comma"):
        sv.read_data_uri("data:image/png;base64", 1000)
    assert "pixel limit" in _load(uri, FetchPolicy(), size=16, max_pixels=100).error["message"]  # 20x10 = 200
    assert sv.shown_url(uri).startswith("data:image/png;base64,...") and len(sv.shown_url(uri)) < 60


def test_client_urls_never_reach_local_files_or_other_schemes():
    policy = FetchPolicy(schemes=("http", "https"), allow_local_files=False, retries=0)
    for url, fragment in [
        ("file:///etc/passwd", "local file"),
        ("/etc/passwd", "local file"),
        ("s3://bucket/a.png", "scheme 's3' not allowed"),
        ("gopher://x/", "not allowed"),
    ]:
        assert fragment in _load(url, policy, size=8, max_pixels=100).error["message"]


def test_image_failure_status():
    assert sv.image_failure_status(ImageError("fetch", "refused: loopback")) == 422
    assert sv.image_failure_status(ImageError("decode", "not an image")) == 422
    assert sv.image_failure_status(ImageError("fetch", "HTTP 503", transient=True)) == 502


def test_slots_keep_a_caption_by_plurality_and_assemble_the_input():
    rec = sv.to_record(sv.PredictRequest(**RECORD))
    slots = sv.record_slots(rec)
    assert "Red mug" in slots[0].prompt
    sv.caption_outcome(slots[0], {"caption": "  a red ceramic\nmug ", "error": None})
    assert slots[0].caption == "a red ceramic mug"
    questions = sv.record_questions(rec, slots)
    assert set(questions) == {0} and "a red ceramic mug" in questions[0]
    slots[0].votes = {"a": "yes", "b": "no", "c": "yes"}
    out = sv.enriched(rec, slots)
    assert out["status"] == "ok" and out["n_kept"] == 1
    assert out["input"]["product information extracted from image"] == "a red ceramic mug"
    slots[0].votes = {"a": "yes", "b": "no"}  # a tie keeps nothing
    assert sv.enriched(rec, slots)["input"]["product information extracted from image"] is None
    failed = sv.record_slots(rec)
    sv.caption_outcome(failed[0], {"caption": None, "error": "boom"})
    out = sv.enriched(rec, failed)
    assert out["status"] == "partial" and out["images"][0]["error"] == {"stage": "caption", "message": "boom"}


def test_chat_requests_become_instruction_prompts():
    req = sv.ChatRequest(
        model="m",
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
                ],
            },
        ],
        temperature=0.7,
        user="someone",
    )  # unknown sampling fields are ignored
    text, urls = sv.chat_request_text(req)
    assert text == "system: Be brief.\nWhat is this?" and urls == ["https://x/a.png"]
    slots = sv.chat_slots(text, urls)
    assert "What is this?" in slots[0].prompt
    slots[0].caption, slots[0].votes = "a lamp", {"j": "yes"}
    prompt = sv.chat_prompt(text, slots, style="alpaca")
    assert "What is this?" in prompt and "a lamp" in prompt and prompt.rstrip().endswith("### Response:")
    assert sv.chat_prompt(text, slots, style="mistral").startswith("[INST]")
    with pytest.raises(sv.ApiError):
        sv.chat_request_text(sv.ChatRequest(model="m", messages=[{"role": "system", "content": "x"}]))


def test_api_key_check():
    digest = sv.key_digest("s3cret")
    assert sv.key_matches({"authorization": "Bearer s3cret"}, digest)
    assert sv.key_matches({"x-api-key": "s3cret"}, digest)
    assert not sv.key_matches({"authorization": "Bearer nope"}, digest)
    assert not sv.key_matches({}, digest)
    assert sv.key_matches({}, None)  # no key configured: open (demo only)


def test_serve_configs_are_serve_files_that_agree_with_their_args():
    from ray.serve.schema import ServeDeploySchema

    from caslie_core.config import ServeConfig, load_config, read_yaml

    for path in sorted((ROOT / "configs").glob("serve-*.yaml")):
        data = read_yaml(path)
        ServeDeploySchema.model_validate(data)
        cfg = load_config(ServeConfig, path)
        assert data["http_options"]["host"] == cfg.http.host and data["http_options"]["port"] == cfg.http.port
        assert cfg.http.host == "127.0.0.1" or cfg.http.api_key_env, f"{path.name}: exposed without a key"


def test_serve_config_errors():
    from caslie_core.config import ServeConfig, load_config
    from caslie_core.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(
            ServeConfig,
            ROOT / "configs" / "serve-demo.yaml",
            ["model.deployment.autoscaling.min_replicas=3", "judges.0.name=Bad Name"],
        )
    assert "min_replicas (3)" in str(e.value) and "judge name" in str(e.value)
    with pytest.raises(ConfigError, match="not 'base'"):
        load_config(ServeConfig, ROOT / "configs" / "serve-demo.yaml", ["model.adapters={base: /x}"])
    with pytest.raises(ConfigError, match="metrics_interval_s"):
        load_config(
            ServeConfig, ROOT / "configs" / "serve-demo.yaml", ["model.deployment.autoscaling.metrics_interval_s=60"]
        )


@pytest.fixture(scope="module")
def two_adapters(tiny_models, tmp_path_factory):
    """Two random (non-identity) LoRA adapters on the tiny LM, with a modules_to_save head each."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for name, seed in (("red", 1), ("blue", 2)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_models["lm"])
        cfg = LoraConfig(
            r=4,
            lora_alpha=64,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
            modules_to_save=["lm_head"],
        )
        peft_model = get_peft_model(model, cfg)
        with torch.no_grad():
            peft_model.base_model.model.lm_head.modules_to_save["default"].weight.normal_(0, 0.5)
        path = tmp_path_factory.mktemp(f"adapter-{name}")
        peft_model.save_pretrained(path)
        out[name] = str(path)
    return out


def test_adapter_predictor_switches_adapters_like_separate_models(two_adapters):
    from caslie_core.models.predictor import AdapterPredictor, Predictor

    prompts = ["### Instruction:\nPick one.\n\n### Response:\n", "### Instruction:\nSay yes.\n\n### Response:\n"]
    ref = {
        n: [a.raw for a in Predictor("tiny:lm", adapter=p, max_new_tokens=6).answer(prompts)]
        for n, p in two_adapters.items()
    }
    ref["base"] = [a.raw for a in Predictor("tiny:lm", max_new_tokens=6).answer(prompts)]
    assert ref["red"] != ref["blue"] and ref["red"] != ref["base"]

    p = AdapterPredictor("tiny:lm", max_new_tokens=6)
    p.load("red", two_adapters["red"])
    p.load("blue", two_adapters["blue"])
    for adapter, expect in (("red", ref["red"]), ("blue", ref["blue"]), (None, ref["base"]), ("red", ref["red"])):
        assert [x.raw for x in p.answer(prompts, adapter)] == expect, adapter
    assert all(x.n_new_tokens <= 2 for x in p.answer(prompts, "red", max_new_tokens=2))
    p.unload("red")
    with pytest.raises(KeyError, match="not loaded"):
        p.answer(prompts, "red")
    assert [x.raw for x in p.answer(prompts, "blue")] == ref["blue"]
    p.unload("blue")  # the last one stays in PEFT, unused: the base model answers as before
    assert [x.raw for x in p.answer(prompts)] == ref["base"]
    p.load("red", two_adapters["red"])
    assert [x.raw for x in p.answer(prompts, "red")] == ref["red"] and list(p.peft.peft_config) == ["red"]


def test_a_streamed_answer_is_the_answer_and_cancelling_stops_generation(two_adapters):
    """Token streaming on the replica: the pieces add up to what `answer` gives (greedy, sampled with a seed,
    with stop strings); setting the cancel event (the client went away) ends generation at the next token."""
    import threading

    from caslie_core.models.predictor import AdapterPredictor

    p = AdapterPredictor("tiny:lm", max_new_tokens=48)
    p.load("red", two_adapters["red"])
    prompt = "### Instruction:\nDescribe the lamp.\n\n### Response:\n"
    for adapter in (None, "red"):
        whole = p.answer([prompt], adapter)[0]
        events = list(p.stream(prompt, adapter))
        assert "".join(e.get("delta", "") for e in events) == whole.text
        assert events[-1] == {
            "done": True,
            "n_prompt_tokens": whole.n_prompt_tokens,
            "n_new_tokens": whole.n_new_tokens,
            "finish_reason": "stop" if whole.stopped else "length",
        }
    seeded = {"temperature": 1.2, "seed": 11}
    drawn = p.answer([prompt], sampling=seeded)[0].text
    assert drawn == p.answer([prompt], sampling=seeded)[0].text
    assert "".join(e.get("delta", "") for e in p.stream(prompt, sampling=seeded)) == drawn
    greedy = p.answer([prompt])[0]
    stop = greedy.raw.split()[1]
    cut = p.answer([prompt], sampling={"stop": [stop]})[0]
    assert cut.stopped and cut.text == greedy.raw.split(stop, 1)[0].strip()
    assert "".join(e.get("delta", "") for e in p.stream(prompt, sampling={"stop": [stop]})) == cut.text

    cancel = threading.Event()
    events = []
    for event in p.stream(prompt, cancel=cancel):
        events.append(event)
        cancel.set()  # after the first piece
    assert events[-1]["done"] and events[-1]["n_new_tokens"] < 48, events[-1]
    stream = p.stream(prompt)
    next(stream)
    stream.close()  # a consumer that stops reading: the generation thread ends, the model is free again
    assert p.answer([prompt])[0].text == greedy.text


def test_streams_generated_together_are_each_their_own_answer(two_adapters):
    """Streams batched into one generation: each row's pieces add up to that prompt's own answer, rows end on
    their own, and cancelling one row ends it while the others go on."""
    import threading

    from caslie_core.models.predictor import AdapterPredictor
    from caslie_core.models.streaming import generate_streams, stream_answers

    p = AdapterPredictor("tiny:lm", max_new_tokens=24)
    p.load("red", two_adapters["red"])
    prompts = [f"### Instruction:\n{q}\n\n### Response:\n" for q in ("Pick one.", "Describe the mug.", "Say yes.")]
    for adapter in (None, "red"):
        alone = p.answer(prompts, adapter)  # batched the same way, not streamed
        rows: list[list] = [[] for _ in prompts]
        for step in stream_answers(p, prompts, adapter):
            assert len(step) == len(prompts)
            for row, events in zip(rows, step):
                row.extend(events)
        for row, answer in zip(rows, alone):
            assert "".join(e.get("delta", "") for e in row) == answer.text
            assert [e for e in row if e.get("done")] == [row[-1]]
    # a cancel set as the second step is handed over (in the generating thread, as the replica's pump sees it:
    # the iterator form's consumer may fall steps behind its generating thread on a loaded machine)
    cancels = [threading.Event() for _ in prompts]
    rows: list[list] = [[] for _ in prompts]
    steps = []

    def emit(step) -> None:
        steps.append(step)
        for row, events in zip(rows, step):
            row.extend(events)
        if len(steps) == 2:
            cancels[1].set()

    generate_streams(p, prompts, emit, cancels=cancels)
    made = [row[-1]["n_new_tokens"] for row in rows]
    assert made[1] <= 3 and made[0] > made[1] and made[2] > made[1], made


def test_generate_streams_hands_each_step_over_in_the_generating_thread_and_stops_at_once(tiny_models):
    """The serving path's streaming core: `emit` is called in the caller's (generating) thread once per decoding
    step, and a stop string ends the row at the step that makes it (no token generated after it)."""
    import threading

    from caslie_core.models.predictor import AdapterPredictor
    from caslie_core.models.streaming import generate_streams

    p = AdapterPredictor("tiny:lm", max_new_tokens=24)
    prompt = "### Instruction:\nDescribe the mug.\n\n### Response:\n"

    def run(sampling=None) -> list[list]:
        steps: list = []
        generate_streams(p, [prompt], lambda step: steps.append((threading.get_ident(), step)), sampling=sampling)
        assert {thread for thread, _ in steps} == {threading.get_ident()}
        return [step[0] for _, step in steps]

    free = run()
    assert [e for row in free for e in row if e.get("done")] == [free[-1][-1]] and len(free) >= 4
    # a stop string first made at step j: the first delta after step 1 whose text appeared nowhere before it
    seen, stop, j = "", None, None
    for i, events in enumerate(free):
        for e in events:
            if "delta" in e and i >= 1 and stop is None and e["delta"].strip() and e["delta"] not in seen:
                stop, j = e["delta"], i
            seen += e.get("delta", "")
    assert stop is not None, free
    stopped = run({"stop": [stop]})
    done = [(i, e) for i, row in enumerate(stopped) for e in row if e.get("done")]
    assert [i for i, _ in done] == [j] and done[0][1]["finish_reason"] == "stop"
    assert done[0][1]["n_new_tokens"] == j + 1 and len(stopped) == j + 2 and stopped[-1] == []


def test_streamed_text_is_decoded_incrementally_and_adds_up_to_the_whole_decode(tiny_models):
    """A long row's text is decoded a few ids at a time (decoding the whole row every step costs O(length) per
    token: 0.3 ms per row and step at 2,048 tokens here), and its pieces add up to decoding all its ids at once."""
    import random
    import threading

    from caslie_core.models.ids import resolve_model
    from caslie_core.models.loading import load_causal_lm
    from caslie_core.models.streaming import StepRows, StreamText

    _, tok, _ = load_causal_lm(resolve_model("tiny:lm"))
    rng = random.Random(7)
    ids = [rng.randrange(len(tok)) for _ in range(600)]
    widths: list[int] = []
    decode = tok.decode

    class Spy:
        def __getattr__(self, name):
            return getattr(tok, name)

        def decode(self, part, **kw):
            widths.append(len(part))
            return decode(part, **kw)

    rows = StepRows(Spy(), [StreamText(())], [threading.Event()], [1], len(ids), lambda step: None)
    pieces = []
    for token in ids:
        rows.ids[0].append(token)
        pieces.append(rows._piece(0, final=False))
    pieces.append(rows._piece(0, final=True))
    assert "".join(pieces) == decode(ids, skip_special_tokens=True)
    assert max(widths) <= 16, max(widths)


def test_the_template_heads_cache_changes_no_answer(two_adapters):
    """Prefix caching: prompts in the method's template share its head, whose key/value cache is computed once per
    adapter and reused. Batched (prompts of different lengths: padding between the head and each row), streamed,
    per adapter and for the base model, the answers are token for token those of a full prefill, and a prompt that
    does not begin with the head (or a predictor without the cache) is left-padded as before."""
    from caslie_core.models.predictor import AdapterPredictor
    from caslie_core.models.streaming import stream_answers
    from caslie_core.prompts import instruction_prompt

    prompts = [
        instruction_prompt(q, {"title": t}, opts, style="alpaca")
        for q, t, opts in (
            ("Pick the category.", "Polar green mug", ["A: Kitchen", "B: Toys"]),
            ("Is the review helpful?", "A lamp that is bright enough for a desk, with a long cable", None),
            ("Describe it.", "Brass nozzle", []),
        )
    ]
    cached, full = (AdapterPredictor("tiny:lm", max_new_tokens=12, prefix_cache=on) for on in (True, False))
    for p in (cached, full):
        p.load("red", two_adapters["red"])
    ids, mask, _, shared = cached._encode(prompts)
    head = len(cached.prefix.ids)
    assert shared and head > 20 and (mask[:, :head] == 1).all() and (mask[:, head:] == 0).any()
    assert not cached._encode(["### Instruction:\nSay yes.\n\n### Response:\n"])[3]
    for adapter in ("red", None):
        want = [(a.raw, a.n_new_tokens, a.n_prompt_tokens) for a in full.answer(prompts, adapter)]
        assert [(a.raw, a.n_new_tokens, a.n_prompt_tokens) for a in cached.answer(prompts, adapter)] == want
        assert [(a.raw, a.n_new_tokens) for a in cached.answer(prompts[1:2], adapter)] == [want[1][:2]]
        rows: list[list] = [[] for _ in prompts]
        for step in stream_answers(cached, prompts, adapter):
            for row, events in zip(rows, step):
                row.extend(events)
        assert ["".join(e.get("delta", "") for e in row) for row in rows] == [
            a.text for a in full.answer(prompts, adapter)
        ]
    assert set(cached.prefix.saved) == {"red", None} and not full.prefix
    cached.unload("red")  # an adapter's cache goes with it
    assert set(cached.prefix.saved) == {None}


def test_the_builder_takes_the_config_files_args_as_serve_run_passes_them(tiny_models):
    """What `serve run configs/serve-demo.yaml` does with our import path and args (no cluster needed)."""
    import importlib

    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from caslie_core.config import ServeConfig, apply_overrides, read_yaml

    app_cfg = ServeDeploySchema.model_validate(read_yaml(ROOT / "configs" / "serve-demo.yaml")).applications[0]
    module, attr = app_cfg.import_path.split(":")
    builder = getattr(importlib.import_module(module), attr)
    args = apply_overrides(app_cfg.args, ["model.path=null", "model.model=tiny:lm"])
    app = call_user_app_builder_with_args_if_necessary(builder, args)
    assert type(app).__name__ == "Application"
    from caslie_core.serving.spec import app_spec

    spec = app_spec(ServeConfig.model_validate(args))
    assert spec["models"]["ids"] == {"tiny:lm": "base"} and spec["key_digest"] is None  # the base by its id
    assert spec["models"]["aliases"] == {"caslie-demo": "tiny:lm"}  # and by the configured name
    with pytest.raises(Exception, match="judges"):
        call_user_app_builder_with_args_if_necessary(builder, {**args, "judges": []})


def test_a_colocated_replicas_models_take_turns_and_answer_concurrent_requests(tiny_models):
    """The co-located Models object (layout single builds it in the ingress): captioner, panel and answers share
    one `Turns`, ranked along a request's path, streams apart; the split Predictor takes no turns. Concurrent
    requests through its engine (as the ingress of layout single calls it) all get their answer."""
    import asyncio

    from caslie_core.config import ServeConfig, apply_overrides, read_yaml
    from caslie_core.serving.engine import Decoding
    from caslie_core.serving.gather import ANSWERS, CAPTIONS, VOTES
    from caslie_core.serving.spec import app_spec
    from ray_jobs.serve_models import Models, Predictor

    args = apply_overrides(
        read_yaml(ROOT / "configs" / "serve-demo.yaml")["applications"][0]["args"],
        ["model.path=null", "model.model=tiny:lm", "layout=single"],
    )
    cfg = ServeConfig.model_validate(args)
    spec = app_spec(cfg)
    bare = {"deployment"}
    m = Models(
        predictor=spec["predictor"],
        max_adapters=2,
        captioner=cfg.captioner.model_dump(mode="json", exclude=bare),
        judges=[j.model_dump(mode="json", exclude=bare) for j in cfg.judges],
    ).engine
    batchers = (m.captioner.batcher, m.panel.batcher, m.answerer.answers)
    assert all(b.turns is m.replica.turns is not None for b in batchers)
    assert [b.rank for b in batchers] == [CAPTIONS, VOTES, ANSWERS]
    assert m.answerer.streams.turns is None
    assert Predictor.func_or_class(spec["predictor"], 2).part.answers.turns is None

    async def ask(n: int) -> list:
        prompts = [f"### Instruction:\nName product {i}.\n\n### Response:\n" for i in range(n)]
        return await asyncio.gather(*(m.answer(p, Decoding(sv.BASE_MODEL_NAME)) for p in prompts))

    answers = asyncio.run(ask(6))
    assert len(answers) == 6 and all(a["error"] is None and a["n_new_tokens"] > 0 for a in answers)
