"""Training data: which rows train, prompt + response per row, tokens with the loss on the response only.

- `trainable`: a row trains when its status is usable, its split is the wanted one, its task wanted;
- `training_example`: an enriched output row (or a plain MMECInstruct record) -> prompt + response;
- `tokenize_example`: token ids with labels -100 on the prompt, and truncation that keeps the
  instruction head and the response marker;
- `tokenize_batch`: one Arrow batch filtered and tokenized (what the Ray Data pipeline maps);
- `collate`: right-padded tensors for a micro-batch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..models.loading import cut_middle
from ..prompts import default_style_for
from ..records import split_or_none
from ..render import is_enriched, row_prompt
from ..tasks import get_task

IGNORE_INDEX = -100
# What a record's status means for training: failed rows have no usable text; partial rows keep the
# captions of the images that worked (their input is already assembled from those).
TRAINABLE_STATUSES = ("ok", "partial")


@dataclass
class Example:
    id: str
    task: str
    split: str
    prompt: str
    response: str


def training_example(row: dict, *, style: str = "alpaca", captions: str = "auto") -> Example:
    """An enriched output row or a raw record row -> the exact prompt (`caslie_core.render`) and response.

    `captions`: kept | all | none (see `render`), or auto = kept for enrichment output, none for raw records."""
    mode = captions if captions != "auto" else ("kept" if is_enriched(row) else "none")
    return Example(
        id=str(row.get("id")),
        task=str(row.get("task")),
        split=str(row.get("split")),
        prompt=row_prompt(row, style=style, captions=mode),
        response=str(row.get("output") or "").strip(),
    )


def tokenize_example(
    tokenizer, prompt: str, response: str, max_length: int, *, keep_tail: int = 8
) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated). Labels are IGNORE_INDEX on the prompt, the response + EOS else.

    Over `max_length`, the middle of the prompt is cut: its head (preamble, instruction, start of the
    input) and its last `keep_tail` tokens (the response marker) stay, so the model still sees where
    to answer. A response longer than the whole budget is cut too (flagged as truncated).
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    p = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    truncated = False
    if len(p) + len(r) > max_length:
        truncated = True
        r = r[: max(1, max_length // 2)] if len(r) > max_length // 2 else r
        p = cut_middle(p, max_length - len(r), keep_tail=keep_tail)
    return p + r, [IGNORE_INDEX] * len(p) + r, truncated


def collate(input_ids: list, labels: list, pad_id: int, *, device: str = "cpu", pad_to_multiple: int = 8):
    """Right-padded tensors {input_ids, attention_mask, labels} for one micro-batch."""
    import torch

    longest = max(len(x) for x in input_ids)
    if pad_to_multiple > 1:
        longest = int(math.ceil(longest / pad_to_multiple) * pad_to_multiple)
    n = len(input_ids)
    ids = torch.full((n, longest), pad_id, dtype=torch.long)
    lab = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, longest), dtype=torch.long)
    for i, (x, y) in enumerate(zip(input_ids, labels)):
        ids[i, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
        lab[i, : len(y)] = torch.as_tensor(list(y), dtype=torch.long)
        mask[i, : len(x)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": lab.to(device)}


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from ..models.loading import load_tokenizer

    return load_tokenizer(path, padding_side="right")


def prompt_style(model_id: str, configured: str) -> str:
    """The instruction template of a model: `configured` unless it is `auto`."""
    return default_style_for(model_id) if configured == "auto" else configured


def wanted_task(task, names: list[str] | None) -> bool:
    if not names:
        return True
    try:
        return get_task(task).name in names
    except KeyError:
        return False


def trainable(status, split, task, *, want_split: str, names: list[str] | None) -> bool:
    """A row trains: a usable status (ok/partial), the wanted split, one of the wanted tasks."""
    return status in TRAINABLE_STATUSES and split_or_none(split) == want_split and wanted_task(task, names)


def tokenize_batch(
    batch, *, tokenizer: str, style: str, captions: str, max_length: int, split: str, task_names: list[str] | None
):
    """Filter one Arrow batch of enriched (or record) rows to a split and tokenize it."""
    import pyarrow as pa

    tok = _tokenizer(tokenizer)
    ids, inputs, labels, n_tokens, truncated = [], [], [], [], []
    for row in batch.to_pylist():
        if not trainable(
            row.get("status", "ok"), row.get("split"), row.get("task"), want_split=split, names=task_names
        ):
            continue
        ex = training_example(row, style=style, captions=captions)
        x, y, cut = tokenize_example(tok, ex.prompt, ex.response, max_length)
        ids.append(ex.id)
        inputs.append(x)
        labels.append(y)
        n_tokens.append(len(x))
        truncated.append(cut)
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "input_ids": pa.array(inputs, pa.list_(pa.int32())),
            "labels": pa.array(labels, pa.list_(pa.int32())),
            "n_tokens": pa.array(n_tokens, pa.int32()),
            "truncated": pa.array(truncated, pa.bool_()),
        }
    )
