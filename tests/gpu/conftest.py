"""GPU tests: every test in this folder is skipped unless torch sees a CUDA device."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Mark the items of this folder `gpu` and, without CUDA, skip them (torch is imported only if any are collected)."""
    mine = [item for item in items if HERE in Path(item.path).resolve().parents]
    if not mine:
        return
    skip = (
        None if cuda_available() else pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    )
    for item in mine:
        item.add_marker(pytest.mark.gpu)
        if skip is not None:
            item.add_marker(skip)
