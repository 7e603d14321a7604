"""Distributed wrapping for the training recipe: FSDP (one unit per decoder layer) and full-state gathers
for checkpoints; pure torch, no Ray."""

from __future__ import annotations

import functools


def unwrap(model):
    return getattr(model, "module", model)


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def wrap_fsdp(model, device):
    """FSDP with one unit per decoder layer; `use_orig_params` because LoRA mixes frozen and trained
    parameters in a unit. Works on GPU (NCCL) and on CPU (gloo)."""
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    layer_names = set(getattr(base_model(model), "_no_split_modules", None) or [])
    layers = {type(m) for m in model.modules() if type(m).__name__ in layer_names}
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layers) if layers else None
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda":
        model.to(dev)
    return FSDP(
        model,
        auto_wrap_policy=policy,
        use_orig_params=True,
        device_id=dev if dev.type == "cuda" else torch.device("cpu"),
        sync_module_states=False,
    )


def base_model(model):
    get = getattr(model, "get_base_model", None)
    return get() if get else model


def fsdp_full_state(model, opt) -> tuple[dict, dict]:
    """Full model and optimizer state, gathered on rank 0 (a collective)."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    offload = next(model.parameters()).is_cuda  # offloading CPU tensors to the CPU crashes FSDP
    with FSDP.state_dict_type(
        model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=offload, rank0_only=True),
        FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True),
    ):
        return model.state_dict(), FSDP.optim_state_dict(model, opt)


def fsdp_optim_to_load(model, opt, osd: dict) -> dict:
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    offload = next(model.parameters()).is_cuda
    with FSDP.state_dict_type(
        model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=offload, rank0_only=False),
        FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=False),
    ):
        return FSDP.optim_state_dict_to_load(model, opt, osd)
