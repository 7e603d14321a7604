"""Prompt texts: context-conditioned caption requests, judge questions, the instruction prompt.

The wording is ours; the structure follows the method (see CASLIE_METHOD.md, section 2). Any change
to a template must bump `PROMPT_VERSION`: it travels with every output as provenance.
"""

from __future__ import annotations

import json
import re

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


# Instruction prompt (uniM3)

PROMPT_STYLES = ("alpaca", "mistral")
RESPONSE_MARKER = "### Response:"
_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def _as_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def instruction_prompt(instruction: str, input_value, options, *, style: str = "alpaca") -> str:
    """The Alpaca-style prompt (sections for instruction, input, options, response).

    `mistral` wraps it in `[INST] ... [/INST]` as the released CASLIE-M expects. `input_value` and
    `options` may be JSON strings (as in the dataset) or structured values (serialised as JSON).
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; valid: {', '.join(PROMPT_STYLES)}")
    parts = [_PREAMBLE, f"### Instruction:\n{instruction}", f"### Input:\n{_as_text(input_value)}"]
    opts = _as_text(options) if options not in (None, "", []) else ""
    if opts and opts != "[]":
        parts.append(f"### Options:\n{opts}")
    body = "\n\n".join(parts) + f"\n\n{RESPONSE_MARKER}\n"
    if style == "mistral":
        return f"[INST] {body}[/INST]"
    return body


def record_prompt(record: Record, *, style: str = "alpaca", input_value=None, options=None) -> str:
    """Instruction prompt for a record, optionally with an enriched input/options in place of its own."""
    return instruction_prompt(
        record.instruction,
        record.input if input_value is None else input_value,
        record.options if options is None else options,
        style=style,
    )


def extract_response(text: str) -> str:
    """The answer part of a generated text: what follows the last response marker (or `[/INST]`)."""
    for marker in (RESPONSE_MARKER, "[/INST]"):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
    return text.strip()


def default_style_for(model_id: str) -> str:
    """Mistral-family models were trained with `[INST]` wrapping; others with the plain prompt."""
    return "mistral" if "mistral" in model_id.lower() else "alpaca"


__all__ = [
    "PROMPT_VERSION",
    "caption_request",
    "judge_question",
    "clean_caption",
    "instruction_prompt",
    "record_prompt",
    "extract_response",
    "default_style_for",
]
