"""The OpenAI surface without Ray: what is refused (400 naming the parameter), the error object, the chunk and
model shapes, the model ids (Ray Serve LLM's BASE:ADAPTER) and the adapter store. The official SDK parses what
these build: its own types validate them here."""

from __future__ import annotations

import json

import pytest

from caslie_core import serving as sv

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _refused(body: dict, kind=sv.ChatRequest) -> dict:
    with pytest.raises(sv.ApiError) as e:
        sv.parse_body(json.dumps(body).encode(), kind).check_supported()
    assert e.value.openai_status() == 400
    return e.value.openai_body()["error"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0]"),  # OpenAI and vLLM: 400
        ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": None}]}, "messages[1]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 3}}]}]},
            "messages[0].content[0].image_url",
        ),
    ],
)
def test_chat_requests_we_cannot_honour_are_400_naming_the_parameter(extra, param):
    err = _refused({**CHAT, **extra})
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error" and err["message"]


def test_unknown_fields_read_like_openai_and_inert_ones_pass():
    assert "Unrecognized request argument supplied: frobnicate" in _refused({**CHAT, "frobnicate": 1})["message"]
    ok = sv.parse_body(
        json.dumps(
            {
                **CHAT,
                "user": "u",
                "tool_choice": "none",
                "response_format": {"type": "text"},
                "n": 1,
                "parallel_tool_calls": False,
                "metadata": {"a": "b"},
                "store": False,
            }
        ).encode(),
        sv.ChatRequest,
    )
    ok.check_supported()
    assert ok.sampling().greedy and ok.limit() is None


def test_completion_requests():
    body = {"model": "m", "prompt": ["a", "b"]}
    req = sv.parse_body(json.dumps(body).encode(), sv.CompletionRequest)
    req.check_supported()
    assert req.prompts() == ["a", "b"]
    assert _refused({**body, "stream": True}, sv.CompletionRequest)["param"] == "prompt"
    for field, value in (("echo", True), ("suffix", "x"), ("best_of", 3), ("logprobs", 2)):
        assert _refused({**body, field: value}, sv.CompletionRequest)["param"] == field
    assert _refused({"model": "m", "prompt": [1, 2]}, sv.CompletionRequest)["param"].startswith("prompt")
    s = sv.parse_body(
        json.dumps({"model": "m", "prompt": "x", "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": "\n"}).encode(),
        sv.CompletionRequest,
    ).sampling()
    assert (s.temperature, s.top_p, s.seed, s.stop, s.greedy) == (0.7, 0.9, 3, ("\n",), False)


def test_the_official_sdk_parses_our_shapes():
    from openai.types import Completion, Model
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    done = ChatCompletion.model_validate(sv.chat_completion("m", "B", prompt_tokens=10, completion_tokens=2))
    assert done.usage.total_tokens == 12 and done.choices[0].message.content == "B"
    chunks = sv.Chunks("m", chat=True)
    events = [
        *chunks.start(),
        chunks.content("B"),
        chunks.content("C"),
        *chunks.finish("stop", 5, 2, include_usage=True),
    ]
    assert events[-1] == "data: [DONE]\n\n"
    parsed = [ChatCompletionChunk.model_validate(json.loads(e[6:])) for e in events[:-1]]
    assert "".join(c.choices[0].delta.content or "" for c in parsed if c.choices) == "BC"
    assert parsed[-2].choices[0].finish_reason == "stop" and parsed[-1].choices == []
    assert parsed[-1].usage.completion_tokens == 2 and len({c.id for c in parsed}) == 1
    text = sv.Chunks("m", chat=False)
    piece = json.loads(text.content("x")[6:])  # OpenAI streams text pieces with finish_reason null until the end
    assert piece["object"] == "text_completion" and piece["choices"][0] == {
        "index": 0,
        "text": "x",
        "finish_reason": None,
        "logprobs": None,
    }
    both = sv.text_completion(
        "m",
        [
            {"text": "a", "finish_reason": "stop", "n_prompt_tokens": 3, "n_new_tokens": 1},
            {"text": "b", "finish_reason": "length", "n_prompt_tokens": 4, "n_new_tokens": 2},
        ],
    )
    c = Completion.model_validate(both)
    assert [x.index for x in c.choices] == [0, 1] and c.usage.prompt_tokens == 7
    card = Model.model_validate(sv.model_card("org/base:rules", parent="org/base"))
    assert card.owned_by == "caslie" and card.model_extra["parent"] == card.model_extra["root"] == "org/base"
    assert sv.model_card("org/base")["owned_by"] == "org"


def test_model_ids_aliases_and_the_adapter_store(tmp_path):
    store = tmp_path / "store"
    spec = {
        "base_id": "org/base",
        "ids": {"org/base:rules": "rules", "org/base": "base"},
        "aliases": {"rules": "org/base:rules", "base": "org/base"},
        "store": str(store),
    }
    models = sv.ServedModels(spec)
    assert models.resolve(None) == ("org/base:rules", "rules")
    assert models.resolve("rules") == models.resolve("org/base:rules") == ("org/base:rules", "rules")
    assert models.resolve("base") == ("org/base", "base")
    with pytest.raises(sv.ApiError) as e:
        models.resolve("org/base:fresh")
    assert e.value.status == 404 and e.value.openai_body()["error"]["code"] == "model_not_found"
    assert e.value.openai_body()["error"]["param"] == "model"
    (store / "fresh").mkdir(parents=True)
    (store / "fresh" / "adapter_config.json").write_text("{}")
    (store / "not-an-adapter").mkdir()
    with pytest.raises(sv.ApiError):  # listed again at most once a second: made-up names cannot flood the store
        models.resolve("org/base:fresh")
    models._listed_at -= 1.5  # a second later
    assert models.resolve("org/base:fresh") == ("org/base:fresh", "fresh")  # no redeploy, no wait for the TTL
    (store / "base").mkdir()
    (store / "base" / "adapter_config.json").write_text("{}")
    models._listed_at = float("-inf")
    with pytest.raises(sv.ApiError):  # a store folder named `base` never shadows the base model
        models.resolve("org/base:base")
    assert [c["id"] for c in models.cards()] == ["org/base:rules", "org/base", "org/base:fresh"]
    for bad in ("org/base:../etc", "org/base:", "fresh", "org/base:a/b"):
        with pytest.raises(sv.ApiError):
            models.resolve(bad)
