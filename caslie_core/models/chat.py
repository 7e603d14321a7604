"""Chat rendering shared by the judges, the predictor and the trainers of the world's models (no model loading
here, so that anything may import it)."""

from __future__ import annotations

from typing import Any

RESEARCH_SYSTEM = "You are a helpful AI assistant."
# The date Llama-3.x chat templates write ("Today Date: ..."). Llama-3.1's template defaults to it; Llama-3.2's
# writes the day it runs on. Pinned, a prompt renders the same every day (and as in the research code's runs).
RESEARCH_DATE = "26 Jul 2024"
DATE_FORMAT = "%d %b %Y"


def date_vars(template: Any, date: str = RESEARCH_DATE) -> dict:
    """Template variables that pin the date a chat template writes: `date_string` where the template reads it
    (Llama-3.x: it reads the clock only when that is undefined), else `strftime_now` where it reads the clock."""
    from datetime import datetime

    if not isinstance(template, str):
        return {}
    if "date_string" in template:
        return {"date_string": date}
    if "strftime_now" in template:
        return {"strftime_now": datetime.strptime(date, DATE_FORMAT).strftime}
    return {}


def chat_text(tokenizer: Any, user_text: str, system: str | None = None, date: str = RESEARCH_DATE) -> tuple[str, bool]:
    """Render one user turn with the tokenizer's chat template; (text, template_applied).

    `system`: a system turn before it, where the template has a system role; a template that raises on
    one (e.g. "System role not supported") gets the user turn alone. `date`: the day the template writes, where
    it writes one (`date_vars`). Without a template: plain text."""
    if not getattr(tokenizer, "chat_template", None):
        return f"{user_text}\nAnswer:", False
    user = [{"role": "user", "content": user_text}]
    if system is not None:
        try:
            return _render(tokenizer, [{"role": "system", "content": system}, *user], date), True
        except Exception:  # any template error means: no system role here
            pass
    return _render(tokenizer, user, date), True


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


def _render(tokenizer: Any, messages: list[dict], date: str = RESEARCH_DATE) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **date_vars(tokenizer.chat_template, date)
    )
