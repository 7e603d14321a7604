"""LoRA on a causal LM: target checks on a meta-device skeleton (before any worker starts), applying
LoRA with PEFT, and merging an adapter into its base model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from ..config.common import ModelRef
    from ..config.train import LoraSettings


DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
        raise UsageError("; ".join(problems))
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


def model_problems(model: ModelRef, lora: LoraSettings) -> list[str]:
    """Load the model's config and build it on the meta device (no weights) to check the LoRA targets."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models.ids import resolve_model

    try:
        conf = AutoConfig.from_pretrained(
            resolve_model(model.model), revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except Exception as e:  # noqa: BLE001 - what the user must fix is in the message
        return [f"model.model: cannot load {model.model!r}: {type(e).__name__}: {str(e).splitlines()[0]}"]
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(conf, trust_remote_code=model.trust_remote_code)
    problems = lora_target_problems(skeleton, lora.target_modules)
    modules = {name.rsplit(".", 1)[-1] for name, _ in skeleton.named_modules() if name}
    missing = [m for m in lora.modules_to_save if m not in modules]
    if missing:
        problems.append(
            f"lora.modules_to_save: {missing} not in the model (linear modules: {sorted(module_leaf_names(skeleton))})"
        )
    return problems


def merge_adapter(model: ModelRef, adapter: str, out: str | Path) -> None:
    """Write the base model with `adapter` merged in (full size) and the adapter's tokenizer to `out`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models.ids import resolve_model

    base = AutoModelForCausalLM.from_pretrained(
        resolve_model(model.model), revision=model.revision, trust_remote_code=model.trust_remote_code
    )
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(out)
