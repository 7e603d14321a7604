"""Where a captioner or a judge is built from its config section, for the batch job and the service alike.

Each kind of model is a builder keyed by the section's engine (today `hf`: the model in this process, with
`transformers`); the batch job's stages and every service layout call `build_captioner` / `build_judge`, so a new
engine is one entry here and one class, not a branch in each place that loads a model. `batch_size` is what the
caller batches by (a service replica's configured batch); the batch job's default is the section's `micro_batch`.
"""

from __future__ import annotations

from typing import Any

from ..errors import UsageError


def _hf_captioner(section, batch_size: int | None) -> Any:
    from .captioner import Captioner

    return Captioner.from_config(section, batch_size=batch_size)


def _hf_judge(section, batch_size: int | None) -> Any:
    from .judge import Judge

    return Judge.from_config(section, batch_size=batch_size)


CAPTIONERS = {"hf": _hf_captioner}
JUDGES = {"hf": _hf_judge}


def _engine(section, kinds: dict, what: str) -> Any:
    engine = getattr(section, "engine", "hf")
    if engine not in kinds:
        raise UsageError(f"{what}.engine: unknown engine {engine!r}; known: {sorted(kinds)}")
    return kinds[engine]


def build_captioner(section, *, batch_size: int | None = None) -> Any:
    """A captioner (`.caption(pixels, prompts)`) from a `CaptionerConfig` or `ServeCaptionerConfig`."""
    return _engine(section, CAPTIONERS, "captioner")(section, batch_size)


def build_judge(section, *, batch_size: int | None = None) -> Any:
    """A judge (`.vote(questions)`, mode `logits` or `generate`) from a `JudgeConfig` or `ServeJudgeConfig`."""
    return _engine(section, JUDGES, f"judges.{section.name}")(section, batch_size)
