"""Fine-tuning pieces shared by the Ray Train job and the plain single-process loop (Ray-free).

- `training_example`: an enriched output row (or a plain MMECInstruct record) -> prompt + response;
- `tokenize_example`: token ids with the loss on the response only (labels -100 on the prompt), and
  truncation that keeps the instruction head and the response marker;
- `collate`: right-padded tensors for a micro-batch;
- `apply_lora` / `lora_target_problems`: PEFT LoRA on the named modules, checked before any worker starts;
- `make_optimizer` / `make_scheduler`: AdamW, cosine (or linear/constant) with warmup;
- `micro_batch_loss`: summed token loss of a micro-batch (normalised by the caller).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .prompts import instruction_prompt

IGNORE_INDEX = -100
# What a record's status means for training: failed rows have no usable text; partial rows keep the
# captions of the images that worked (their input is already assembled from those).
TRAINABLE_STATUSES = ("ok", "partial")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Example:
    id: str
    task: str
    split: str
    prompt: str
    response: str


def json_or_text(value: Any) -> Any:
    """A JSON string parsed, any other value (or non-JSON text) as it is."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def training_example(row: dict, *, style: str = "alpaca", use_enriched: bool = True) -> Example:
    """An enriched output row (input = enriched input) or a raw record row -> prompt and response.

    `use_enriched=False` trains on the original text (the text-only baseline of the paper's ablations).
    """
    if not use_enriched and row.get("original_input") is not None:
        input_value, options = row.get("original_input"), row.get("original_options")
    else:
        input_value, options = row.get("input"), row.get("options")
    prompt = instruction_prompt(
        row.get("instruction") or "", json_or_text(input_value), json_or_text(options), style=style
    )
    return Example(
        id=str(row.get("id")),
        task=str(row.get("task")),
        split=str(row.get("split")),
        prompt=prompt,
        response=str(row.get("output") or "").strip(),
    )


def cut_middle(ids: list[int], budget: int, *, keep_tail: int = 8) -> list[int]:
    """`ids` if they fit in `budget`, else their head and their last `keep_tail` tokens (at most half)."""
    if len(ids) <= budget:
        return ids
    tail = min(keep_tail, budget // 2)
    return ids[: budget - tail] + (ids[-tail:] if tail else [])


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


def micro_batch_loss(model, batch: dict):
    """(summed token cross-entropy over response tokens, number of such tokens)."""
    import torch.nn.functional as F

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1, :].float()
    target = batch["labels"][:, 1:]
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, int((target != IGNORE_INDEX).sum())


def module_leaf_names(model) -> set[str]:
    """Short names of the Linear-like modules (what LoRA `target_modules` refers to)."""
    names = set()
    for full, module in model.named_modules():
        if hasattr(module, "weight") and getattr(module.weight, "ndim", 0) == 2 and full:
            names.add(full.rsplit(".", 1)[-1])
    return names


def lora_target_problems(model, targets: list[str] | str) -> list[str]:
    """Problems with `target_modules` for this model (empty when fine)."""
    if targets == "all-linear":
        return []
    if isinstance(targets, str):
        targets = [targets]
    present = module_leaf_names(model)
    missing = [t for t in targets if t not in present]
    if missing:
        return [
            f"lora.target_modules: {missing} not in the model; its linear modules are {sorted(present)} "
            "(or use all-linear)"
        ]
    return []


def apply_lora(model, *, r: int, alpha: int, dropout: float, target_modules, modules_to_save=None):
    from peft import LoraConfig, get_peft_model

    problems = lora_target_problems(model, target_modules)
    if problems:
        raise ValueError("; ".join(problems))
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=target_modules if target_modules == "all-linear" else list(target_modules),
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )
    return get_peft_model(model, cfg)


def make_optimizer(model, *, lr: float, weight_decay: float, betas=(0.9, 0.999)):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def make_scheduler(optimizer, *, kind: str, warmup_steps: int, total_steps: int):
    import torch

    total = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_epoch(n_rows: int, *, num_workers: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch when every worker gets n_rows // num_workers rows (equal split)."""
    per_worker = n_rows // max(1, num_workers)
    micro = math.ceil(per_worker / batch_size)
    return math.ceil(micro / grad_accum) if micro else 0


__all__ = [
    "IGNORE_INDEX",
    "TRAINABLE_STATUSES",
    "DEFAULT_LORA_TARGETS",
    "Example",
    "training_example",
    "cut_middle",
    "tokenize_example",
    "collate",
    "micro_batch_loss",
    "module_leaf_names",
    "lora_target_problems",
    "apply_lora",
    "make_optimizer",
    "make_scheduler",
    "steps_per_epoch",
]
