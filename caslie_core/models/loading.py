"""Loading Hugging Face models for inference: device and dtype choice, tokenizer padding fixes."""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from .chat import RESEARCH_SYSTEM, chat_text, supports_system  # noqa: F401  (their home is models.chat)

DTYPES = ("auto", "bfloat16", "float16", "float32")


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str):
    """`auto` means bf16 on GPU (the method's setting), fp32 on CPU (bf16 matmuls are slow there)."""
    import torch

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def fix_padding(tokenizer: Any) -> Any:
    """Left padding for batched generation; a pad token when the model ships none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(
    model_id: str, *, revision: str | None = None, trust_remote_code: bool = False, padding_side: str = "left"
):
    """A model's tokenizer with a pad token; left padding for batched generation, right for training."""
    from transformers import AutoTokenizer

    from .ids import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(model_id), revision=revision, trust_remote_code=trust_remote_code)
    fix_padding(tok)
    tok.padding_side = padding_side
    return tok


def load_causal_lm(
    model_id: str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
):
    """(model, tokenizer, device) for a causal LM by hub id or local path (`tiny:lm` resolves locally)."""
    from transformers import AutoModelForCausalLM

    from .ids import resolve_model

    path = resolve_model(model_id)
    dev = pick_device(device)
    tok = load_tokenizer(model_id, revision=revision, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=pick_dtype(dtype, dev), trust_remote_code=trust_remote_code
    )
    model.to(dev).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok, dev


def cut_middle(ids: list[int], budget: int, *, keep_tail: int = 8) -> list[int]:
    """`ids` if they fit in `budget`, else their head and their last `keep_tail` tokens (at most half)."""
    if len(ids) <= budget:
        return ids
    tail = min(keep_tail, budget // 2)
    return ids[: budget - tail] + (ids[-tail:] if tail else [])
