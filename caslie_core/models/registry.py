"""Where a captioner or a judge is built from its config section, for the batch job and the service alike.

Each kind of model is a builder keyed by the section's engine (`hf`: the model in this process, with
`transformers`; `openai`: an OpenAI-compatible server, `remote.py`); the batch job's stages and every service layout call `build_captioner` / `build_judge`, so a new
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


def _openai_captioner(section, batch_size: int | None) -> Any:
    from .remote import OpenAICaptioner

    size = batch_size or getattr(section, "micro_batch", 8)
    return OpenAICaptioner(section.model, section.openai, max_new_tokens=section.max_new_tokens, batch_size=size)


def _openai_judge(section, batch_size: int | None) -> Any:
    from .remote import OpenAIJudge

    return OpenAIJudge(
        section.model,
        section.openai,
        mode=section.mode,
        max_new_tokens=section.max_new_tokens,
        reply=section.reply,
        system_message=section.system_message,
        batch_size=batch_size or getattr(section, "micro_batch", 16),
    )


CAPTIONERS = {"hf": _hf_captioner, "openai": _openai_captioner}
JUDGES = {"hf": _hf_judge, "openai": _openai_judge}


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
