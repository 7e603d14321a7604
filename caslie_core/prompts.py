"""Prompt texts: context-conditioned caption requests, judge questions, the instruction prompt.

The wording is ours; the structure follows the method (see CASLIE_METHOD.md, section 2). Any change
to a template must bump `PROMPT_VERSION`: it travels with every output as provenance.
"""

from __future__ import annotations

import json
import re

from .errors import UsageError
from .records import Record

PROMPT_VERSION = "caslie-prompts-v1"

CAPTION_GENERAL = "Write a concise, informative caption of the product in this image, in at most 50 words."

_CAPTION_CONTEXT = {
    "MPC": "The caption should help judge how relevant the product '{title}' is to the user's query '{query}'.",
    "PSI": "The caption should help decide whether the product '{title}' can serve as a functional "
    "substitute for the user's query '{query}'.",
    "PRP": "The product in the image is titled '{this}'. The caption should help identify how it relates "
    "to the other product, '{other}'.",
    "SA": "The caption should help identify the user's sentiment in this review: {review}",
    "AP": "The caption should help decide whether this product question is answerable: {question}",
    "CC": "The caption should help identify the product's fine-grained category. The product title is: {title}",
    "SR": "The caption should help recommend the next product the user will buy, given their purchase "
    "history. The product in the image is titled: {title}",
}

_JUDGE = {
    "MPC": "A model must judge how relevant a product is to a query. Query: '{query}'. Product title: "
    "'{title}'. Information extracted from the product image: '{caption}'.",
    "PSI": "A model must decide whether a product can serve as a functional substitute for a query. Query: "
    "'{query}'. Product title: '{title}'. Information extracted from the product image: '{caption}'.",
    "PRP": "A model must identify how two products relate (similar, bought together, viewed together). "
    "Product 1: '{p1}'. Product 2: '{p2}'. Information extracted from the image of product {which}: '{caption}'.",
    "SA": "A model must identify the user's sentiment from a review: '{review}'. Information extracted from "
    "the image attached to the review: '{caption}'.",
    "AP": "A model must decide whether a product question is answerable: '{question}'. Information extracted "
    "from the product image: '{caption}'.",
    "CC": "A model must identify a product's fine-grained category. Product title: '{title}'. Information "
    "extracted from the product image: '{caption}'.",
    "SR": "A model must recommend the next product a user will buy from their purchase history. A product "
    "in the history or among the candidates is titled '{title}'. Information extracted from its image: "
    "'{caption}'.",
}
JUDGE_SUFFIX = " Will the information extracted from the image help with this task? Answer only yes or no."

# Free-form requests (chat): the caption and the judge are conditioned on the user's own words.
CHAT_CAPTION_CONTEXT = "The caption should help answer this request about the product: {request}"
CHAT_JUDGE = (
    "A model must answer a request about a product: '{request}'. Information extracted from the "
    "product image: '{caption}'."
)

_WS = re.compile(r"[\s]+")


def item_title(text: str) -> str:
    """`"<prefix>: <title>"` -> `<title>` (SR history items and options)."""
    return text.split(": ", 1)[-1]


def _sr_item(record: Record, index: int) -> str:
    history = record.input
    assert isinstance(history, list)
    if index < len(history):
        return history[index]
    return record.options[index - len(history)]


def caption_request(record: Record, index: int) -> str:
    """The context-conditioned caption request for image `index` of `record`."""
    task = record.spec
    n = task.expected_images(record.input, record.options)
    if not 0 <= index < n:
        raise IndexError(f"image index {index} out of range for a {task.abbr} record with {n} image(s)")
    inp = record.input
    if task.abbr in ("MPC", "PSI"):
        ctx = _CAPTION_CONTEXT[task.abbr].format(title=inp["product title"], query=inp["query"])
    elif task.abbr == "PRP":
        this, other = (inp["product 1"], inp["product 2"]) if index == 0 else (inp["product 2"], inp["product 1"])
        ctx = _CAPTION_CONTEXT["PRP"].format(this=this, other=other)
    elif task.abbr == "SA":
        ctx = _CAPTION_CONTEXT["SA"].format(review=inp["review"])
    elif task.abbr == "AP":
        ctx = _CAPTION_CONTEXT["AP"].format(question=inp["question"])
    elif task.abbr == "CC":
        ctx = _CAPTION_CONTEXT["CC"].format(title=inp["title"])
    else:
        ctx = _CAPTION_CONTEXT["SR"].format(title=item_title(_sr_item(record, index)))
    return f"{CAPTION_GENERAL} {ctx}"


def judge_question(record: Record, index: int, caption: str) -> str:
    """The yes/no question a judge answers about the caption of image `index`."""
    task = record.spec
    inp = record.input
    if task.abbr in ("MPC", "PSI"):
        body = _JUDGE[task.abbr].format(query=inp["query"], title=inp["product title"], caption=caption)
    elif task.abbr == "PRP":
        body = _JUDGE["PRP"].format(p1=inp["product 1"], p2=inp["product 2"], which=index + 1, caption=caption)
    elif task.abbr == "SA":
        body = _JUDGE["SA"].format(review=inp["review"], caption=caption)
    elif task.abbr == "AP":
        body = _JUDGE["AP"].format(question=inp["question"], caption=caption)
    elif task.abbr == "CC":
        body = _JUDGE["CC"].format(title=inp["title"], caption=caption)
    else:
        body = _JUDGE["SR"].format(title=item_title(_sr_item(record, index)), caption=caption)
    return body + JUDGE_SUFFIX


