"""Chat rendering shared by the judges, the predictor and the trainers of the world's models (no model loading
here, so that anything may import it)."""

from __future__ import annotations

from typing import Any

RESEARCH_SYSTEM = "You are a helpful AI assistant."


def chat_text(tokenizer: Any, user_text: str, system: str | None = None) -> tuple[str, bool]:
    """Render one user turn with the tokenizer's chat template; (text, template_applied).

    `system`: a system turn before it, where the template has a system role; a template that raises on
    one (e.g. "System role not supported") gets the user turn alone. Without a template: plain text."""
    if not getattr(tokenizer, "chat_template", None):
        return f"{user_text}\nAnswer:", False
    user = [{"role": "user", "content": user_text}]
    if system is not None:
        try:
            return _render(tokenizer, [{"role": "system", "content": system}, *user]), True
        except Exception:  # any template error means: no system role here
            pass
    return _render(tokenizer, user), True


def supports_system(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a system turn (without raising, and with its text)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    probe = "system-role-probe-7f3a"
    try:
        text = _render(tokenizer, [{"role": "system", "content": probe}, {"role": "user", "content": "q"}])
    except Exception:  # a template that refuses a system turn
        return False
    return probe in text


def _render(tokenizer: Any, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