# Where the caption goes in a judge question prepared before the caption exists (the batch job builds each
# image's question once, when the record is parsed, and fills it in when the caption comes back).
CAPTION_SLOT = "\x00caption\x00"


def judge_template(record: Record, index: int) -> str:
    """`judge_question` with `CAPTION_SLOT` for the caption: `fill_caption(judge_template(r, i), c)` equals
    `judge_question(r, i, c)`."""
    return judge_question(record, index, CAPTION_SLOT)


def fill_caption(template: str, caption: str) -> str:
    return template.replace(CAPTION_SLOT, caption)


def chat_caption_request(request: str, *, max_chars: int = 500) -> str:
    """Caption request for an image attached to a free-form (chat) request."""
    return f"{CAPTION_GENERAL} {CHAT_CAPTION_CONTEXT.format(request=_WS.sub(' ', request).strip()[:max_chars])}"


def chat_judge_question(request: str, caption: str, *, max_chars: int = 500) -> str:
    return CHAT_JUDGE.format(request=_WS.sub(" ", request).strip()[:max_chars], caption=caption) + JUDGE_SUFFIX


def clean_caption(text: str | None, *, min_chars: int = 3) -> str | None:
    """Collapse newlines and tabs; an empty or near-empty caption counts as no caption."""
    if text is None:
        return None
    cleaned = _WS.sub(" ", text).strip()
    return cleaned if len(cleaned) >= min_chars and any(c.isalnum() for c in cleaned) else None


# Instruction prompt (uniM3): the released CASLIE models' two templates, byte for byte (CASLIE_METHOD.md 2.4;
# ninglab/CASLIE templates/alpaca.json and templates/mistral.json).

PROMPT_STYLES = ("alpaca", "mistral")
_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
# Each style: (what opens the prompt, what closes it, the marker the answer follows).
_TEMPLATES = {
    "alpaca": ("", "\n\n### Response:\n", "### Response:"),
    "mistral": ("[INST] ", "\n\n [/INST] ### Response:\n", "[/INST] ### Response:"),
}
RESPONSE_MARKER = _TEMPLATES["alpaca"][2]
# Models that were trained with the mistral template, by id (their ids need not say "mistral").
MISTRAL_STYLE_MODELS = ("ninglab/caslie-m",)
MISTRAL_MODEL_TYPES = ("mistral", "mixtral")


def serialise(value) -> str:
    """An input or options value as the research code writes it into the prompt: Python's `json.dumps`
    defaults (ASCII escaping, `", "` and `": "`). A JSON string (as stored in the dataset) is parsed first;
    a string that is not JSON is kept as it is (a free-form input)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    return json.dumps(value)


def instruction_prompt(instruction: str, input_value, options, *, style: str = "alpaca") -> str:
    """The prompt the released models were trained on: preamble, instruction, input, options, response.

    The Options section is there whenever the serialised options are non-empty (an empty list renders
    as `[]`, as in the research code); `options=None` (a free-form request) leaves it out."""
    if style not in _TEMPLATES:
        raise UsageError(f"unknown prompt style {style!r}; valid: {', '.join(PROMPT_STYLES)}")
    tail = _TEMPLATES[style][1]
    body = f"{prompt_head(style)}{instruction}\n\n### Input:\n{serialise(input_value)}"
    opts = "" if options is None else serialise(options)
    if opts:
        body += f"\n\n### Options:\n{opts}"
    return body + tail


def prompt_head(style: str) -> str:
    """What every prompt of `style` begins with, whatever the request: the template's opening, the preamble and
    the instruction heading (the prefix whose key/value cache the predictor computes once and reuses)."""
    return f"{_TEMPLATES[style][0]}{_PREAMBLE}\n\n### Instruction:\n"


def response_marker(style: str) -> str:
    return _TEMPLATES[style][2]


def extract_response(text: str, style: str = "alpaca", *, prompt: str | None = None) -> str:
    """The answer in a generation: the text after the marker that ends the prompt, up to the next marker
    the model may have produced (the research code's `output.split(marker)[1].strip()`). `text` is the
    generation alone, or the prompt and the generation when `prompt` is given (or starts the text)."""
    if prompt is not None and text.startswith(prompt):
        text = text[len(prompt) :]
    return text.split(response_marker(style), 1)[0].strip()


def default_style_for(model_id: str | None, model_type: str | None = None) -> str:
    """mistral for the models trained with the mistral template (NingLab/CASLIE-M, any Mistral-family model
    by its id or its config's `model_type`); alpaca otherwise (CASLIE-S and CASLIE-L: see the configs)."""
    mid = (model_id or "").lower().rstrip("/")
    if mid in MISTRAL_STYLE_MODELS or "mistral" in mid or "mixtral" in mid:
        return "mistral"
    if (model_type or model_type_of(model_id)) in MISTRAL_MODEL_TYPES:
        return "mistral"
    return "alpaca"


def model_type_of(model_id: str | None) -> str | None:
    """A local model folder's `model_type` (its config.json; an adapter's base model's); None when unknown
    (a hub id is not downloaded for this)."""
    from pathlib import Path

    if not model_id or not Path(model_id).is_dir():
        return None
    folder = Path(model_id)
    try:
        if (folder / "config.json").exists():
            return json.loads((folder / "config.json").read_text()).get("model_type")
        if (folder / "adapter_config.json").exists():
            base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
            return None if base == model_id else model_type_of(base)
    except (OSError, ValueError):
        return None
    return None


__all__ = [
    "PROMPT_VERSION",
    "caption_request",
    "judge_question",
    "clean_caption",
    "instruction_prompt",
    "extract_response",
    "response_marker",
    "serialise",
    "default_style_for",
]
